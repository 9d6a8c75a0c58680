"""The registry as a source: an artifact's uncompressed blobs, served while
they arrive (oci/chunks.py), ready once the manifest is read.  A blob the
cache's layout holds whole already is served from there; one that arrives
whole and matches its digest joins the layout, and once every blob has,
the manifest does too: the next start is the warm path (sources/layout_blobs.py),
with no network."""

import fcntl
import logging
import os

from ..errors import CdiError
from ..oci.blobs import BlobMismatch, Blobs
from ..oci.chunks import PartialBlob, RemoteBlob
from ..progress import describe_size
from ..verify import fingerprint
from .layout_blobs import BlobSource

log = logging.getLogger("cdipy")


class RegistrySource(BlobSource):
    """The blobs of REMOTE (an oci.fetch.Remote), their checks remembered
    in RECORDS."""

    def __init__(self, remote, settings, records):
        super().__init__(settings.name, f"{settings.name} at {remote.registry.host}")
        self.remote, self.records = remote, records
        layout = remote.layout
        with layout.locked():
            pass  # the cache made, and refused unless it is ours alone
        blobs = Blobs(layout, records, settings.verify != "false")
        descriptors = remote.manifest.get("layers") or []
        try:
            for descriptor in descriptors:
                digest, size = descriptor["digest"], descriptor.get("size")
                if not isinstance(size, int) or size < 0:
                    raise CdiError(f"{settings.name}: the manifest gives blob {digest} no size")
                layout.blob_path(digest)  # refuses a digest that could name another file
                layer = self.cached(blobs, descriptor)
                if layer is not None:
                    how = f"{describe_size(size)}, from the cache"
                else:
                    layer = RemoteBlob(len(self.layers), remote.registry,
                                       PartialBlob(layout.cache, digest, size,
                                                   settings.name),
                                       self.blob_whole)
                    how = f"{describe_size(size)}, from {remote.registry.host} as it is read"
                self.add_blob(descriptor, len(descriptors), layer, how)
        except BaseException:
            self.close()
            raise
        if not any(isinstance(layer, RemoteBlob) for layer in self.layers):
            self.keep_manifest_if_whole()  # every blob was here: the manifest too?

    def cached(self, blobs, descriptor):
        """The blob, checked, if the cache's layout holds it whole; else None."""
        if not os.path.exists(self.remote.layout.blob_path(descriptor["digest"])):
            return None
        try:
            return blobs.blob_layer(len(self.layers), descriptor)
        except BlobMismatch as error:
            log.debug(f"{error}: reading it from the registry again")
            self.remote.layout.remove_blob(descriptor["digest"])
            return None

    def start_background(self):
        for layer in self.layers:
            if isinstance(layer, RemoteBlob):
                layer.start()

    def blob_whole(self, layer, zeros):
        """LAYER arrived whole and matches its digest: a blob of the layout;
        with every blob there, the manifest too.  Losing this costs a fetch
        next time, never correctness: a failure is a debug line."""
        try:
            linked = keep_blob(self.remote.layout, layer)
            if linked:  # else another nbdkit kept it, and its record
                # Its names changed its ctime: the record is of the file after.
                self.records.store(layer.digest, fingerprint(layer), zeros)
        except (CdiError, OSError) as error:
            log.debug(f"cannot keep {layer.digest} in the cache: {error}")
            return
        self.keep_manifest_if_whole()

    def keep_manifest_if_whole(self):
        """Once the layout holds every blob, keep the manifest and its
        config there too; a failure is a debug line."""
        layout, remote = self.remote.layout, self.remote
        try:
            config = self.config_data()  # not under a lock: it comes from the network
            with layout.locked():
                if all(os.path.exists(layout.blob_path(descriptor["digest"]))
                       for descriptor in remote.manifest.get("layers") or []):
                    keep_manifest(remote, layout, config)
        except (CdiError, OSError) as error:
            log.debug(f"cannot keep the manifest of {self.image_name} in the cache: {error}")

    def config_data(self):
        """The bytes of the manifest's config, unless the layout holds them
        intact."""
        config = self.remote.manifest.get("config") or {}
        if not config.get("digest") or self.remote.layout.holds_intact(config["digest"]):
            return None
        return (self.remote.registry.blob_range(config["digest"], 0, config["size"])
                if config.get("size") else b"")

def keep_blob(layout, blob):
    """BLOB (a chunks.RemoteBlob), whole and checked, named a blob of
    LAYOUT and no longer partial; whether it was linked (False: another
    nbdkit kept it)."""
    with layout.locked():
        linked = layout.keep_blob(blob.digest, blob.partial.path)
    with blob.partial.locked(fcntl.LOCK_EX):
        blob.partial.remove()
    return linked


def keep_manifest(remote, layout, config_data):
    """Name REMOTE's manifest (an oci.fetch.Remote's) in LAYOUT, locked, with
    its config (CONFIG_DATA, None if the layout has it): the next start
    finds it there."""
    config = remote.manifest.get("config") or {}
    if config_data is not None and layout.write_blob(config_data) != config["digest"]:
        raise CdiError(f"the config {config['digest']} does not match its digest")
    if layout.write_blob(remote.data) != remote.digest:
        raise CdiError(f"the manifest does not match its digest {remote.digest}")
    layout.name_manifest(remote.image_name, {
        "mediaType": remote.manifest.get("mediaType",
                                         "application/vnd.oci.image.manifest.v1+json"),
        "digest": remote.digest, "size": len(remote.data)})
    log.debug(f"{remote.image_name} is whole in the cache {layout.path}: the next start "
              "needs no network")
