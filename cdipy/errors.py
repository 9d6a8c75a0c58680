"""The two kinds of failure the core raises on purpose."""


class CdiError(Exception):
    """A failure the user can act on (bad parameter, podman said no, full
    disk).  nbdkit shows it as one line; any other exception is a bug and
    keeps its traceback."""


class NoSuchExport(CdiError):
    """A client asked for an export that does not exist."""


class RegistryError(CdiError):
    """The registry refused or failed a request; TRANSIENT if worth a retry."""

    def __init__(self, message, transient=False):
        super().__init__(message)
        self.transient = transient


class Unsupported(Exception):
    """A registry setting cdi.py's own client cannot honour: the whole fetch
    (podman, skopeo) takes over."""


class StorageUnavailable(Exception):
    """Why a layer cannot be served in place from podman's storage; the
    copy path takes over."""
