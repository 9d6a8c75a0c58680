"""The cache directory (cache=, default $XDG_CACHE_HOME/cdi-py): what
outlives one nbdkit, kept private.

Each entry is a file in a 0700 directory, written whole under a temporary
name and then renamed, so that no reader ever sees half of one; an entry
is read only if that directory and the file can be written by us alone.
Losing an entry costs time, never correctness: every failure to read or
write one is a debug line, and the work is done again.
"""

import contextlib
import errno
import logging
import os
import stat
import tempfile

log = logging.getLogger("cdipy")


class PrivateCache:
    """Entries by NAME in DIRECTORY; with DIRECTORY None, a cache that keeps
    nothing."""

    def __init__(self, directory):
        self.directory = directory

    def read(self, name):
        """The bytes of entry NAME, or None."""
        if self.directory is None:
            return None
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as error:
            if error.errno != errno.ENOENT:
                log.debug(f"ignoring {path}: {error.strerror}")
            return None
        with os.fdopen(fd, "rb") as file:
            if not (only_ours(os.fstat(fd)) and only_ours(os.stat(self.directory))):
                log.debug(f"ignoring {path}: others may write to it")
                return None
            return file.read()

    def write(self, name, data):
        """Make entry NAME hold DATA."""
        if self.directory is None:
            return
        temporary = None
        try:
            make_private(self.directory)
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".new-")
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, os.path.join(self.directory, name))
            temporary = None
        except OSError as error:
            log.debug(f"cannot write {name} in {self.directory}: {error.strerror}")
        finally:
            if temporary is not None:  # failed, or interrupted
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


def make_private(directory):
    """Create DIRECTORY, and its parent (the cache's root), 0700: makedirs
    gives its mode to the last directory alone."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    os.makedirs(directory, mode=0o700, exist_ok=True)


def only_ours(status):
    return status.st_uid == os.geteuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def remove_leftovers(directory, prefix, what):
    """Remove the files of DIRECTORY whose names start with PREFIX: what
    WHAT (a writer killed meanwhile) left under a temporary name.  Only
    under the lock that such writers hold."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.startswith(prefix):
                log.debug(f"removing {name}, left in the cache by {what}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
