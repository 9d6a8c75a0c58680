"""The copy path: a layer streamed from "podman save" into a file with no
name in the workspace, zero blocks left as holes, hashed as it is copied."""

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile

from .errors import CdiError
from .layer import FileSegment, Layer, Member, clean_name, member_kind
from .progress import Progress, describe_size
from .sparse import SparseWriter

log = logging.getLogger("cdipy")

COPY_CHUNK = 1 << 20


def saved_layers(podman, image, wanted, verify):
    """Stream "podman save" of IMAGE and yield the layers whose indexes are
    in WANTED, copied, in manifest order; the caller owns each, and may
    stop taking them at any time."""
    # docker-archive holds uncompressed layers named by their diffID, in
    # manifest order: copy what we need and stop reading there.
    diff_ids = image["RootFS"]["Layers"]
    # podman stages its own copy of the layer as it streams it.
    space_needed = 2 * image.get("Size", 0)
    by_file = {}
    for index in wanted:
        by_file.setdefault(diff_ids[index].split(":", 1)[-1] + ".tar", index)
    process = podman.start(["save", "--quiet", "--format", "docker-archive",
                            "--", image["Id"]])
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|", bufsize=COPY_CHUNK) as archive:
            for member in archive:
                index = by_file.get(member.name)
                if index is None or not member.isfile():
                    continue
                yield copied_layer(podman, archive.extractfile(member), member.size,
                                   index, diff_ids[index], verify=verify)
        # The whole archive was read: podman has finished, perhaps failed.
        if process.wait() != 0:
            raise podman.failure(process, "save", space_needed)
    except (tarfile.TarError, CdiError) as error:
        if podman.workspace.signal_received is not None:
            raise  # interrupted: podman is stopped on the way out
        # Podman's own failure, if it failed, explains a broken stream
        # best.  A podman still writing has not failed: don't wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            if process.wait(timeout=5) != 0:
                raise podman.failure(process, "save", space_needed) from None
        if isinstance(error, tarfile.TarError):
            raise CdiError(f"{podman.image_name}: save: not a tar archive: {error}") from None
        raise


def copied_layer(podman, source, size, index, diff_id, *, verify):
    """Layer INDEX copied from SOURCE into a nameless file, and verified."""
    fd = open_nameless_file(podman.workspace.path)
    try:
        digest = copy_sparse(podman, source, size, fd, verify)
        if digest is not None and digest != diff_id:
            raise CdiError(f"{podman.image_name}: verify: the layer's content hashes "
                           f"to {digest} but the image says {diff_id}; refusing "
                           "to serve it (verify=false skips this check)")
        layer = Layer(index, diff_id, "copy")
        layer.add_file(FileSegment(size, fd=fd))
        layer.members = scan_members(fd)
        layer.verified = digest is not None
    except BaseException:
        os.close(fd)
        raise
    return layer


def open_nameless_file(directory):
    """A 0600 file with no name: O_TMPFILE where the filesystem has it,
    otherwise created and unlinked at once."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return fd


def copy_sparse(podman, source, size, out_fd, verify):
    """Copy SIZE bytes from SOURCE to OUT_FD, leaving holes where blocks are
    all zero; return their sha256 (None unless VERIFY).  No free-space
    check up front: a mostly empty disk needs far less than SIZE."""
    digest = hashlib.sha256() if verify else None
    output = SparseWriter(out_fd, digest)
    progress = Progress("copied", size)
    copied = 0
    while copied < size:
        chunk = source.read(min(COPY_CHUNK, size - copied))
        if not chunk:
            raise CdiError(f"{podman.image_name}: save: podman's output ended "
                           f"after {copied} of {size} bytes of the layer")
        try:
            output.write(chunk)
            if copied + len(chunk) == size:
                output.finish()
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(podman.workspace.path).free
                raise CdiError(f"{podman.image_name}: save: no space left on device in "
                               f"TMPDIR={podman.workspace.tmpdir}: the layer needs "
                               f"{describe_size(size)}, {describe_size(free)} free") from None
            raise
        copied += len(chunk)
        progress.add(len(chunk))
    if size == 0:
        output.finish()
    return "sha256:" + digest.hexdigest() if digest else None


def scan_members(fd):
    """The tar members of the layer copy in FD."""
    with os.fdopen(os.dup(fd), "rb") as file, \
            tarfile.open(fileobj=file, mode="r:", encoding="utf-8",
                         errors="surrogateescape") as archive:
        return [Member(clean_name(info.name), member_kind(info.name, info.type),
                       info.size, info.offset_data)
                for info in archive]
