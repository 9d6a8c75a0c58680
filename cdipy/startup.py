"""Start-up, the heavy work done once before any client connects:
parameters -> the signature policy -> find the image and its source -> fill the table."""

import contextlib
import logging
import time

from .admission import Admission
from .cache import Cache
from .exports import Exports
from .image import find_source
from .podman import Podman, Skopeo
from .policy import SignaturePolicy
from .storage import raise_open_file_limit
from .verify import CheckRecords
from .workspace import Workspace

log = logging.getLogger("cdipy")


def prepare(settings):
    """The table of exports of settings.name, its default export built."""
    started = time.monotonic()
    raise_open_file_limit()
    records, maps, signatures = caches(settings)
    admission = Admission(SignaturePolicy.load(settings.signature_policy), settings, signatures)
    # The cache's lock (in HELD) outlives the workspace: skopeo is stopped
    # before another nbdkit may write the cache.
    with contextlib.ExitStack() as held, Workspace(settings.name, guard=True) as workspace:
        podman = Podman(workspace, settings.name)
        source = find_source(settings, podman=podman, skopeo=Skopeo(workspace, settings.name),
                             held=held, admission=admission, caches=(records, maps))
        exports = Exports(source, settings, records)
        log.debug(f"found {source.what} ({len(exports.exports)} {source.part}s) in "
                  f"{time.monotonic() - started:.2f} s")
        try:
            with source.lend(podman):
                exports.build_default()
        except BaseException:
            exports.close()
            raise
    log.debug(f"ready in {time.monotonic() - started:.2f} s")
    if settings.verify == "before":
        try:
            exports.check_default_now()
        except BaseException:
            exports.close()
            raise
    return exports


def caches(settings):
    """The check records, the maps of big layers, and the signatures that
    passed the signature policy, in the cache directory."""
    cache = Cache(settings.cache_directory())
    return (CheckRecords(cache.entries("checked")), cache.entries("maps"),
            cache.entries("signatures"))
