"""Start-up, the heavy work done once before any client connects:
parameters -> find the image -> choose the source -> fill the table."""

import contextlib
import logging
import os
import time

from .admission import Admission
from .cache import PrivateCache
from .exports import Exports
from .image import find_image
from .oci.fetch import Fetched, Remote, RemoteImage
from .podman import Podman, Skopeo
from .policy import SignaturePolicy
from .sources.layout import LayoutSource
from .sources.registry import RegistrySource
from .sources.saved import SavedSource
from .sources.storage import StorageSource
from .sources.stream import StreamSource
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
        found = find_image(podman, Skopeo(workspace, settings.name), settings, held, admission)
        source = choose_source(found, settings, podman, records, maps)
        exports = Exports(source, settings, records)
        log.debug(f"found {source.what} ({len(exports.layers)} {source.part}s) in "
                  f"{time.monotonic() - started:.2f} s")
        try:
            exports.build_default(podman)
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


def choose_source(found, settings, podman, records, maps):
    """The source of what FOUND (find_image's answer) holds."""
    if isinstance(found, RemoteImage):
        return StreamSource(found, settings, records)
    if isinstance(found, Remote):
        return RegistrySource(found, settings, records)
    if isinstance(found, Fetched):
        return LayoutSource(found, settings, records)
    copies = SavedSource(found, settings)
    if settings.copy:
        return copies
    vfs = (found.get("GraphDriver") or {}).get("Name") == "vfs"
    return StorageSource(found, settings, maps, copies, podman.graph_root() if vfs else None)


def caches(settings):
    """The check records, the maps of big layers, and the signatures that
    passed the signature policy, in the cache directory."""
    directory = settings.cache_directory()

    def entries(name):
        return PrivateCache(os.path.join(directory, name) if directory else None)

    return CheckRecords(entries("checked")), entries("maps"), entries("signatures")
