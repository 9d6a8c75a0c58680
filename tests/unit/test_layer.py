"""The layer as an offset map: segments of bytes and of real files, read
positionally; extents from SEEK_DATA/SEEK_HOLE; what the members are."""

import errno
import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdipy.disk import describe_contents, describe_file
from cdipy.layer import (
    DATA,
    HOLE,
    FileSegment,
    Layer,
    Member,
    Window,
    clean_name,
    file_extents,
    member_from_header,
    member_kind,
)

MIB = 1 << 20
HEADER = b"H" * 512
TRAILER = b"T" * 512


@pytest.fixture
def new_layer():
    """Makes empty Layers; closes them, and the files they hold, afterwards."""
    layers = []

    def make():
        layer = Layer(0, "sha256:" + "0" * 64, "storage")
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        layer.close()


@pytest.fixture
def write_file(tmp_path):
    """Writes DATA to a new file in tmp_path; returns a read-only descriptor,
    which the caller hands to a Layer (the Layer closes it)."""
    def write(data, name="file"):
        path = tmp_path / name
        path.write_bytes(data)
        return os.open(path, os.O_RDONLY)
    return write


@pytest.fixture
def sparse_path(tmp_path):
    """A 3 MiB file: a hole, 4 KiB of data at 1 MiB, a hole to the end."""
    path = tmp_path / "sparse"
    with open(path, "wb") as file:
        file.truncate(3 * MIB)
        file.seek(MIB)
        file.write(b"d" * 4096)
    with open(path, "rb") as file:
        try:
            first_hole = os.lseek(file.fileno(), 0, os.SEEK_HOLE)
        except OSError:
            first_hole = None
    if first_hole != 0:
        pytest.skip(f"the filesystem of {tmp_path} does not report holes (SEEK_HOLE)")
    return path


@pytest.fixture
def sparse_layer(new_layer, sparse_path):
    """A 512-byte header, the sparse file, a 512-byte trailer."""
    layer = new_layer()
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(3 * MIB, fd=os.open(sparse_path, os.O_RDONLY)))
    layer.add_bytes(TRAILER)
    return layer


def read(layer, offset, count):
    buffer = bytearray(count)
    layer.read(memoryview(buffer), offset)
    return bytes(buffer)


# ------------------------------------------------------------ the offset map

def test_segments_are_laid_end_to_end(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(b"abc")
    layer.add_file(FileSegment(10, fd=write_file(b"0123456789")))
    layer.add_bytes(b"xyz")
    assert layer.starts == [0, 3, 13]
    assert layer.size == 16


def test_add_bytes_of_nothing_adds_no_segment(new_layer):
    layer = new_layer()
    layer.add_bytes(b"abc")
    layer.add_bytes(b"")
    assert layer.starts == [0]
    assert layer.size == 3


def test_add_bytes_keeps_a_copy_of_a_buffer_changed_later(new_layer):
    layer = new_layer()
    pending = bytearray(b"abc")
    layer.add_bytes(pending)
    pending[:] = b"zzz"
    assert read(layer, 0, 3) == b"abc"


# -------------------------------------------------------------------- reads

def test_read_inside_one_file_returns_its_bytes(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(1024, fd=write_file(bytes(range(256)) * 4)))
    assert read(layer, 512 + 100, 50) == bytes(range(100, 150))


def test_read_inside_one_bytes_segment_returns_its_bytes(new_layer):
    layer = new_layer()
    layer.add_bytes(b"0123456789")
    assert read(layer, 3, 4) == b"3456"


def test_read_across_segment_edges_joins_header_file_and_padding(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(b"head")
    layer.add_file(FileSegment(8, fd=write_file(b"contents")))
    layer.add_bytes(b"pad")
    assert read(layer, 2, 12) == b"adcontentspa"


def test_read_of_the_whole_layer_equals_its_segments_joined(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(b"head")
    layer.add_file(FileSegment(3, fd=write_file(b"one", "one")))
    layer.add_file(FileSegment(4, fd=write_file(b"two!", "two")))
    layer.add_bytes(b"end")
    assert read(layer, 0, layer.size) == b"headonetwo!end"


def test_read_starting_exactly_at_a_segment_edge_reads_that_segment(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(b"head")
    layer.add_file(FileSegment(8, fd=write_file(b"contents")))
    assert read(layer, 4, 3) == b"con"


def test_read_at_the_very_end_returns_the_last_bytes(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(b"head")
    layer.add_file(FileSegment(8, fd=write_file(b"contents")))
    assert read(layer, layer.size - 3, 3) == b"nts"


def test_read_inside_a_file_shorter_than_the_map_raises_eio(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(200, fd=write_file(b"x" * 100)))
    with pytest.raises(OSError) as raised:
        read(layer, 512 + 50, 100)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "unexpected end of file")


def test_read_across_the_end_of_a_file_shorter_than_the_map_raises_eio(new_layer, write_file):
    layer = new_layer()
    layer.add_file(FileSegment(200, fd=write_file(b"x" * 100)))
    layer.add_bytes(TRAILER)
    with pytest.raises(OSError) as raised:
        read(layer, 150, 100)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "unexpected end of file")


def test_read_of_a_failed_layer_raises_eio_with_the_failure(new_layer):
    layer = new_layer()
    layer.add_bytes(b"readable bytes")
    layer.failure = "layer 0 hashes to sha256:bad, not its diffID"
    with pytest.raises(OSError) as raised:
        read(layer, 0, 4)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "layer 0 hashes to sha256:bad, not its diffID")


def test_close_closes_the_files_it_holds(new_layer, write_file):
    layer = new_layer()
    fd = write_file(b"contents")
    layer.add_file(FileSegment(8, fd=fd))
    layer.close()
    with pytest.raises(OSError) as raised:
        os.fstat(fd)
    assert raised.value.errno == errno.EBADF


# ------------------------------------------------------------------ extents

def test_extents_of_a_sparse_file_are_holes_between_data(sparse_layer):
    assert sparse_layer.extents(0, sparse_layer.size) == [
        (0, 512, DATA),
        (512, MIB, HOLE),
        (512 + MIB, 4096, DATA),
        (512 + MIB + 4096, 2 * MIB - 4096, HOLE),
        (512 + 3 * MIB, 512, DATA),
    ]


def test_extents_of_bytes_segments_are_data_even_when_zero(new_layer):
    layer = new_layer()
    layer.add_bytes(bytes(1024))
    assert layer.extents(0, 1024) == [(0, 1024, DATA)]


def test_extents_of_a_range_inside_a_hole_is_one_hole(sparse_layer):
    assert sparse_layer.extents(512 + 100, 1000) == [(612, 1000, HOLE)]


def test_extents_first_only_in_a_hole_returns_one_run_at_the_offset(sparse_layer):
    assert sparse_layer.extents(612, 2 * MIB, first_only=True) == [(612, MIB - 100, HOLE)]


def test_extents_first_only_in_data_returns_one_run_at_the_offset(sparse_layer):
    offset = 512 + MIB
    assert sparse_layer.extents(offset, 2 * MIB, first_only=True) == [(offset, 4096, DATA)]


def test_extents_first_only_in_bytes_returns_the_rest_of_that_segment(sparse_layer):
    assert sparse_layer.extents(10, 10000, first_only=True) == [(10, 502, DATA)]


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_extents_tile_any_range_and_their_holes_read_as_zeros(sparse_layer, data):
    offset = data.draw(st.integers(0, sparse_layer.size - 1), label="offset")
    count = data.draw(st.integers(1, sparse_layer.size - offset), label="count")
    runs = sparse_layer.extents(offset, count)
    position = offset
    for start, length, kind in runs:
        assert start == position and length > 0
        if kind == HOLE:
            assert read(sparse_layer, start, length) == bytes(length)
        position += length
    assert position == offset + count
    assert sparse_layer.extents(offset, count, first_only=True) == runs[:1]


def test_extents_of_a_file_truncated_below_the_map_raise_eio(sparse_layer, sparse_path):
    os.truncate(sparse_path, 2 * MIB)
    with pytest.raises(OSError) as raised:
        sparse_layer.extents(0, sparse_layer.size)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "the file in storage has 2097152 bytes, the layer needs 3145728")


def test_extents_of_a_truncated_file_raise_even_for_first_only_in_a_hole(
        sparse_layer, sparse_path):
    # The missing tail would otherwise look like a hole: a client would copy zeros.
    os.truncate(sparse_path, 2 * MIB)
    with pytest.raises(OSError) as raised:
        sparse_layer.extents(512 + 2 * MIB + 10, 100, first_only=True)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "the file in storage has 2097152 bytes, the layer needs 2097262")


def test_extents_of_a_failed_layer_raise_eio_with_the_failure(sparse_layer):
    sparse_layer.failure = "cannot read layer 0: Input/output error"
    with pytest.raises(OSError) as raised:
        sparse_layer.extents(0, 512)
    assert (raised.value.errno, raised.value.strerror) == (
        errno.EIO, "cannot read layer 0: Input/output error")


def test_file_extents_after_the_last_data_is_a_hole_to_the_end(sparse_path):
    # SEEK_DATA past the last data fails with ENXIO: the rest is a hole.
    with open(sparse_path, "rb") as file:
        assert file_extents(file.fileno(), 2 * MIB, 4096) == [(2 * MIB, 4096, HOLE)]


def test_file_extents_of_a_whole_sparse_file(sparse_path):
    with open(sparse_path, "rb") as file:
        assert file_extents(file.fileno(), 0, 3 * MIB) == [
            (0, MIB, HOLE), (MIB, 4096, DATA), (MIB + 4096, 2 * MIB - 4096, HOLE)]


@pytest.mark.usefixtures("sparse_path")  # skips where the filesystem has no holes
def test_file_extents_of_a_file_with_no_data_is_one_hole(tmp_path):
    path = tmp_path / "empty-disk"
    with open(path, "wb") as file:
        file.truncate(MIB)
    with open(path, "rb") as file:
        assert file_extents(file.fileno(), 0, MIB) == [(0, MIB, HOLE)]


# ---------------------------------------------------------- what it contains

def test_describe_contents_counts_each_kind_with_plurals(new_layer):
    layer = new_layer()
    layer.members = [Member("etc", "directory", 0, 512), Member("etc/a", "file", 1, 1024),
                     Member("etc/b", "file", 1, 2048), Member("etc/.wh.c", "whiteout", 0, 2560),
                     Member("dev/null", "other", 0, 3072), Member("dev/zero", "other", 0, 3584)]
    assert describe_contents(layer) == "1 directory, 2 files, 2 other entries, 1 whiteout"


def test_describe_contents_uses_singulars_for_one_of_a_kind(new_layer):
    layer = new_layer()
    layer.members = [Member("a", "file", 1, 512), Member("b", "link", 0, 1024),
                     Member("c", "other", 0, 1536)]
    assert describe_contents(layer) == "1 file, 1 link, 1 other entry"


def test_describe_contents_of_no_members_is_empty(new_layer):
    assert describe_contents(new_layer()) == "empty"


def test_describe_contents_names_a_qcow2_disk_with_its_virtual_size(new_layer, write_file):
    qcow2 = b"QFI\xfb" + bytes(20) + (10 << 30).to_bytes(8, "big") + bytes(992)
    layer = new_layer()
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(len(qcow2), fd=write_file(qcow2)))
    layer.members = [Member("disk", "directory", 0, 0),
                     Member("disk/disk.qcow2", "file", len(qcow2), 512)]
    assert describe_contents(layer) == "disk/disk.qcow2 (qcow2, 10.0 GiB virtual)"


def test_describe_contents_gives_a_raw_disk_its_size(new_layer, write_file):
    layer = new_layer()
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(MIB, fd=write_file(bytes(MIB))))
    layer.members = [Member("disk/disk.img", "file", MIB, 512)]
    assert describe_contents(layer) == "disk/disk.img (raw, 1.0 MiB)"


def test_describe_contents_of_a_disk_too_small_for_a_header_gives_its_size(new_layer):
    layer = new_layer()
    layer.add_bytes(HEADER + b"QFI\xfb")
    layer.members = [Member("disk/tiny.img", "file", 4, 512)]
    assert describe_contents(layer) == "disk/tiny.img (raw, 4 bytes)"


def test_describe_contents_of_an_unreadable_disk_says_why(new_layer, write_file):
    layer = new_layer()
    layer.add_file(FileSegment(MIB, fd=write_file(bytes(MIB))))
    layer.members = [Member("disk/disk.img", "file", MIB, 0)]
    layer.failure = "digest mismatch"
    assert describe_contents(layer) == "disk/disk.img (1.0 MiB, unreadable: digest mismatch)"


def test_only_regular_files_under_disk_are_disks():
    assert Member("disk/disk.img", "file", 1, 0).is_disk()
    assert not Member("disk/disk.img", "link", 0, 0).is_disk()
    assert not Member("disk", "directory", 0, 0).is_disk()
    assert not Member("var/disk/disk.img", "file", 1, 0).is_disk()


def test_member_kind_of_a_whiteout_file():
    assert member_kind("etc/.wh.passwd", b"0") == "whiteout"


def test_member_kind_of_an_opaque_directory_marker():
    assert member_kind("etc/.wh..wh..opq", b"0") == "whiteout"


def test_member_kind_of_a_whiteout_with_a_trailing_slash():
    assert member_kind("etc/.wh.old/", b"5") == "whiteout"


def test_member_kind_of_a_name_ending_in_slash_is_directory_whatever_its_flag():
    assert member_kind("etc/", b"0") == "directory"


def test_member_kind_by_type_flag():
    kinds = {flag: member_kind("name", flag) for flag in (b"0", b"\0", b"7", b"5", b"1", b"2")}
    assert kinds == {b"0": "file", b"\0": "file", b"7": "file", b"5": "directory",
                     b"1": "link", b"2": "link"}


def test_member_kind_of_an_unknown_type_flag_is_other():
    assert [member_kind("dev/x", flag) for flag in (b"3", b"4", b"6", b"")] == ["other"] * 4


def test_member_from_header_reads_the_type_flag_of_a_real_tar_header():
    info = tarfile.TarInfo("usr/bin/sh")
    info.type, info.linkname = tarfile.SYMTYPE, "bash"
    header = info.tobuf(format=tarfile.USTAR_FORMAT)[:tarfile.BLOCKSIZE]
    member = member_from_header(header, "usr/bin/sh", 0, 1024)
    assert (member.name, member.kind, member.size, member.offset) == (
        "usr/bin/sh", "link", 0, 1024)


def test_member_from_header_of_a_truncated_header_is_other():
    header = tarfile.TarInfo("etc/passwd").tobuf()[:100]
    assert member_from_header(header, "etc/passwd", 5, 512).kind == "other"


def test_clean_name_strips_leading_dot_slashes():
    assert clean_name(b"./etc/passwd") == "etc/passwd"
    assert clean_name(b"././etc/passwd") == "etc/passwd"


def test_clean_name_keeps_inner_dot_slashes_and_hidden_files():
    assert clean_name(b"etc/./passwd") == "etc/./passwd"
    assert clean_name(b".hidden") == ".hidden"


def test_clean_name_keeps_names_that_are_not_utf8_reversibly():
    assert os.fsencode(clean_name(b"./caf\xe9")) == b"caf\xe9"


# ------------------------------------------------------------------ windows

def window_onto_a_copy(new_layer, write_file, tmp_path):
    """A layer that is one file (as a copy is): a header, a 2 MiB disk with
    a hole at its second MiB, a trailer; and the window onto the disk.
    Each part is a whole number of filesystem blocks."""
    path = tmp_path / "copy"
    with open(path, "wb") as file:
        file.write(HEADER * 8 + b"D" * MIB)
        file.truncate(4096 + 2 * MIB)
        file.seek(0, os.SEEK_END)
        file.write(TRAILER * 8)
    layer = new_layer()
    layer.add_file(FileSegment(8192 + 2 * MIB, fd=os.open(path, os.O_RDONLY)))
    layer.members = [Member("disk/disk.img", "file", 2 * MIB, 4096)]
    return layer, Window(layer, layer.members[0], "the only one")


def test_a_window_reads_its_file_alone_from_its_offset(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    assert (window.size, isinstance(window, Window), window.index) == (2 * MIB, True, 0)
    view = bytearray(2 * MIB)
    window.read(memoryview(view), 0)
    assert view == b"D" * MIB + bytes(MIB)
    window.close()


def test_a_window_gives_the_extents_of_its_file(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    assert window.extents(0, 2 * MIB) == [(0, MIB, DATA), (MIB, MIB, HOLE)]
    window.close()


def test_a_window_has_descriptors_of_its_own(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    layer.close()
    view = bytearray(4)
    window.read(memoryview(view), 0)
    assert view == b"DDDD"
    window.close()


def test_a_failed_layer_fails_its_windows(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    layer.fail("layer 0 hashes to something else")
    with pytest.raises(OSError, match="hashes to something else"):
        window.read(memoryview(bytearray(4)), 0)
    window.close()


def test_zeros_known_in_the_layer_are_known_in_its_windows(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    layer.learn_zeros([(0, 5000), (4096 + MIB - 4096, 4096 + MIB + 4096)])
    assert window.zeros == [(0, 904), (MIB - 4096, MIB + 4096)]
    window.close()


def test_a_window_describes_its_file(new_layer, write_file, tmp_path):
    layer, window = window_onto_a_copy(new_layer, write_file, tmp_path)
    assert describe_file(window) == "raw, 2.0 MiB"
    window.close()
