"""The registry of the unit tests: blobs in memory, answering what cdipy's
sources ask a registry (cdipy.oci.registry.Registry) for their bytes; and
the table of exports of an image streamed from it.  The end-to-end tests
use the real registry."""

import hashlib
import json
import os
from pathlib import Path

from cdipy.cache import PrivateCache
from cdipy.errors import RegistryError
from cdipy.exports import Exports
from cdipy.oci.fetch import RemoteImage
from cdipy.oci.layout import IMAGE_CONFIG_TYPES, Layout
from cdipy.parameters import Settings
from cdipy.sources.streamed_image import StreamSource
from cdipy.verify import CheckRecords


class Registry:
    """Registry IMAGE_NAME holding BLOBS, {digest: bytes}, or one blob
    (bytes) answered whatever digest is asked.  The first FAILURES requests
    fail as a cut connection; with AWAY set, every request is refused; the
    first answer of blob_pieces breaks off after CUT bytes, if given.  The
    first WHOLE ranges asked of blob_range_or_whole are answered with the
    whole blob, as a pull-through cache that does not hold it yet answers
    (the first of them breaking off after CUT bytes, if given; each piece
    after the first waiting for HELD_BACK, an Event, if given).  It records
    the ranges (blob_range) and the starts (blob_pieces) asked, and the
    ranges answered whole (wholes)."""
    host = "registry.example"

    def __init__(self, blobs, image_name="registry.example/disk:1", *, failures=0, cut=None,
                 away=False, whole=0, held_back=None):
        self.blobs, self.image_name = blobs, image_name
        self.failures, self.cut, self.away = failures, cut, away
        self.whole, self.held_back = whole, held_back
        self.ranges, self.starts, self.wholes = [], [], []

    def blob_range_or_whole(self, digest, start, end, piece):
        if self.whole:
            self.answer()
            self.whole -= 1
            self.wholes.append((start, end))
            return self.whole_answer(self.blob(digest), piece)
        return self.blob_range(digest, start, end)

    def whole_answer(self, data, piece):
        end = len(data)
        if self.cut is not None:
            end, self.cut = self.cut, None
        for offset in range(0, end, piece):
            if offset and self.held_back is not None:
                assert self.held_back.wait(30), "the whole answer was held back for 30 s"
            yield data[offset:min(offset + piece, end)]
        if end < len(data):
            raise RegistryError("the connection was cut", transient=True)

    def blob_range(self, digest, start, end):
        self.answer()
        self.ranges.append((start, end))
        return self.blob(digest)[start:end]

    def blob_pieces(self, digest, start, piece):
        self.answer()
        self.starts.append(start)
        data = self.blob(digest)
        end = len(data)
        if self.cut is not None:
            end, self.cut = start + self.cut, None
        for offset in range(start, end, piece):
            yield data[offset:min(offset + piece, end)]
        if end < len(data):
            raise RegistryError("the connection was cut", transient=True)

    def answer(self):
        """Fail, if this request is to."""
        if self.away:
            raise RegistryError("the connection was refused", transient=True)
        if self.failures:
            self.failures -= 1
            raise RegistryError("the connection was cut", transient=True)

    def blob(self, digest):
        return self.blobs if isinstance(self.blobs, bytes) else self.blobs[digest]


def streamed_image(directory, name, layers, *, registry=Registry, layer="disk"):
    """The table of exports (cdipy.exports.Exports) of image NAME whose
    LAYERS are (blob, descriptor, diffID) each, read by a StreamSource from
    REGISTRY (a class, given {digest: blob} and NAME), its cache in
    DIRECTORY: what the unit tests of streamed and seekable layers serve."""
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [diff_id for *_, diff_id in layers]}})
    manifest = {"schemaVersion": 2,
                "config": {"mediaType": IMAGE_CONFIG_TYPES[0],
                           "digest": digest_of(config.encode()), "size": len(config)},
                "layers": [descriptor for _, descriptor, _ in layers]}
    data = json.dumps(manifest).encode()
    os.chmod(directory, 0o700)
    blobs = registry({descriptor["digest"]: blob for blob, descriptor, _ in layers}, name)
    remote = RemoteImage(name, blobs, manifest, data, digest_of(data),
                         Layout(str(directory), name), json.loads(config), config.encode())
    settings = Settings(name=name, layer=layer)
    records = CheckRecords(PrivateCache(str(Path(directory, "checked"))))
    table = Exports(StreamSource(remote, settings, records), settings, records)
    table.build_default()
    return table


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()
