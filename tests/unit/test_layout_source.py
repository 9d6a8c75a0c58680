"""The OCI layout as a source, and the table of exports it fills: an
artifact's blobs and an archive's image in a layout written here in
tmp_path, as skopeo leaves one; no skopeo, podman or nbdkit."""

import gzip
import hashlib
import json
import os

import pytest
import zstandard

from cdipy.errors import CdiError, NoSuchExport
from cdipy.exports import Exports
from cdipy.image import layout_source
from cdipy.oci.fetch import Fetched
from cdipy.oci.layout import Layout
from cdipy.parameters import Settings
from cdipy.verify import CheckRecords
from tars import directory, layer_tar, regular

NAME = "registry.example/vms/disk:1"
QCOW2 = "application/vnd.kubevirt.disk.qcow2"
RAW_GZIP = "application/vnd.kubevirt.disk.raw+gzip"
EMPTY = "application/vnd.oci.empty.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DISK = b"QFI\xfb" + bytes(20) + (1 << 30).to_bytes(8, "big") + os.urandom(4064)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayoutWriter:
    """Writes blobs and a manifest into the cache's layout at tmp_path."""

    def __init__(self, cache):
        self.layout = Layout(str(cache), NAME)
        os.makedirs(os.path.join(self.layout.path, "blobs", "sha256"), mode=0o700)
        os.chmod(cache, 0o700)

    def blob(self, data):
        digest = digest_of(data)
        with open(self.layout.blob_path(digest), "wb") as file:
            file.write(data)
        return digest

    def descriptor(self, media_type, data, title=None):
        descriptor = {"mediaType": media_type, "digest": self.blob(data), "size": len(data)}
        if title is not None:
            descriptor["annotations"] = {"org.opencontainers.image.title": title}
        return descriptor

    def manifest(self, config_type, layers, config=b"{}"):
        return {"schemaVersion": 2, "config": self.descriptor(config_type, config),
                "layers": layers}


@pytest.fixture
def writer(tmp_path):
    return LayoutWriter(tmp_path / "cache")


def table(writer, manifest, fetch=None, **settings):
    """The table start-up fills for MANIFEST, found in the layout."""
    settings = Settings(name=NAME, cache=writer.layout.cache.directory, **settings)
    records = CheckRecords(writer.layout.cache.entries("checked"))
    source = layout_source(Fetched(NAME, writer.layout, manifest, fetch), settings, records)
    exports = Exports(source, settings, records)
    exports.build_default()
    return exports


def read_all(layer):
    buffer = bytearray(layer.size)
    layer.read(memoryview(buffer), 0)
    return bytes(buffer)


# ---------------------------------------------------------------- artifacts

def test_each_blob_is_an_export_named_by_index_digest_and_title(writer):
    blob = writer.descriptor(QCOW2, DISK, "rootdisk")
    exports = table(writer, writer.manifest(EMPTY, [blob]))
    assert exports.names() == ["0", "rootdisk", "disk"]
    assert exports.find("rootdisk") is exports.find("0") is exports.find(blob["digest"])
    assert read_all(exports.open("rootdisk")) == DISK
    exports.close()


def test_the_disk_of_an_artifact_is_its_disk_blob_described_as_it(writer):
    exports = table(writer, writer.manifest(EMPTY, [
        writer.descriptor("text/plain", b"notes", "README"),
        writer.descriptor(QCOW2, DISK, "rootdisk")]))
    disk = exports.open("disk")
    assert (disk.index, read_all(disk)) == (1, DISK)
    listing = dict(exports.listing())
    assert listing["disk"] == listing["1"]
    assert listing["1"].startswith(f"blob 1 of 2: rootdisk, {QCOW2}, sha256:")
    assert listing["1"].endswith(": qcow2, 1.0 GiB virtual")
    exports.close()


def test_layer_auto_of_an_artifact_is_the_index_of_its_disk_blob(writer):
    exports = table(writer, writer.manifest(EMPTY, [
        writer.descriptor("text/plain", b"notes"), writer.descriptor(QCOW2, DISK)]),
        layer="auto")
    assert exports.default_name == "1"
    exports.close()


def test_two_disks_make_the_disk_ambiguous_listing_their_names(writer):
    exports = table(writer, writer.manifest(EMPTY, [
        writer.descriptor(QCOW2, DISK, "rootdisk"), writer.descriptor(QCOW2, DISK[::-1])]))
    with pytest.raises(NoSuchExport) as raised:
        exports.open("disk")
    assert str(raised.value) == (f"{NAME}: the artifact holds 2 disks: name one as the "
                                 "export: rootdisk, 1")
    assert exports.names() == ["0", "1", "rootdisk"]
    exports.close()


def test_a_gzip_disk_is_unpacked_into_the_cache_and_checked(writer):
    raw = DISK + bytes(1 << 20)
    exports = table(writer, writer.manifest(EMPTY, [
        writer.descriptor(RAW_GZIP, gzip.compress(raw), "rootdisk")]))
    assert read_all(exports.open("disk")) == raw
    assert dict(exports.listing())["0"].endswith(
        ", gzip, unpacked in the cache to 1.0 MiB: qcow2, 1.0 GiB virtual")
    exports.close()


def test_a_layer_out_of_range_counts_the_blobs(writer):
    with pytest.raises(CdiError) as raised:
        table(writer, writer.manifest(EMPTY, [writer.descriptor(QCOW2, DISK)]), layer=1)
    assert str(raised.value) == (f"{NAME}: layer=1 is out of range: the artifact has 1 blob "
                                 "(allowed: 0..0 or -1..-1)")


def test_a_damaged_blob_is_fetched_again_once(writer):
    blob = writer.descriptor(QCOW2, DISK, "rootdisk")
    manifest = writer.manifest(EMPTY, [blob])
    with open(writer.layout.blob_path(blob["digest"]), "r+b") as file:
        file.write(b"XXXX")
    fetches = []

    def fetch():
        fetches.append(writer.blob(DISK))  # what skopeo would write anew
        return manifest

    exports = table(writer, manifest, fetch)
    assert fetches == [blob["digest"]]
    assert read_all(exports.open("disk")) == DISK
    exports.close()


def test_a_damaged_blob_with_pull_never_says_so(writer):
    blob = writer.descriptor(QCOW2, DISK)
    with open(writer.layout.blob_path(blob["digest"]), "r+b") as file:
        file.write(b"XXXX")
    with pytest.raises(CdiError) as raised:
        table(writer, writer.manifest(EMPTY, [blob]), pull="never")
    message = str(raised.value)
    assert message.startswith(f"{NAME}: the cached blob {blob['digest']} no longer matches "
                              f"its digest ({NAME}: verify: layer 0 hashes to sha256:")
    assert message.endswith("; pull=never forbids fetching it again: pass pull=missing")


# ---------------------------------------------------- an archive's image

def test_an_archives_image_serves_its_layers_and_the_disk_of_its_merged_filesystem(writer):
    base = layer_tar([directory("disk/"), regular("disk/old.qcow2", b"old" * 100)])
    top = layer_tar([regular("disk/.wh.old.qcow2"), regular("disk/new.qcow2", DISK)])
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [digest_of(base), digest_of(top)]}}).encode()
    manifest = writer.manifest(IMAGE_CONFIG, [
        writer.descriptor("application/vnd.oci.image.layer.v1.tar", layer) for layer in
        (base, top)], config=config)
    exports = table(writer, manifest, layer="disk")
    assert read_all(exports.open("0")) == base
    assert read_all(exports.open("")) == DISK
    description = dict(exports.listing())["disk"]
    assert description == (f"disk/new.qcow2 of layer 1 ({digest_of(top)}), from the cache: "
                           "qcow2, 1.0 GiB virtual")
    exports.close()


def test_an_archives_layer_must_hash_to_its_diff_id(writer):
    layer = layer_tar([regular("disk/a.img", b"a" * 100)])
    config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}).encode()
    manifest = writer.manifest(IMAGE_CONFIG, [
        writer.descriptor("application/vnd.oci.image.layer.v1.tar", layer)], config=config)
    with pytest.raises(CdiError) as raised:
        table(writer, manifest)
    assert str(raised.value) == (f"{NAME}: verify: layer 0 is {digest_of(layer)} but the "
                                 f"image says sha256:{'0' * 64}")


def test_an_archives_zstd_layer_is_unpacked_into_the_cache(writer):
    layer = layer_tar([directory("disk/"), regular("disk/disk.qcow2", DISK)])
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]}}).encode()
    manifest = writer.manifest(IMAGE_CONFIG, [
        writer.descriptor("application/vnd.oci.image.layer.v1.tar+zstd",
                          zstandard.ZstdCompressor().compress(layer))], config=config)
    exports = table(writer, manifest, layer="disk")
    assert read_all(exports.open("0")) == layer
    assert read_all(exports.open("")) == DISK
    exports.close()
