"""A seekable layer's disk served as its chunks are read: the TOC read with
a range, each chunk's compressed bytes asked for when a read needs them,
checked before they are served, zeros served with no fetch; the whole
blob kept in the cache's layout, and the next start served from there.

The registry is plain data (fakes.Registry); the layers are made byte by
byte (tests/seekable.py).  The end-to-end tests use podman's and
ctr-remote's own (tests/e2e/test_seekable.py)."""

import errno
import gzip
import hashlib
import io
import os

import pytest
import zstandard

from cdipy.errors import CdiError
from cdipy.layer import HOLE
from cdipy.oci.chunks import CHUNK
from cdipy.oci.fetch import GZIP_LAYER_TYPES
from fakes import Registry, streamed_image
from seekable import estargz, zstd_chunked
from tars import layer_tar, regular

NAME = "registry.example/vms/containerdisk:1"
KIB = 1024
DISK = os.urandom(6 * CHUNK) + bytes(CHUNK) + os.urandom(CHUNK // 2)
PIECES = [64 * KIB] * (6 * CHUNK // (64 * KIB)) + [CHUNK] + [CHUNK // 2]


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unpacked(blob):
    """The tar a layer's blob holds (every zstd frame, or gzip member)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def chunked_disk(**options):
    return zstd_chunked([("disk/", b"", None), ("disk/disk.img", DISK, PIECES)], **options)


def gzip_layer(tar):
    blob = gzip.compress(tar, compresslevel=1)
    return blob, {"mediaType": GZIP_LAYER_TYPES[0], "digest": digest_of(blob),
                  "size": len(blob)}


@pytest.fixture
def image(tmp_path):
    """image(layers, registry=None) -> the table of exports of an image of
    LAYERS, (blob, descriptor) each, read from a registry of their bytes
    (or REGISTRY, given the blobs); each closed after."""
    tables = []

    def make_table(layers, make_registry=Registry, layer="disk"):
        table = streamed_image(tmp_path, NAME, [
            (blob, descriptor, digest_of(unpacked(blob))) for blob, descriptor in layers],
            registry=make_registry, layer=layer)
        tables.append(table)
        return table

    yield make_table
    for table in tables:
        table.close()


def read(layer, offset, length):
    view = bytearray(length)
    layer.read(memoryview(view), offset)
    return bytes(view)


def fetched(registry):
    """The bytes asked of REGISTRY, by ranges and streams."""
    return sum(end - start for start, end in registry.ranges) + len(registry.starts)


@pytest.mark.parametrize("make", [chunked_disk, lambda: estargz(
    [("disk/", b"", None), ("disk/disk.img", DISK, PIECES)])], ids=["zstd:chunked", "eStargz"])
def test_a_read_fetches_the_toc_and_its_chunk_alone(image, make):
    blob, descriptor = make()
    table = image([(blob, descriptor)])
    disk = table.open("disk")
    registry = table.source.remote.registry
    assert registry.starts == [], "the layer was streamed"
    before = list(registry.ranges)
    offset = 4 * CHUNK + 100
    assert read(disk, offset, 4 * KIB) == DISK[offset:offset + 4 * KIB]
    new = [span for span in registry.ranges if span not in before]
    assert len(new) == 1 and new[0][1] - new[0][0] == CHUNK, new
    assert fetched(registry) < len(blob) // 2


def test_zeros_are_served_as_holes_with_no_fetch(image):
    blob, descriptor = chunked_disk()
    table = image([(blob, descriptor)])
    disk = table.open("disk")
    registry = table.source.remote.registry
    before = list(registry.ranges)
    assert read(disk, 6 * CHUNK + 5, 100) == bytes(100)
    assert disk.extents(6 * CHUNK, CHUNK) == [(6 * CHUNK, CHUNK, HOLE)]
    assert registry.ranges == before


def test_the_disk_is_chosen_from_the_toc_beside_a_gzip_layer(image):
    base = gzip_layer(layer_tar([regular("etc/motd", b"hello\n")]))
    table = image([base, chunked_disk()])
    disk = table.open("disk")
    assert disk.member.name == "disk/disk.img" and disk.index == 1
    assert read(disk, 0, 4 * KIB) == DISK[:4 * KIB]
    assert table.source.layers[1].stream.received == 0, "the seekable layer was streamed"


def test_a_chunk_that_fails_its_digest_fails_every_read(image):
    def lie(document):
        chunk = next(entry for entry in document["entries"]
                     if entry.get("chunkOffset") == 2 * 64 * KIB)
        chunk["chunkDigest"] = digest_of(b"another chunk")

    table = image([chunked_disk(edit=lie)])
    disk = table.open("disk")
    with pytest.raises(OSError) as raised:
        read(disk, 2 * 64 * KIB + 10, 10)
    assert raised.value.errno == errno.EIO
    assert raised.value.strerror.startswith(
        f"{NAME}: layer {table.source.remote.manifest['layers'][0]['digest']}: zstd:chunked "
        f"TOC: file disk/disk.img: chunk at byte {2 * 64 * KIB}: the chunk hashes to ")
    assert raised.value.strerror.endswith("; refusing to serve it")
    with pytest.raises(OSError, match="refusing to serve it"):
        read(disk, 0, 10)  # checked before, but the file cannot be right


def test_a_file_that_does_not_match_its_toc_digest_fails_once_whole(image):
    def lie(document):
        entry = next(entry for entry in document["entries"] if entry["name"] == "disk/disk.img")
        entry["digest"] = digest_of(b"another disk")

    table = image([chunked_disk(edit=lie)])
    disk = table.open("disk")
    with pytest.raises(OSError, match=r"verify: disk/disk.img of layer sha256:\w+ is sha256:"):
        read(disk, 0, len(DISK))


def test_the_layer_export_reads_through_the_blob(image):
    blob, descriptor = chunked_disk()
    table = image([(blob, descriptor)])
    registry = table.source.remote.registry
    disk = table.open("disk")
    read(disk, 0, 4 * KIB)
    layer = table.open("0")
    assert read(layer, 0, layer.size) == unpacked(blob)
    assert registry.starts == [], "the layer export streamed the blob anew"
    assert sorted(set(registry.ranges)) == sorted(registry.ranges), "a range asked twice"


def test_whole_the_blob_joins_the_layout_and_the_next_start_needs_no_registry(image):
    class Away(Registry):
        def answer(self):
            raise AssertionError("the registry was asked")

    blob, descriptor = chunked_disk()
    table = image([(blob, descriptor)])
    disk = table.open("disk")
    assert read(disk, 0, len(DISK)) == DISK
    table.close()  # little is left: the rest is taken in and checked
    warm = image([(blob, descriptor)], make_registry=Away)
    assert read(warm.open("disk"), 0, len(DISK)) == DISK


def test_a_toc_this_does_not_read_leaves_the_layer_streamed(image):
    def another_version(document):
        document["version"] = 2

    table = image([chunked_disk(edit=another_version)])
    disk = table.open("disk")
    assert read(disk, 0, len(DISK)) == DISK
    assert 0 not in table.source.seekable
    assert table.source.remote.registry.starts == [0], "not streamed"


def test_a_toc_that_lies_fails_the_start_in_one_line(image):
    def overlap(document):
        chunk = next(entry for entry in document["entries"]
                     if entry.get("chunkOffset") == 64 * KIB)
        chunk["chunkOffset"] = 64 * KIB - 1

    with pytest.raises(CdiError) as raised:
        image([chunked_disk(edit=overlap)])
    assert str(raised.value).startswith(f"{NAME}: layer sha256:")
    assert ": zstd:chunked TOC: file disk/disk.img: chunk at byte 65535 overlaps the chunk " \
        "before, which ends at byte 65536" in str(raised.value)
