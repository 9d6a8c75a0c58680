"""Serving a layer from podman's overlay storage: tar-split parsing, the
rebuilt tar on real files in tmp_path, and the chain of layers.

A layer in storage here is made the way podman keeps one: a tar made with
the tarfile module is unpacked into a diff directory, and its headers and
padding go into a gzipped tar-split beside it."""

import base64
import contextlib
import errno
import gzip
import io
import json
import os
import tarfile

import pytest

from cdipy import storage
from cdipy.cache import PrivateCache
from cdipy.disk import describe_contents
from cdipy.errors import StorageUnavailable
from cdipy.storage import StoragePlan, layer_chain, storage_layer, storage_plans, tar_split_entries
from cdipy.verify import fingerprint
from tars import directory, layer_tar, regular, symlink

DIFF_ID = "sha256:" + "a" * 64
DISK = bytes(range(256)) * 19 + b"tail"       # 4868 bytes: its last block is padded
HOSTNAME = b"builder\n"


# ------------------------------------------------------ making storage layers

LAYER_ENTRIES = [directory("etc"), regular("etc/hostname", HOSTNAME), regular("etc/empty", b""),
                 symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
                 directory("disk"), regular("disk/disk.img", DISK)]


def segment(data):
    return {"type": 2, "payload": base64.b64encode(data).decode(), "position": 0}


def tar_split_lines(tar):
    """The tar-split of TAR: per member its headers (type 2), its name and
    size (type 1), then its padding (type 2); the end blocks last."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = archive.getmembers()
    lines, position = [], 0
    for member in members:
        lines.append(segment(tar[position:member.offset_data]))
        name = member.name + "/" if member.isdir() else member.name
        lines.append({"type": 1, "name": name, "size": member.size, "position": 1})
        position = member.offset_data + member.size
        padded = -(-position // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        lines.append(segment(tar[position:padded]))
        position = padded
    lines.append(segment(tar[position:]))
    return lines


def write_tar_split(path, lines):
    path.write_bytes(gzip.compress(b"".join(json.dumps(line).encode() + b"\n"
                                            for line in lines)))
    return str(path)


def handmade_plan(tmp_path, lines):
    """The StoragePlan of tmp_path/diff, with a tar-split of LINES."""
    tar_split = write_tar_split(tmp_path / "handmade.tar-split.gz", lines)
    return StoragePlan(str(tmp_path / "diff"), tar_split, None)


def unpack(entries, diff_dir):
    """Make DIFF_DIR hold ENTRIES, as podman unpacks a layer."""
    diff_dir.mkdir(parents=True)
    for info, data in entries:
        path = diff_dir / info.name
        if info.isdir():
            path.mkdir()
        elif info.issym():
            path.symlink_to(info.linkname)
        else:
            path.write_bytes(data)


@pytest.fixture
def stored(tmp_path):
    """(the tar, its StoragePlan) of LAYER_ENTRIES unpacked in tmp_path."""
    tar = layer_tar(LAYER_ENTRIES)
    unpack(LAYER_ENTRIES, tmp_path / "diff")
    tar_split = write_tar_split(tmp_path / "layer.tar-split.gz", tar_split_lines(tar))
    return tar, StoragePlan(str(tmp_path / "diff"), tar_split, len(tar))


def read_all(layer):
    buffer = bytearray(layer.size)
    layer.read(memoryview(buffer), 0)
    return bytes(buffer)


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def entries_of(text, path="/s/l.tar-split.gz"):
    return list(tar_split_entries(io.BytesIO(text), path))


# ---------------------------------------------------------------- tar-split

def test_tar_split_segment_yields_its_decoded_payload():
    assert entries_of(b'{"type": 2, "payload": "aGVsbG8=", "position": 0}\n') == [
        (b"hello", None, 0)]


def test_tar_split_segment_without_payload_yields_no_bytes():
    assert entries_of(b'{"type": 2, "payload": null}\n') == [(b"", None, 0)]


def test_tar_split_file_yields_its_name_as_bytes_and_its_size():
    assert entries_of(b'{"type": 1, "name": "etc/hostname", "size": 8}\n') == [
        (None, b"etc/hostname", 8)]


def test_tar_split_file_name_raw_wins_over_name():
    raw = base64.b64encode(b"caf\xe9").decode()
    line = json.dumps({"type": 1, "name": "caf\ufffd", "name_raw": raw, "size": 1})
    assert entries_of(line.encode()) == [(None, b"caf\xe9", 1)]


def test_tar_split_file_without_size_has_size_zero():
    assert entries_of(b'{"type": 1, "name": "etc/"}\n') == [(None, b"etc/", 0)]


def test_tar_split_entries_come_in_stream_order():
    text = b'{"type": 2, "payload": "AA=="}\n{"type": 1, "name": "a", "size": 1}\n'
    assert entries_of(text) == [(b"\0", None, 0), (None, b"a", 1)]


def gzip_damaged(text, damage):
    """TEXT gzipped (100 times over), then DAMAGE(bytearray) done to it."""
    compressed = bytearray(gzip.compress(text * 100))
    damage(compressed)
    return bytes(compressed)


def cut_short(compressed):
    del compressed[-12:]


def flip_checksum(compressed):
    compressed[-8] ^= 0xFF   # the CRC-32 of the trailer


def flip_deflate_bytes(compressed):
    compressed[12:16] = b"\xff\xff\xff\xff"   # a reserved block type


SEGMENT = b'{"type": 2, "payload": "AA=="}\n'
# Every way a tar-split can be corrupt: (what is wrong, the tar-split as
# plain lines or as damaged gzip, the message, and whether it is the whole
# message or its start).  Each must surface as StorageUnavailable naming the
# file, never as another exception, so that the copy path takes over.
TAR_SPLIT_ERRORS = [
    ("bad json", b"not json\n", "Expecting value: ", "start"),
    # Every corrupt tar-split names the file; the copy path's log line
    # ("cannot serve from podman's storage (...)") says which one.
    ("unknown entry type", b'{"type": 3, "payload": null}\n', "entry of type 3", "whole"),
    ("entry without a type", b'{"payload": "AA=="}\n', "'type'", "whole"),
    ("file without a name", b'{"type": 1, "size": 3}\n', "'name'", "whole"),
    ("entry not an object", b"[2]\n", "", "start"),
    ("payload not base64", b'{"type": 2, "payload": "no spaces!"}\n',
     "Only base64 data is allowed", "whole"),
    ("name_raw not base64", b'{"type": 1, "name_raw": "%%%", "size": 1}\n',
     "Only base64 data is allowed", "whole"),
    ("negative size", b'{"type": 1, "name": "a", "size": -1}\n', "size -1", "whole"),
    ("size not an integer", b'{"type": 1, "name": "a", "size": "12"}\n', "size '12'", "whole"),
    ("gzip cut short", gzip_damaged(SEGMENT, cut_short),
     "Compressed file ended before the end-of-stream marker was reached", "whole"),
    ("gzip with a bad checksum", gzip_damaged(SEGMENT, flip_checksum), "CRC check failed",
     "start"),
    ("gzip with flipped deflate bytes", gzip_damaged(SEGMENT, flip_deflate_bytes),
     "Error -3 ", "start"),
]


@pytest.mark.parametrize("data, message, how", [row[1:] for row in TAR_SPLIT_ERRORS],
                         ids=[row[0] for row in TAR_SPLIT_ERRORS])
def test_a_corrupt_tar_split_is_refused_naming_the_file(data, message, how):
    with contextlib.ExitStack() as opened, pytest.raises(StorageUnavailable) as raised:
        stream = io.BytesIO(data)
        if data.startswith(b"\x1f\x8b"):
            stream = opened.enter_context(gzip.open(stream, "rb"))
        list(tar_split_entries(stream, "/s/l.tar-split.gz"))
    expected = f"unreadable tar-split /s/l.tar-split.gz: {message}"
    if how == "whole":
        assert str(raised.value) == expected
    else:
        assert str(raised.value).startswith(expected)


def test_tar_split_every_single_byte_flip_is_refused_or_harmless():
    # A flip in the gzip header's time or OS bytes changes nothing; any
    # other is caught by gzip, zlib or the checksum, and must surface as
    # StorageUnavailable so that the copy path takes over.
    lines = tar_split_lines(layer_tar([regular("a", b"x" * 600), directory("d")]))
    text = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    compressed = gzip.compress(text, mtime=0)
    expected = entries_of(text)
    refused = 0
    for position in range(len(compressed)):
        corrupt = bytearray(compressed)
        corrupt[position] ^= 0xFF
        try:
            with gzip.open(io.BytesIO(bytes(corrupt)), "rb") as stream:
                assert list(tar_split_entries(stream, "/s/x")) == expected
        except StorageUnavailable:
            refused += 1
    assert refused > len(compressed) - 10


# ---------------------------------------------------- rebuilding the layer

def test_storage_layer_rebuilds_the_original_tar_exactly(stored):
    tar, plan = stored
    with contextlib.closing(storage_layer(2, DIFF_ID, plan)) as layer:
        assert (layer.index, layer.digest, layer.served_from) == (2, DIFF_ID, "storage")
        assert layer.size == len(tar)
        assert read_all(layer) == tar


def test_storage_layer_lists_the_members_with_kind_size_and_data_offset(stored):
    tar, plan = stored
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        offsets = {member.name: member.offset_data for member in archive.getmembers()}
    with contextlib.closing(storage_layer(0, DIFF_ID, plan)) as layer:
        assert [(m.name, m.kind, m.size, m.offset) for m in layer.members] == [
            ("etc/", "directory", 0, offsets["etc"]),
            ("etc/hostname", "file", len(HOSTNAME), offsets["etc/hostname"]),
            ("etc/empty", "file", 0, offsets["etc/empty"]),
            ("etc/localtime", "link", 0, offsets["etc/localtime"]),
            ("disk/", "directory", 0, offsets["disk"]),
            ("disk/disk.img", "file", len(DISK), offsets["disk/disk.img"]),
        ]
        assert describe_contents(layer) == "disk/disk.img (raw, 4.8 KiB)"


def test_storage_layer_serves_files_from_the_diff_directory(stored, tmp_path):
    _, plan = stored
    (tmp_path / "diff" / "disk" / "disk.img").write_bytes(DISK.upper())  # same size
    with contextlib.closing(storage_layer(0, DIFF_ID, plan)) as layer:
        [disk] = [member for member in layer.members if member.is_disk()]
        data = bytearray(disk.size)
        layer.read(memoryview(data), disk.offset)
        assert bytes(data) == DISK.upper()


def test_storage_layer_keeps_serving_after_the_files_are_removed(stored, tmp_path):
    tar, plan = stored
    with contextlib.closing(storage_layer(0, DIFF_ID, plan)) as layer:
        (tmp_path / "diff" / "disk" / "disk.img").unlink()
        (tmp_path / "diff" / "etc" / "hostname").unlink()
        assert read_all(layer) == tar


def test_storage_layer_with_a_file_of_the_wrong_size_is_unavailable(stored, tmp_path):
    _, plan = stored
    (tmp_path / "diff" / "disk" / "disk.img").write_bytes(DISK[:-1])
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == ("b'disk/disk.img' in storage is not the 4868-byte file "
                                 "the tar-split says")


def test_storage_layer_with_a_missing_file_is_unavailable(stored, tmp_path):
    _, plan = stored
    (tmp_path / "diff" / "etc" / "hostname").unlink()
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "cannot open b'etc/hostname': No such file or directory"


def test_storage_layer_opens_names_with_dot_slash_and_cleans_them(tmp_path):
    (tmp_path / "diff" / "etc").mkdir(parents=True)
    (tmp_path / "diff" / "etc" / "hostname").write_bytes(b"abc")
    plan = handmade_plan(tmp_path, [segment(b"h" * 512),
                                    {"type": 1, "name": "./etc/hostname", "size": 3},
                                    segment(bytes(509))])
    with contextlib.closing(storage_layer(0, DIFF_ID, plan)) as layer:
        assert [(m.name, m.offset) for m in layer.members] == [("etc/hostname", 512)]
        assert read_all(layer) == b"h" * 512 + b"abc" + bytes(509)


def test_storage_layer_opens_a_file_whose_name_is_not_utf8(tmp_path):
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / os.fsdecode(b"caf\xe9")).write_bytes(b"abc")
    raw = base64.b64encode(b"caf\xe9").decode()
    plan = handmade_plan(tmp_path, [segment(b"h" * 512),
                                    {"type": 1, "name": "caf\ufffd", "name_raw": raw, "size": 3},
                                    segment(bytes(509))])
    with contextlib.closing(storage_layer(0, DIFF_ID, plan)) as layer:
        assert os.fsencode(layer.members[0].name) == b"caf\xe9"
        assert read_all(layer) == b"h" * 512 + b"abc" + bytes(509)


def test_storage_layer_refuses_a_name_with_dot_dot(tmp_path):
    (tmp_path / "diff").mkdir()
    (tmp_path / "secret").write_bytes(b"abc")
    plan = handmade_plan(tmp_path, [segment(bytes(512)),
                                    {"type": 1, "name": "../secret", "size": 3}])
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "unsafe name b'../secret' in the tar-split"


def test_storage_layer_refuses_a_name_with_no_path(tmp_path):
    (tmp_path / "diff").mkdir()
    plan = handmade_plan(tmp_path, [segment(bytes(512)), {"type": 1, "name": "./", "size": 3}])
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "unsafe name b'./' in the tar-split"


def test_storage_layer_does_not_follow_a_symlinked_directory(stored, tmp_path):
    _, plan = stored
    disk_dir = tmp_path / "diff" / "disk"
    disk_dir.rename(tmp_path / "elsewhere")
    disk_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "cannot open b'disk/disk.img': Not a directory"


def test_storage_layer_does_not_follow_a_symlinked_file(stored, tmp_path):
    _, plan = stored
    disk = tmp_path / "diff" / "disk" / "disk.img"
    disk.rename(tmp_path / "disk.img")
    disk.symlink_to(tmp_path / "disk.img")
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "cannot open b'disk/disk.img': Too many levels of symbolic links"


def test_storage_layer_of_a_different_size_than_storage_says_is_unavailable(stored):
    tar, plan = stored
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, StoragePlan(plan.diff_dir, plan.tar_split, len(tar) + 512))
    assert str(raised.value) == f"rebuilt {len(tar)} bytes, storage says {len(tar) + 512}"


def test_storage_layer_without_its_tar_split_is_unavailable(stored, tmp_path):
    _, plan = stored
    missing = str(tmp_path / "missing.tar-split.gz")
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, StoragePlan(plan.diff_dir, missing, None))
    assert str(raised.value) == f"cannot read {missing}: No such file or directory"


def test_storage_layer_without_its_diff_directory_is_unavailable(stored, tmp_path):
    _, plan = stored
    missing = str(tmp_path / "missing")
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, StoragePlan(missing, plan.tar_split, None))
    assert str(raised.value) == f"cannot open {missing}: No such file or directory"


def test_storage_layer_with_a_corrupt_tar_split_names_it(stored, tmp_path):
    _, plan = stored
    compressed = (tmp_path / "layer.tar-split.gz").read_bytes()
    (tmp_path / "layer.tar-split.gz").write_bytes(compressed[:len(compressed) // 2])
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value).startswith(f"unreadable tar-split {plan.tar_split}: ")


def test_storage_layer_with_more_headers_than_memory_allows_is_unavailable(
        stored, monkeypatch):
    _, plan = stored
    monkeypatch.setattr(storage, "MAX_HEADER_BYTES", 2048)
    with pytest.raises(StorageUnavailable) as raised:
        storage_layer(0, DIFF_ID, plan)
    assert str(raised.value) == "too many headers to keep in memory"


def test_storage_layer_that_fails_late_leaves_no_descriptor_open(stored, tmp_path):
    _, plan = stored
    (tmp_path / "diff" / "disk" / "disk.img").write_bytes(DISK + b"!")  # the last file
    before = open_descriptors()
    with pytest.raises(StorageUnavailable, match="is not the 4868-byte file"):
        storage_layer(0, DIFF_ID, plan)
    assert open_descriptors() == before


def test_storage_layer_close_releases_every_descriptor(stored):
    _, plan = stored
    before = open_descriptors()
    storage_layer(0, DIFF_ID, plan).close()
    assert open_descriptors() == before


# --------------------------------------------------- the chain of layers

# ------------------------------------------------- big layers, opened lazily

@pytest.fixture
def many(tmp_path, monkeypatch):
    """(the tar, its StoragePlan) of a layer of 40 files, with the limits
    lowered so that it counts as big: files opened on demand, 8 at most."""
    monkeypatch.setattr(storage, "EAGER_FILES", 10)
    monkeypatch.setattr(storage, "LAZY_OPEN_FILES", 8)
    entries = [directory("many")] + [regular(f"many/{index}", os.urandom(700 + index))
                                     for index in range(40)]
    tar = layer_tar(entries)
    unpack(entries, tmp_path / "diff")
    tar_split = write_tar_split(tmp_path / "many.tar-split.gz", tar_split_lines(tar))
    return tar, StoragePlan(str(tmp_path / "diff"), tar_split, len(tar))


def test_big_layer_is_built_without_opening_its_files(many):
    before = open_descriptors()
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1])) as layer:
        assert open_descriptors() == before + 1  # its directory
        assert all(segment.fd is None for segment in layer.files())


def test_big_layer_reads_exactly_with_few_files_open(many):
    before = open_descriptors()
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1])) as layer:
        assert read_all(layer) == many[0]
        assert open_descriptors() <= before + 1 + 8
    assert open_descriptors() == before


def test_big_layer_file_removed_before_its_first_read_fails_with_eio(many, tmp_path):
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1])) as layer:
        (tmp_path / "diff/many/39").unlink()
        with pytest.raises(OSError) as failure:
            read_all(layer)
        assert failure.value.errno == errno.EIO
        assert "cannot open b'many/39' in storage: No such file or directory" in str(
            failure.value)


def test_big_layer_file_replaced_after_its_check_fails_with_eio(many, tmp_path):
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1])) as layer:
        fingerprint(layer)  # what the digest check records
        read_all(layer)     # file 0 is closed again to make room
        path = tmp_path / "diff/many/0"
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)  # the same bytes, another file
        with pytest.raises(OSError) as failure:
            read_all(layer)
        assert "b'many/0' in storage is not the file the layer was built from" in str(
            failure.value)


def test_big_layer_map_is_cached_and_serves_the_same_bytes(many, tmp_path):
    maps = PrivateCache(str(tmp_path / "maps"))
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1], maps=maps)) as first:
        members = [(m.name, m.kind, m.size, m.offset) for m in first.members]
    (entry,) = (tmp_path / "maps").iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1], maps=maps)) as second:
        assert read_all(second) == many[0]
        assert [(m.name, m.kind, m.size, m.offset) for m in second.members] == members


def test_big_layer_map_cached_corrupt_is_made_again(many, tmp_path):
    maps = PrivateCache(str(tmp_path / "maps"))
    storage_layer(0, DIFF_ID, many[1], maps=maps).close()
    (entry,) = (tmp_path / "maps").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    with contextlib.closing(storage_layer(0, DIFF_ID, many[1], maps=maps)) as layer:
        assert read_all(layer) == many[0]


def test_big_layer_map_is_not_taken_for_a_rewritten_tar_split(many, tmp_path):
    maps = PrivateCache(str(tmp_path / "maps"))
    storage_layer(0, DIFF_ID, many[1], maps=maps).close()
    os.utime(many[1].tar_split, ns=(1, 1))
    storage_layer(0, DIFF_ID, many[1], maps=maps).close()
    assert len(list((tmp_path / "maps").iterdir())) == 2


def test_storage_layer_with_a_path_twice_is_unavailable(tmp_path):
    # Storage keeps the last "a" only: the first would be served its bytes.
    entries = [regular("a", b"first"), regular("a", b"later")]
    tar = layer_tar(entries)
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / "a").write_bytes(b"later")
    plan = StoragePlan(str(tmp_path / "diff"),
                       write_tar_split(tmp_path / "l.tar-split.gz", tar_split_lines(tar)), None)
    with pytest.raises(StorageUnavailable, match="'a' is in the layer twice"):
        storage_layer(0, DIFF_ID, plan)


def test_layer_chain_refuses_an_id_that_is_not_a_file_name():
    records = {"../x": {"id": "../x"}}
    with pytest.raises(StorageUnavailable, match="unexpected layer ID '../x' in layers.json"):
        layer_chain(records, "../x")


def test_big_layer_with_an_unsafe_name_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "EAGER_FILES", 0)
    lines = [segment(b"h" * 512), {"type": 1, "name": "../x", "size": 3, "position": 1}]
    with pytest.raises(StorageUnavailable, match="unsafe name b'../x' in the tar-split"):
        storage_layer(0, DIFF_ID, handmade_plan(tmp_path, lines))


def test_layer_chain_follows_parents_down_to_the_base():
    records = {"top": {"id": "top", "parent": "mid"}, "mid": {"id": "mid", "parent": "base"},
               "base": {"id": "base"}, "other": {"id": "other"}}
    assert [record["id"] for record in layer_chain(records, "top")] == ["base", "mid", "top"]


def test_layer_chain_with_a_missing_parent_names_it():
    records = {"top": {"id": "top", "parent": "gone"}}
    with pytest.raises(StorageUnavailable) as raised:
        layer_chain(records, "top")
    assert str(raised.value) == "layer gone is not in layers.json"


def test_layer_chain_with_a_cycle_is_refused():
    records = {"a": {"id": "a", "parent": "b"}, "b": {"id": "b", "parent": "a"}}
    with pytest.raises(StorageUnavailable) as raised:
        layer_chain(records, "a")
    assert str(raised.value) == "layer a is not in layers.json"


# ------------------------------------------------------------ storage_plans

@pytest.fixture
def overlay_root(tmp_path):
    """A storage root with layers base <- top in overlay-layers/layers.json."""
    (tmp_path / "overlay-layers").mkdir()
    (tmp_path / "overlay-layers" / "layers.json").write_text(json.dumps([
        {"id": "top", "parent": "base", "diff-digest": "sha256:" + "2" * 64, "diff-size": 2048},
        {"id": "base", "diff-digest": "sha256:" + "1" * 64, "diff-size": 1024}]))
    return tmp_path


def overlay_image(root, top="top"):
    return {"GraphDriver": {"Name": "overlay",
                            "Data": {"UpperDir": str(root / "overlay" / top / "diff")}},
            "RootFS": {"Layers": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]}}


def test_storage_plans_locate_each_layer_base_first(overlay_root):
    root = overlay_root
    assert storage_plans(overlay_image(root)) == [
        StoragePlan(f"{root}/overlay/base/diff",
                    f"{root}/overlay-layers/base.tar-split.gz", 1024),
        StoragePlan(f"{root}/overlay/top/diff",
                    f"{root}/overlay-layers/top.tar-split.gz", 2048)]


def vfs_root(tmp_path, records):
    (tmp_path / "vfs-layers").mkdir()
    (tmp_path / "vfs-layers" / "layers.json").write_text(json.dumps(records))
    return tmp_path


VFS_IMAGE = {"GraphDriver": {"Name": "vfs", "Data": None},
             "RootFS": {"Layers": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]}}


def test_storage_plans_on_vfs_follow_the_chain_of_the_diff_ids(tmp_path):
    # Two layers with the top's digest: only one is the child of the base.
    root = vfs_root(tmp_path, [
        {"id": "other", "parent": "elsewhere", "diff-digest": "sha256:" + "2" * 64},
        {"id": "top", "parent": "base", "diff-digest": "sha256:" + "2" * 64, "diff-size": 9},
        {"id": "base", "diff-digest": "sha256:" + "1" * 64, "diff-size": 8}])
    assert storage_plans(VFS_IMAGE, str(root)) == [
        StoragePlan(f"{root}/vfs/dir/base", f"{root}/vfs-layers/base.tar-split.gz", 8),
        StoragePlan(f"{root}/vfs/dir/top", f"{root}/vfs-layers/top.tar-split.gz", 9)]


def test_storage_plans_on_vfs_without_the_chain_name_the_missing_layer(tmp_path):
    root = vfs_root(tmp_path, [{"id": "base", "diff-digest": "sha256:" + "1" * 64}])
    with pytest.raises(StorageUnavailable, match="no layer sha256:2{64} in layers.json"):
        storage_plans(VFS_IMAGE, str(root))


def test_storage_plans_of_another_driver_are_unavailable():
    image = {"GraphDriver": {"Name": "btrfs"}, "RootFS": {"Layers": []}}
    with pytest.raises(StorageUnavailable) as raised:
        storage_plans(image)
    assert str(raised.value) == "storage driver 'btrfs' is not overlay or vfs"


def test_storage_plans_of_an_unexpected_layer_directory_are_unavailable():
    image = {"GraphDriver": {"Name": "overlay", "Data": {"UpperDir": "/srv/layer/upper"}}}
    with pytest.raises(StorageUnavailable) as raised:
        storage_plans(image)
    assert str(raised.value) == "unexpected layer directory '/srv/layer/upper'"


def test_storage_plans_whose_chain_differs_from_the_diff_ids_are_unavailable(overlay_root):
    image = overlay_image(overlay_root)
    image["RootFS"]["Layers"].reverse()
    with pytest.raises(StorageUnavailable) as raised:
        storage_plans(image)
    assert str(raised.value) == "storage layers do not match the image's diffIDs"


def test_storage_plans_without_layers_json_are_unavailable(tmp_path):
    with pytest.raises(StorageUnavailable) as raised:
        storage_plans(overlay_image(tmp_path))
    assert str(raised.value) == (
        "cannot read layers.json: [Errno 2] No such file or directory: "
        f"'{tmp_path}/overlay-layers/layers.json'")
