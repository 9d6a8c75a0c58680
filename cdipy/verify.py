"""Checking a layer's bytes against its diffID (sha256), and remembering
the layers that passed.

A check reads the whole layer; on the way it notes the ranges that are all
zeros, which extents then reports as such.  A layer that passed is
remembered in the cache directory, keyed by its diffID and the identity
(device, inode, size, mtime, ctime) of every file it reads, so the next
start of an unchanged layer needs no hash at all.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time

from .cache import file_name
from .errors import CdiError
from .layer import identity
from .progress import Progress
from .sparse import blocks

log = logging.getLogger("cdipy")

CHECK_CHUNK = 1 << 20
# The lowest priority: a check must not slow the clients' reads.  A check
# also pauses after each chunk during which a client read the layer.
CHECK_NICENESS = 19
PAUSE_FOR_CLIENTS = 0.01


def start_check(layer, image_name, records):
    """Make sure LAYER is checked: at once if RECORDS remember it passed,
    otherwise by a thread (returned), while reads are served from podman's
    storage, which podman checked when it stored the layer."""
    # Cheap for a layer whose files are all open: done now, so that the
    # very first client already sees the known zeros.
    if layer.opener is None and recall_check(layer, records):
        return None

    def run():
        with contextlib.suppress(OSError):  # not allowed: keep the priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)
        try:
            if layer.opener is None or not recall_check(layer, records):
                check_and_remember(layer, image_name, records)
        except CdiError as error:
            log.debug(str(error))  # layer.failure is set: every read fails now

    thread = threading.Thread(target=run, name=f"verify-{layer.index}", daemon=True)
    thread.start()
    return thread


def check_and_remember(layer, image_name, records):
    """check_digest, then remember that LAYER passed (with its zeros)."""
    before = fingerprint(layer)
    layer.learn_zeros(check_digest(layer, image_name))
    records.store(layer.digest, before, layer.zeros)


def recall_check(layer, records):
    """Whether RECORDS say LAYER, with its files as they are now, passed its
    check; if so, LAYER learns its known zeros and counts as verified.  A
    file that cannot be read fails LAYER."""
    try:
        zeros = records.lookup(layer.digest, fingerprint(layer))
    except OSError as error:
        layer.fail(f"cannot read layer {layer.index} ({error.strerror})")
        raise CdiError(layer.failure) from None
    if zeros is None:
        return False
    layer.learn_zeros(zeros)
    layer.verified = True
    log.debug(f"layer {layer.index} passed its check before, unchanged since")
    return True


def fingerprint(layer):
    """What identifies the bytes LAYER reads: its diffID, where its map came
    from (the tar-split, and so the headers and offsets) and the identity
    of each of its files, which a lazily opened file must then keep."""
    digest = hashlib.sha256(repr((layer.digest, layer.origin, layer.size)).encode())
    for segment in layer.files():
        with layer.holding(segment) as fd:
            segment.identity = identity(os.fstat(fd))
        digest.update(repr(segment.identity).encode())
    return digest.hexdigest()


def check_digest(layer, image_name):
    """Read LAYER whole and compare its sha256 with its diffID; return the
    (start, end) ranges that are all zeros.  After a match the layer counts
    as verified; after a mismatch, or a read error, every read of it fails."""
    started = time.monotonic()
    digest = hashlib.sha256()
    buffer = bytearray(CHECK_CHUNK)
    zeros = []
    progress = Progress(f"verified layer {layer.index}:", layer.size)
    try:
        for offset in range(0, layer.size, CHECK_CHUNK):
            view = memoryview(buffer)[:min(CHECK_CHUNK, layer.size - offset)]
            reads = layer.reads
            layer.read(view, offset)
            digest.update(view)
            note_zeros(buffer, len(view), offset, zeros)
            progress.add(len(view))
            if layer.reads - reads > 1:
                time.sleep(PAUSE_FOR_CLIENTS)  # a client read meanwhile: let it go first
    except OSError as error:
        # Unchecked data must not be served as if it had been checked.
        layer.fail(f"{image_name}: verify: cannot read layer {layer.index} "
                   f"({error.strerror}); refusing to serve it")
        raise CdiError(layer.failure) from None
    actual = "sha256:" + digest.hexdigest()
    if actual != layer.digest:
        layer.fail(f"{image_name}: verify: layer {layer.index} hashes to "
                   f"{actual} but the image says {layer.digest}; refusing to "
                   "serve it (verify=false skips this check)")
        raise CdiError(layer.failure)
    layer.verified = True
    log.debug(f"verified layer {layer.index} in {time.monotonic() - started:.2f} s")
    return [tuple(zero) for zero in zeros]


def note_zeros(buffer, length, offset, zeros):
    """Add the all-zero blocks of BUFFER[:LENGTH], at OFFSET in the layer
    (blocks aligned in the layer), to ZEROS, a list of [start, end] merged
    as it grows."""
    for start, size, all_zero in blocks(buffer, length):
        if all_zero:
            if zeros and zeros[-1][1] == offset + start:
                zeros[-1][1] += size
            else:
                zeros.append([offset + start, offset + start + size])


class CheckRecords:
    """The layers that passed their check: a small JSON entry each in the
    PrivateCache CACHE."""

    def __init__(self, cache):
        self.cache = cache

    def lookup(self, diff_id, print_):
        """The zeros of the layer DIFF_ID if it passed with files PRINT_."""
        data = self.cache.read(entry_name(diff_id)) if entry_name(diff_id) else None
        try:
            record = json.loads(data) if data else {}
        except ValueError:
            record = {}
        if record.get("diff_id") != diff_id or record.get("fingerprint") != print_:
            return None
        return [tuple(zero) for zero in record.get("zeros", [])]

    def store(self, diff_id, print_, zeros):
        if entry_name(diff_id):
            self.cache.write(entry_name(diff_id), json.dumps(
                {"diff_id": diff_id, "fingerprint": print_, "zeros": zeros}).encode())


def entry_name(diff_id):
    """The file name of DIFF_ID's record; None for a diffID that is not a
    sha256, which must never become a path."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", diff_id):
        return None
    return file_name(diff_id) + ".json"
