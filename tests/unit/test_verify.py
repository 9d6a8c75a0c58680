"""Checking a layer against its diffID, the zeros found on the way, and
the records of layers that passed."""

import hashlib
import json
import os

import pytest

from cdipy.cache import PrivateCache
from cdipy.errors import CdiError
from cdipy.layer import DATA, HOLE, ZERO, FileSegment, Layer, split_zeros
from cdipy.verify import CheckRecords, check_and_remember, check_digest, note_zeros, recall_check

BLOCK = 64 << 10
HEADER = b"h" * 512


@pytest.fixture
def disk_layer(tmp_path):
    """A layer: a 512-byte header, then a file of 4 blocks whose 2nd and 3rd
    are zeros.  Closed at the end."""
    data = os.urandom(BLOCK) + bytes(2 * BLOCK) + os.urandom(BLOCK)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    content = HEADER + data
    layer = Layer(0, "sha256:" + hashlib.sha256(content).hexdigest(), "storage")
    layer.add_bytes(HEADER)
    layer.add_file(FileSegment(len(data), fd=os.open(path, os.O_RDONLY)))
    yield layer
    layer.close()


def test_check_finds_the_all_zero_blocks_of_the_layer(disk_layer):
    # Blocks are aligned in the layer: the zeros start 512 bytes into one.
    assert check_digest(disk_layer, "img") == [(2 * BLOCK, 3 * BLOCK)]


def test_check_of_a_layer_not_matching_its_diff_id_fails_every_read(disk_layer):
    disk_layer.digest = "sha256:" + "0" * 64
    with pytest.raises(CdiError, match="img: verify: layer 0 hashes to sha256:"):
        check_digest(disk_layer, "img")
    with pytest.raises(OSError, match="refusing to serve it"):
        disk_layer.read(memoryview(bytearray(1)), 0)


def test_note_zeros_merges_blocks_across_chunks_and_keeps_a_short_tail():
    zeros = []
    note_zeros(bytearray(2 * BLOCK), 2 * BLOCK, 0, zeros)
    note_zeros(bytearray(100), 100, 2 * BLOCK, zeros)
    assert zeros == [[0, 2 * BLOCK + 100]]


def test_note_zeros_skips_a_block_with_one_byte_set():
    buffer = bytearray(2 * BLOCK)
    buffer[BLOCK + 7] = 1
    zeros = []
    note_zeros(buffer, len(buffer), 0, zeros)
    assert zeros == [[0, BLOCK]]


def test_split_zeros_turns_only_data_inside_zero_ranges_into_zero():
    runs = [(0, 100, DATA), (100, 50, HOLE), (150, 100, DATA)]
    assert split_zeros(runs, [(20, 40), (120, 200)]) == [
        (0, 20, DATA), (20, 20, ZERO), (40, 60, DATA), (100, 50, HOLE),
        (150, 50, ZERO), (200, 50, DATA)]


def test_extents_report_known_zeros_once_the_check_passed(disk_layer):
    assert {kind for _, _, kind in disk_layer.extents(0, disk_layer.size)} == {DATA}
    disk_layer.zeros = check_digest(disk_layer, "img")
    assert disk_layer.extents(0, disk_layer.size) == [
        (0, 2 * BLOCK, DATA), (2 * BLOCK, BLOCK, ZERO),
        (3 * BLOCK, disk_layer.size - 3 * BLOCK, DATA)]


def test_a_layer_that_passed_is_remembered_with_its_zeros(disk_layer, tmp_path):
    records = CheckRecords(PrivateCache(str(tmp_path / "checked")))
    check_and_remember(disk_layer, "img", records)
    disk_layer.zeros = ()
    assert recall_check(disk_layer, records)
    assert disk_layer.zeros == [(2 * BLOCK, 3 * BLOCK)]
    assert oct(os.stat(tmp_path / "checked").st_mode & 0o777) == "0o700"


def test_a_file_touched_since_the_check_is_not_remembered(disk_layer, tmp_path):
    records = CheckRecords(PrivateCache(str(tmp_path / "checked")))
    check_and_remember(disk_layer, "img", records)
    os.utime(tmp_path / "disk.img", ns=(1, 1))
    assert not recall_check(disk_layer, records)


def test_a_record_others_may_write_is_ignored(disk_layer, tmp_path):
    records = CheckRecords(PrivateCache(str(tmp_path / "checked")))
    check_and_remember(disk_layer, "img", records)
    (path,) = (tmp_path / "checked").iterdir()
    os.chmod(path, 0o666)
    assert not recall_check(disk_layer, records)


def test_a_record_of_another_layer_is_ignored(disk_layer, tmp_path):
    records = CheckRecords(PrivateCache(str(tmp_path / "checked")))
    check_and_remember(disk_layer, "img", records)
    (path,) = (tmp_path / "checked").iterdir()
    record = json.loads(path.read_text())
    record["diff_id"] = "sha256:" + "1" * 64
    path.write_text(json.dumps(record))
    assert not recall_check(disk_layer, records)


def test_a_diff_id_that_is_not_a_sha256_is_never_a_file_name(tmp_path):
    records = CheckRecords(PrivateCache(str(tmp_path / "checked")))
    records.store("sha256:../../escape", "print", [])
    assert not (tmp_path / "checked").exists()
    assert not (tmp_path / "escape.json").exists()


def test_no_cache_directory_remembers_nothing(disk_layer):
    records = CheckRecords(PrivateCache(None))
    check_and_remember(disk_layer, "img", records)
    assert not recall_check(disk_layer, records)
