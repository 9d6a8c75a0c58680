"""Checking a layer's bytes against its diffID (sha256)."""

import hashlib
import logging
import threading
import time

from .errors import CdiError
from .progress import Progress

log = logging.getLogger("cdipy")

CHECK_CHUNK = 1 << 20


def check_digest(layer, image_name):
    """Read LAYER whole and compare its sha256 with its diffID.  After a
    mismatch, or a read error, every read of the layer fails."""
    started = time.monotonic()
    digest = hashlib.sha256()
    buffer = bytearray(CHECK_CHUNK)
    progress = Progress(f"verified layer {layer.index}:", layer.size)
    try:
        for offset in range(0, layer.size, CHECK_CHUNK):
            view = memoryview(buffer)[:min(CHECK_CHUNK, layer.size - offset)]
            layer.read(view, offset)
            digest.update(view)
            progress.add(len(view))
    except OSError as error:
        # Unchecked data must not be served as if it had been checked.
        layer.failure = (f"{image_name}: verify: cannot read layer {layer.index} "
                         f"({error.strerror}); refusing to serve it")
        raise CdiError(layer.failure) from None
    actual = "sha256:" + digest.hexdigest()
    if actual != layer.diff_id:
        layer.failure = (f"{image_name}: verify: layer {layer.index} hashes to "
                         f"{actual} but the image says {layer.diff_id}; refusing to "
                         "serve it (verify=false skips this check)")
        raise CdiError(layer.failure)
    log.debug(f"verified layer {layer.index} in {time.monotonic() - started:.2f} s")


def check_in_background(layer, image_name):
    """Start check_digest in a thread: reads are served meanwhile, from
    podman's storage, which podman checked when it stored the layer."""
    def run():
        try:
            check_digest(layer, image_name)
        except CdiError as error:
            log.debug(str(error))  # layer.failure is set: every read fails now

    threading.Thread(target=run, name=f"verify-{layer.index}", daemon=True).start()
