"""Opening files a rootless user cannot open, the way podman itself does:
from inside podman's user namespace, where the user is root.

A helper (cdipy/userns_helper.py, run with "podman unshare") opens each file
beneath the layer's directory, following no symlink, and passes the
descriptor back over a Unix socket (SCM_RIGHTS).  It is started when the
first such file is met and stopped when the layer is built: it never
outlives the building of a layer, and it writes nothing anywhere.
"""

import errno
import os
import shutil
import socket
import struct
import subprocess
import sys

from .errors import StorageUnavailable
from .workspace import Workspace, stderr_text

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds to wait for the helper: its start (podman unshare), or a file.
HELPER_PATIENCE = 60


def needed():
    """Only a rootless user meets files it cannot open in its own storage."""
    return os.geteuid() != 0


def interpreter():
    """A Python for the helper: the system's, not whatever the embedded
    interpreter guessed from PATH."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("python3") or "python3"


class NamespaceOpener:
    """Use as a context manager; open() starts the helper on first use."""

    def __init__(self, image_name):
        self.image_name = image_name
        self.workspace = None
        self.process = None
        self.socket = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.socket is not None:
            self.socket.close()  # the helper sees the end and exits
        if self.workspace is not None:
            self.workspace.__exit__(None, None, None)

    def open(self, root, parts):
        """A read-only descriptor of ROOT/PARTS..., opened in the namespace."""
        if self.socket is None:
            self.start()
        root, name = os.fsencode(root), b"/".join(parts)
        self.socket.sendall(struct.pack("!II", len(root), len(name)) + root + name)
        try:
            reply, fds, _, _ = socket.recv_fds(self.socket, 4, 1)
        except OSError as error:
            raise self.failure(f"no answer ({error.strerror})") from None
        if len(reply) != 4:
            raise self.failure("it exited")
        code = struct.unpack("!I", reply)[0]
        if code:
            for fd in fds:
                os.close(fd)
            raise OSError(code, os.strerror(code))
        if len(fds) != 1:
            raise self.failure("it sent no descriptor")
        return fds[0]

    def start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.workspace = Workspace(self.image_name).__enter__()
            self.process = self.workspace.start(
                ["podman", "unshare", "env", f"PYTHONPATH={PACKAGE_PARENT}",
                 interpreter(), "-m", "cdipy.userns_helper", str(theirs.fileno())],
                stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # A helper that hangs must not hold the layer's lock for ever.
        ours.settimeout(HELPER_PATIENCE)
        self.socket = ours

    def failure(self, what):
        if self.process is not None and self.process.poll() is not None:
            what += f"; podman unshare: {stderr_text(self.process).strip()[-300:]}"
        return StorageUnavailable(f"the helper in podman's user namespace: {what}")


def is_permission_error(error):
    return error.errno in (errno.EACCES, errno.EPERM)
