"""The cache directory (cache=, default $XDG_CACHE_HOME/cdi-py): what
outlives one nbdkit, kept private.  This module alone knows its tree, its
locks and how a file in it is written whole:

  CACHE/oci/          an OCI layout (oci/layout.py knows the layout's own
                      format): artifacts, archives, images made whole
  CACHE/oci.lock      held by whoever writes the layout
  CACHE/partial/      blobs arriving by ranges: sha256-HEX, its .chunks
                      record, its .lock (oci/chunks.py)
  CACHE/unpacked/     compressed blobs unpacked: sha256-HEX (the blob's
                      digest) and sha256-HEX.json (the digest unpacked)
  CACHE/unpacked.lock held by whoever unpacks
  CACHE/checked/      records of the layers and blobs that passed their check
  CACHE/maps/         offset maps of big layers in podman's storage
  CACHE/signatures/   sigstore signatures that passed the signature policy

Nothing is named whole until its digest matched: a file is written under
a temporary name and renamed (write_whole), or linked under its name once
checked, so that no reader ever finds half of one.  Everything is read
only while its directory and the file can be written by us alone.  Losing
an entry costs time, never correctness.
"""

import contextlib
import errno
import fcntl
import logging
import os
import stat
import tempfile

from .errors import CdiError

__all__ = ["Cache", "PrivateCache", "file_name", "link_whole", "locked_file", "make_private",
           "only_ours", "remove_leftovers", "write_whole"]

log = logging.getLogger("cdipy")

AREAS = ("oci", "partial", "unpacked", "checked", "maps", "signatures")


class Cache:
    """The cache at DIRECTORY; None: there is none (no HOME), and nothing
    is kept."""

    def __init__(self, directory):
        self.directory = directory

    def path(self, area, name=None):
        """The path of AREA (one of AREAS), or of file NAME in it (a name,
        never a path: a digest's file_name, say)."""
        if area not in AREAS or (name is not None and (not name or "/" in name
                                                       or name in (".", ".."))):
            raise ValueError(f"no {area}/{name} in the cache")
        if self.directory is None:
            raise CdiError("no cache directory: HOME is not set; pass cache=DIR")
        return os.path.join(self.directory, area, *([name] if name else []))

    def entries(self, area):
        """The PrivateCache of AREA; one that keeps nothing if there is no cache."""
        return PrivateCache(self.path(area) if self.directory is not None else None)

    @contextlib.contextmanager
    def locked(self, area, image_name, leftovers):
        """Hold AREA's lock (waiting for another nbdkit's), with AREA made
        private and, under the lock, what killed writers left there
        removed: LEFTOVERS, (name prefix, who leaves them)."""
        directory = self.path(area)
        try:
            make_private(directory)  # and the cache's root, its parent
        except OSError as error:
            raise CdiError(f"{image_name}: cache directory {directory}: "
                           f"{error.strerror}") from None
        for path in (self.directory, directory):
            refuse_unless_private(path, image_name)
        lock = os.path.join(self.directory, f"{area}.lock")
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(locked_file(
                    lock, fcntl.LOCK_EX,
                    waiting=f"waiting for another nbdkit's work in {directory}"))
            except OSError as error:
                raise CdiError(f"{image_name}: cache directory {self.directory}: {lock}: "
                               f"{error.strerror}") from None
            remove_leftovers(directory, *leftovers)
            yield


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

    def path(self, name):
        return os.path.join(self.directory, name)

    def write(self, name, data):
        """Make entry NAME hold DATA."""
        if self.directory is None:
            return
        try:
            make_private(self.directory)
            write_whole(os.path.join(self.directory, name), data)
        except OSError as error:
            log.debug(f"cannot write {name} in {self.directory}: {error.strerror}")


def write_whole(path, data):
    """Make PATH hold DATA, written under a temporary name then renamed: no
    reader ever finds half of it."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".new-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def link_whole(fd, path, temporary):
    """Name the nameless file FD (O_TMPFILE), whole and checked, PATH:
    linked as TEMPORARY beside it (a name the area's leftovers are
    removed by), then renamed."""
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        # linkat(AT_SYMLINK_FOLLOW), which os.link uses only when given a
        # directory fd.
        os.link(f"/proc/self/fd/{fd}", temporary, dst_dir_fd=directory, follow_symlinks=True)
        os.replace(temporary, os.path.basename(path), src_dir_fd=directory,
                   dst_dir_fd=directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def locked_file(path, how, waiting=None):
    """Hold flock HOW on the lock file PATH (0600, made if need be), on a
    descriptor of its own, so that threads of one process exclude each
    other as processes do; WAITING, a debug line if it must wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.debug(waiting)
            fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def file_name(digest):
    """The name of the cache's files of DIGEST (sha256:HEX): sha256-HEX."""
    return digest.replace(":", "-")


def make_private(directory):
    """Create DIRECTORY, and its parent (the cache's root), 0700: makedirs
    gives its mode to the last directory alone."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    os.makedirs(directory, mode=0o700, exist_ok=True)


def only_ours(status):
    return status.st_uid == os.geteuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def refuse_unless_private(path, image_name):
    """CdiError unless PATH is a directory only this user can write to."""
    try:
        status = os.stat(path, follow_symlinks=False)
    except OSError as error:
        raise CdiError(f"{image_name}: cache directory {path}: {error.strerror}") from None
    if not stat.S_ISDIR(status.st_mode) or not only_ours(status):
        raise CdiError(f"{image_name}: cache directory {path} is not a directory that "
                       f"only this user can write to: chmod 700 it, or pass cache=DIR")


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
