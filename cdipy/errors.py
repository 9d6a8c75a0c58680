"""The failures the core raises on purpose, and the two exceptions that
choose another way of getting an image (Unsupported, StorageUnavailable)."""


class CdiError(Exception):
    """A failure the user can act on (bad parameter, podman said no, full
    disk).  nbdkit shows it as one line; any other exception is a bug and
    keeps its traceback."""


class NoSuchExport(CdiError):
    """A client asked for an export that does not exist."""


class RegistryError(CdiError):
    """The registry refused or failed a request; TRANSIENT if worth a retry;
    STATUS, the HTTP status it answered, if it answered one."""

    def __init__(self, message, transient=False, status=None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class NoSource(RegistryError):
    """No source of the image can give it: registries.conf blocks it, or
    each of its mirrors and its primary failed.  podman would fail alike,
    so the whole fetch is not tried."""


class PolicyRefusal(CdiError):
    """The signature policy does not accept the image: never a reason to
    try another way of getting it."""


class Unsupported(Exception):
    """A registry setting cdi.py's own client cannot honour: the whole fetch
    (podman, skopeo) takes over."""


class StorageUnavailable(Exception):
    """Why a layer cannot be served in place from podman's storage; the
    copy path takes over."""
