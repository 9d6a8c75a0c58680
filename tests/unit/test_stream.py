"""A gzip layer served as it streams in: reads behind the front at once,
reads ahead taking in only as far as they need, entries listed as their
headers arrive, a broken-off answer resumed at the byte reached, extents
that never call what has not arrived zero, and the checks once whole.

The registry here is plain data: fakes.Registry, blobs in memory (the
end-to-end tests use the real registry)."""

import errno
import gzip
import hashlib
import os

import pytest
import zstandard

from cdipy.errors import NoSuchExport
from cdipy.layer import DATA, HOLE, Window
from cdipy.oci import arrival
from cdipy.oci.fetch import GZIP_LAYER_TYPES, ZSTD_LAYER_TYPE
from cdipy.oci.layout import IMAGE_CONFIG_TYPES, Layout
from cdipy.oci.stream import PIECE, Stream, StreamedLayer
from fakes import Registry, streamed_image
from tars import directory, layer_tar, regular

NAME = "registry.example/vms/containerdisk:1"
IMAGE_CONFIG, GZIP_LAYER = IMAGE_CONFIG_TYPES[0], GZIP_LAYER_TYPES[0]

DISK = os.urandom(3 * PIECE) + bytes(2 * PIECE) + os.urandom(2 * PIECE)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


TAR = layer_tar([directory("disk/"), regular("disk/disk.img", DISK)])
BLOB = gzip.compress(TAR, compresslevel=1)


@pytest.fixture
def make(tmp_path):
    """make(registry=None, blob=BLOB, diff_id=None, media_type=GZIP_LAYER)
    -> a StreamedLayer; each stream's file closed after."""
    made, wholes = [], []

    def make_layer(registry=None, blob=BLOB, diff_id=None, media_type=GZIP_LAYER):
        fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
        stream = Stream(0, registry or Registry(blob), {"digest": digest_of(blob),
                                                     "size": len(blob),
                                                     "mediaType": media_type},
                        diff_id or digest_of(TAR), fd, whole=wholes.append)
        made.append(stream)
        return StreamedLayer(stream)

    make_layer.wholes = wholes
    yield make_layer
    for stream in made:
        stream.stop()
        os.close(stream.fd)


def read(layer, offset, length):
    view = bytearray(length)
    layer.read(memoryview(view), offset)
    return bytes(view)


def disk_window(layer):
    """The disk's Window, once its header has arrived."""
    stream = layer.stream
    stream.wait_until(lambda: any(member.name == "disk/disk.img" for member in stream.members))
    member = next(member for member in stream.members if member.name == "disk/disk.img")
    return Window(layer, member, "the only disk")


def test_entries_are_listed_as_their_headers_arrive(make):
    layer = make()
    window = disk_window(layer)
    assert layer.stream.received == PIECE, "more than one piece taken in for the header"
    assert window.size == len(DISK)
    assert not layer.stream.listed


def test_a_read_ahead_of_the_front_takes_in_only_as_far_as_it_needs(make):
    layer = make()
    window = disk_window(layer)
    assert read(window, 0, 4096) == DISK[:4096]
    assert read(window, PIECE, 4096) == DISK[PIECE:PIECE + 4096]
    assert layer.stream.front < len(TAR) and not layer.stream.done


def test_the_whole_is_checked_and_named_once(make):
    layer = make()
    window = disk_window(layer)
    assert read(window, len(DISK) - 1000, 1000) == DISK[-1000:]
    layer.wait_whole()
    assert layer.size == len(TAR) and layer.verified
    assert make.wholes == [layer.stream]
    assert [member.name for member in layer.members] == ["disk", "disk/disk.img"]
    assert read(layer, 0, len(TAR)) == TAR


def test_zeros_arrive_as_holes_and_the_rest_is_never_called_zero(make):
    layer = make()
    window = disk_window(layer)
    start = window.member.offset
    read(window, 3 * PIECE + 4096, 1)  # behind the front: some of the zeros
    front = layer.stream.front
    assert front < len(TAR)
    runs = layer.extents(start + 3 * PIECE, len(TAR) - start - 3 * PIECE)
    holes = [(offset, length) for offset, length, kind in runs if kind == HOLE]
    assert len(holes) == 1 and start + 3 * PIECE <= holes[0][0] \
        and holes[0][1] >= 2 * PIECE - (128 << 10), "the zeros that arrived"
    last_start, last_length, last_kind = runs[-1]
    assert last_kind == DATA and last_start <= front and last_start + last_length == len(TAR), \
        "what has not arrived is data"


def test_an_answer_cut_short_is_resumed_at_the_byte_reached(make):
    registry = Registry(BLOB, cut=len(BLOB) // 2 + 7)
    layer = make(registry)
    layer.wait_whole()
    assert read(layer, 0, len(TAR)) == TAR
    assert registry.starts == [0, len(BLOB) // 2 + 7]


def test_a_wrong_diff_id_fails_every_read(make):
    layer = make(diff_id=digest_of(b"another layer"))
    window = disk_window(layer)
    with pytest.raises(OSError) as raised:
        layer.wait_whole()
    assert raised.value.errno == errno.EIO
    assert "the layer is sha256:" in raised.value.strerror
    assert "refusing to serve it" in raised.value.strerror
    with pytest.raises(OSError, match="refusing to serve it"):
        read(window, 0, 4096)
    assert make.wholes == []


def test_a_blob_that_is_not_gzip_is_a_clear_error(make):
    layer = make(blob=b"not gzip at all" * 100)
    with pytest.raises(OSError, match="is not a valid gzip stream"):
        layer.wait_whole()


def test_a_registry_that_stays_away_fails_the_read_and_a_later_read_tries_again(
        make, monkeypatch):
    monkeypatch.setattr(arrival, "RETRY_SECONDS", 0.5)
    registry = Registry(BLOB, away=True)
    layer = make(registry)
    with pytest.raises(OSError, match="the connection was refused"):
        read(layer, 0, 512)
    registry.away = False
    window = disk_window(layer)
    assert read(window, 0, 4096) == DISK[:4096]


def test_in_the_background_a_thread_takes_in_the_rest(make):
    layer = make()
    window = disk_window(layer)
    layer.stream.start()
    layer.wait_whole()
    assert read(window, 0, len(DISK)) == DISK
    # Whole, the threads end.
    for thread in layer.stream.arrival.threads:
        thread.join(timeout=30)
        assert not thread.is_alive()


# ------------------------------------------------- the source and its disk

@pytest.fixture
def image(tmp_path):
    """image(layers) -> the table of exports of an image of LAYERS (tars)
    streamed from a registry of bytes; each closed after."""
    tables = []

    def make_table(layers, layer="disk"):
        blobs = [gzip.compress(tar, compresslevel=1) for tar in layers]
        table = streamed_image(tmp_path, NAME, [
            (blob, {"mediaType": GZIP_LAYER, "digest": digest_of(blob), "size": len(blob)},
             digest_of(tar)) for blob, tar in zip(blobs, layers)], layer=layer)
        tables.append(table)
        return table

    yield make_table
    for table in tables:
        table.close()


def test_the_disk_is_chosen_once_its_header_has_arrived(image):
    table = image([layer_tar([directory("disk/"), regular("disk/disk.img", DISK)])])
    stream = table.source.streams[0]
    assert stream.received == PIECE and not stream.listed
    assert read(table.open("disk"), 0, 4096) == DISK[:4096]


def test_the_layers_above_the_disk_are_taken_in_whole_first(image):
    table = image([layer_tar([regular("disk/disk.img", DISK)]),
                   layer_tar([regular("etc/motd", b"hello\n")])])
    base, top = table.source.streams
    assert top.listed and not base.listed
    assert table.open("disk").member.name == "disk/disk.img"


def test_a_disk_replaced_above_is_not_the_one(image):
    new = os.urandom(PIECE)
    table = image([layer_tar([regular("disk/disk.img", DISK)]),
                   layer_tar([regular("disk/disk.img", new)])])
    window = table.open("disk")
    assert window.index == 1 and read(window, 0, PIECE) == new


def test_a_second_candidate_after_the_disk_served_fails_it(image):
    table = image([layer_tar([regular("disk/a.img", DISK), regular("disk/b.img", 4096)])])
    window = table.open("disk")
    assert window.member.name == "disk/a.img"
    table.source.streams[0].wait_until(lambda: table.source.streams[0].done)
    with pytest.raises(OSError, match=r"2 candidate VM disks: disk/a.img .* "
                                      r"\(learnt after disk/a.img was served\)"):
        read(window, 0, 4096)


def test_a_layer_export_waits_for_its_layer(image):
    tar = layer_tar([regular("disk/disk.img", DISK)])
    table = image([tar], layer=0)
    layer = table.open("0")
    assert layer.size == len(tar) and read(layer, 0, len(tar)) == tar


def test_a_file_at_the_root_before_disk_arrives_is_not_chosen_early(image):
    table = image([layer_tar([regular("README", b"read me\n"), directory("disk/"),
                              regular("disk/disk.img", DISK)])])
    window = table.open("disk")
    assert window.member.name == "disk/disk.img"
    assert read(window, 0, 4096) == DISK[:4096]


def test_an_image_with_no_disk_has_no_disk_export(image):
    table = image([layer_tar([regular("etc/motd", b"hello\n")])], layer=0)
    with pytest.raises(NoSuchExport, match="no VM disk"):
        table.open("disk")
    assert "disk" not in table.names()


def test_a_bug_in_the_thread_fails_the_reads_saying_what(make):
    class Broken(Registry):
        def blob_pieces(self, digest, start, piece):
            raise ValueError("a bug")

    layer = make(Broken(BLOB))
    layer.stream.start()
    with pytest.raises(OSError, match=r"layer 0 \(sha256:.*\): fetching it: ValueError\('a bug'\)"):
        read(layer, 0, 512)


def test_a_zstd_layer_streams_too_its_frames_one_after_another(make):
    half = len(TAR) // 2
    blob = b"".join(zstandard.ZstdCompressor().compress(part) for part in (TAR[:half],
                                                                           TAR[half:]))
    layer = make(blob=blob, media_type=ZSTD_LAYER_TYPE)
    window = disk_window(layer)
    assert read(window, 0, 4096) == DISK[:4096]
    layer.wait_whole()
    assert read(layer, 0, len(TAR)) == TAR


def test_a_blob_that_is_not_zstd_is_a_clear_error(make):
    layer = make(blob=b"not zstd at all" * 100, media_type=ZSTD_LAYER_TYPE)
    with pytest.raises(OSError, match="is not a valid zstd stream"):
        layer.wait_whole()


# ------------------------------------------------ when the server stops

TRAILED = layer_tar([regular("disk/disk.img", DISK), regular("zz/after", os.urandom(4 * PIECE))])


def test_a_layer_with_little_left_is_taken_in_to_its_end_at_close(image, tmp_path):
    table = image([TRAILED])
    assert read(table.open("disk"), 0, len(DISK)) == DISK
    stream = table.source.streams[0]
    assert not stream.done, "the whole layer arrived with the disk: nothing to show"
    table.close()
    assert stream.done
    with Layout(str(tmp_path), NAME).locked() as layout:
        assert layout.manifest(NAME) is not None, "the image is not whole in the cache"


def test_a_layer_with_more_left_is_stopped_at_close(image, tmp_path, monkeypatch):
    monkeypatch.setattr("cdipy.sources.streamed_image.FINISH_AT_CLOSE", PIECE // 2)
    table = image([TRAILED])
    assert read(table.open("disk"), 0, len(DISK)) == DISK
    stream = table.source.streams[0]
    received = stream.received
    table.close()
    assert not stream.done and stream.received == received
    with Layout(str(tmp_path), NAME).locked() as layout:
        assert layout.manifest(NAME) is None
