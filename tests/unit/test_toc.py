"""The TOC of a seekable layer (cdipy.oci.toc): zstd:chunked of both
annotation generations and eStargz, made byte by byte (tests/seekable.py),
read back into each file's chunks, each chunk decompressed alone and
checked; each lie a TOC can tell refused with one line naming the image,
the layer and the fault."""

import os
import re

import pytest

import seekable
from cdipy.errors import CdiError
from cdipy.layer import Member
from cdipy.oci import toc as toc_module
from cdipy.oci.blobs import compression_of
from cdipy.oci.toc import (
    ESTARGZ,
    ZSTD_CHUNKED,
    find_disk,
    read_toc,
    seekable_kind,
    unpack_chunk,
    unpack_chunk_pieces,
)
from seekable import NEW_PREFIX, OLD_PREFIX, reader

IMAGE = "registry.example/cdi/disk:1"
KIB = 1 << 10

# A disk of mixed data: random, a run of zeros, text; cut as the writers cut it.
RANDOM = os.urandom(200 * KIB)
DISK = RANDOM + bytes(300 * KIB) + b"hello, disk\n" * 1000
DISK_CHUNKS = [64 * KIB, 64 * KIB, 72 * KIB, 300 * KIB, 12000]
FILES = [("disk/", b"", None), ("disk/disk.img", DISK, DISK_CHUNKS),
         ("etc/empty", b"", None), ("etc/motd", b"one small file\n", None)]

MAKERS = {
    "new zstd:chunked": lambda **options: seekable.zstd_chunked(FILES, **options),
    "old zstd:chunked": lambda **options: seekable.zstd_chunked(FILES, prefix=OLD_PREFIX,
                                                                **options),
    "eStargz": lambda **options: seekable.estargz(FILES, **options),
}


def read(blob, descriptor, **options):
    return read_toc(descriptor, reader(blob), IMAGE, **options)


def chunk_bytes(blob, chunk):
    return blob[chunk.blob_offset:chunk.blob_end]


def file_through_chunks(blob, toc, name):
    file = toc.files[name]
    return b"".join(unpack_chunk(toc, file, chunk, None if chunk.zeros
                                 else chunk_bytes(blob, chunk))
                    for chunk in file.chunks)


# ------------------------------------------------------------ reading

@pytest.mark.parametrize("shape", MAKERS)
def test_each_file_reads_back_through_its_chunks(shape):
    blob, descriptor = MAKERS[shape]()
    toc = read(blob, descriptor)
    assert toc.kind == (ESTARGZ if shape == "eStargz" else ZSTD_CHUNKED)
    assert file_through_chunks(blob, toc, "disk/disk.img") == DISK
    assert file_through_chunks(blob, toc, "etc/motd") == b"one small file\n"
    assert toc.files["etc/empty"].chunks == ()
    assert toc.files["disk/disk.img"].digest == seekable.sha256(DISK)


@pytest.mark.parametrize("shape", MAKERS)
def test_a_file_split_across_chunks_keeps_the_writers_cuts(shape):
    blob, descriptor = MAKERS[shape]()
    chunks = read(blob, descriptor).files["disk/disk.img"].chunks
    assert [chunk.length for chunk in chunks] == DISK_CHUNKS
    assert [chunk.file_offset for chunk in chunks] == [0, 64 * KIB, 128 * KIB, 200 * KIB,
                                                       500 * KIB]
    # Each compressed range ends where the next begins, and before the TOC.
    for before, after in zip(chunks, chunks[1:]):
        assert before.blob_end <= after.blob_offset


def test_a_zstd_chunked_run_of_zeros_is_a_zeros_chunk_served_without_its_bytes():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    toc = read(blob, descriptor)
    file = toc.files["disk/disk.img"]
    zeros = [chunk for chunk in file.chunks if chunk.zeros]
    assert [(chunk.file_offset, chunk.length) for chunk in zeros] == [(200 * KIB, 300 * KIB)]
    assert unpack_chunk(toc, file, zeros[0], None) == bytes(300 * KIB)
    assert file.chunk_at(250 * KIB) == zeros[0]


def test_estargz_marks_no_zeros():
    blob, descriptor = MAKERS["eStargz"]()
    assert not any(chunk.zeros for chunk in read(blob, descriptor).files["disk/disk.img"].chunks)


def test_a_file_of_one_chunk_is_checked_by_the_files_digest():
    blob, descriptor = seekable.zstd_chunked([("disk.img", RANDOM, None)])
    chunks = read(blob, descriptor).files["disk.img"].chunks
    assert len(chunks) == 1
    assert chunks[0].digest == seekable.sha256(RANDOM)


def test_many_chunks():
    data = os.urandom(1000 * 4 * KIB)
    for maker in (seekable.zstd_chunked, seekable.estargz):
        blob, descriptor = maker([("disk/disk.img", data, [4 * KIB] * 1000)])
        toc = read(blob, descriptor)
        assert len(toc.files["disk/disk.img"].chunks) == 1000
        assert file_through_chunks(blob, toc, "disk/disk.img") == data
        assert toc.files["disk/disk.img"].chunk_at(len(data) - 1).file_offset == 999 * 4 * KIB


def test_the_toc_is_read_with_one_range_and_the_footer_with_another():
    for shape, expected in (("new zstd:chunked", 1), ("eStargz", 2)):
        blob, descriptor = MAKERS[shape]()
        log = []
        read_toc(descriptor, reader(blob, log), IMAGE)
        assert len(log) == expected, shape


@pytest.mark.parametrize("shape", ["new zstd:chunked", "old zstd:chunked"])
def test_both_annotation_generations(shape):
    blob, descriptor = MAKERS[shape]()
    prefix = NEW_PREFIX if shape.startswith("new") else OLD_PREFIX
    assert all(key.startswith(prefix) for key in descriptor["annotations"])
    toc = read(blob, descriptor)
    assert (toc.tar_split is not None) == (prefix == NEW_PREFIX)
    assert toc.toc_range[1] == len(blob)


def test_a_layer_without_annotations_is_not_seekable():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    del descriptor["annotations"]
    assert seekable_kind(descriptor) is None
    assert read(blob, descriptor) is None


def test_estargz_made_from_zstd_chunked_keeps_stale_annotations_and_is_read_as_estargz():
    # ctr-remote's converter copies the source layer's annotations.
    stale = MAKERS["old zstd:chunked"]()[1]["annotations"]
    blob, descriptor = seekable.estargz(FILES, media_type="tar+zstd")
    descriptor["annotations"].update(stale)
    assert seekable_kind(descriptor) == ESTARGZ
    assert file_through_chunks(blob, read(blob, descriptor), "disk/disk.img") == DISK


def test_zstd_chunked_with_an_estargz_annotation_but_no_footer_is_read_as_zstd_chunked():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    descriptor["annotations"][seekable.ESTARGZ_DIGEST] = seekable.sha256(b"")
    assert read(blob, descriptor).kind == ZSTD_CHUNKED


def test_the_members_list_directories_files_and_whiteouts_for_choose_disk():
    blob, descriptor = seekable.estargz([("./disk/", b"", None), ("./disk/x.img", b"x", None),
                                         ("etc/.wh.old", b"", None)])
    toc = read(blob, descriptor)
    assert [(member.name, member.kind, member.size) for member in toc.members] == [
        ("disk", "directory", 0), ("disk/x.img", "file", 1), ("etc/.wh.old", "whiteout", 0)]
    assert set(toc.files) == {"disk/x.img"}


def test_find_disk_merges_tocs_and_tar_listings_by_choose_disks_rule():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    toc = read(blob, descriptor)
    base = [Member("disk/old.img", "file", 10, 512)]
    replace = [Member("disk/.wh.old.img", "whiteout", 0, 512)]
    choice, file = find_disk([(0, base), (1, replace), (2, toc)], IMAGE)
    assert (choice.index, choice.member.name, file) == (2, "disk/disk.img",
                                                        toc.files["disk/disk.img"])
    with pytest.raises(CdiError, match="2 candidate VM disks"):
        find_disk([(0, toc), (1, base)], IMAGE)
    choice, file = find_disk([(0, toc), (1, [])], IMAGE)
    assert file is toc.files["disk/disk.img"]
    choice, file = find_disk([(0, base)], IMAGE)
    assert file is None and choice.member is base[0]


def test_pieces_come_one_at_a_time_the_last_only_once_checked():
    blob, descriptor = seekable.zstd_chunked([("disk.img", RANDOM, None)])
    toc = read(blob, descriptor)
    file = toc.files["disk.img"]
    pieces = list(unpack_chunk_pieces(toc, file, file.chunks[0],
                                      chunk_bytes(blob, file.chunks[0]), piece=64 * KIB))
    assert [len(piece) for piece in pieces] == [64 * KIB] * 3 + [8 * KIB]


# ------------------------------------------------------------ compression by the bytes

def test_estargz_converted_from_zstd_is_gzip_whatever_its_media_type():
    blob, descriptor = seekable.estargz(FILES, media_type="tar+zstd")
    assert compression_of(blob[:4]) == "gzip"
    assert read(blob, descriptor).kind == ESTARGZ


# ------------------------------------------------------------ lies

def refused(blob, descriptor, **options):
    with pytest.raises(CdiError) as error:
        read(blob, descriptor, **options)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{IMAGE}: layer {descriptor['digest']}: ")
    return message


def disk_entries(document):
    return [entry for entry in document["entries"] if entry.get("name") in
            ("disk/disk.img", "./disk/disk.img")]


@pytest.mark.parametrize("shape", MAKERS)
def test_a_wrong_checksum_is_refused(shape):
    wrong = seekable.sha256(b"another TOC")
    options = {"digest": wrong} if shape == "eStargz" else {"checksum": wrong}
    message = refused(*MAKERS[shape](**options))
    assert "TOC: checksum mismatch: the TOC hashes to sha256:" in message
    assert f"says {wrong}" in message


@pytest.mark.parametrize("shape", MAKERS)
def test_overlapping_chunks_are_refused(shape):
    def edit(document):
        disk_entries(document)[2]["chunkOffset"] -= 1
    assert refused(*MAKERS[shape](edit=edit)).endswith(
        "file disk/disk.img: chunk at byte 131071 overlaps the chunk before, "
        "which ends at byte 131072")


@pytest.mark.parametrize("shape", MAKERS)
def test_a_gap_between_chunks_is_refused(shape):
    def edit(document):
        disk_entries(document)[2]["chunkOffset"] += 1
    assert refused(*MAKERS[shape](edit=edit)).endswith(
        "file disk/disk.img: no chunk holds bytes 131072-131073")


@pytest.mark.parametrize("shape", MAKERS)
def test_a_chunk_past_the_end_of_the_file_is_refused(shape):
    def edit(document):
        disk_entries(document)[-1]["chunkSize"] = 12001
    assert refused(*MAKERS[shape](edit=edit)).endswith(
        "file disk/disk.img: chunk at byte 512000 (12001 bytes) runs past the end of the "
        "524000-byte file")


@pytest.mark.parametrize("shape", MAKERS)
def test_a_chunk_past_the_blob_is_refused(shape):
    def edit(document):
        last = disk_entries(document)[-1]
        if shape == "eStargz":
            last["offset"] = 1 << 40
        else:
            document["entries"][1]["endOffset"] = 1 << 40
    # eStargz tells where a piece ends by where the next starts: the lie
    # shows on the piece before.
    blob, descriptor = MAKERS[shape](edit=edit)
    at = 204800 if shape == "eStargz" else 512000
    assert re.search(rf"file disk/disk.img: chunk at byte {at} lies at bytes \d+-{1 << 40}, "
                     rf"past the {len(blob)}-byte blob$", refused(blob, descriptor))


@pytest.mark.parametrize("shape", ["new zstd:chunked", "old zstd:chunked"])
def test_a_chunk_into_the_toc_is_refused(shape):
    blob, descriptor = MAKERS[shape]()
    toc_start = read(blob, descriptor).toc_range[0]

    def edit(document):
        document["entries"][1]["endOffset"] = toc_start + 4
    assert f"into the TOC at byte {toc_start}" in refused(*MAKERS[shape](edit=edit))


@pytest.mark.parametrize("shape", MAKERS)
@pytest.mark.parametrize(("name", "fault"), [
    ("../etc/passwd", "entry '../etc/passwd': a name with a '..' component"),
    ("disk/../../x", "entry 'disk/../../x': a name with a '..' component"),
    ("/disk/disk.img", "entry '/disk/disk.img': an absolute name"),
])
def test_a_name_that_escapes_the_layer_is_refused(shape, name, fault):
    def edit(document):
        for entry in disk_entries(document):
            entry["name"] = name
    assert refused(*MAKERS[shape](edit=edit)).endswith(fault)


@pytest.mark.parametrize("shape", MAKERS)
def test_a_toc_larger_than_the_limit_is_refused(shape):
    blob, descriptor = MAKERS[shape]()
    assert "is larger than the limit, 1000 bytes" in refused(blob, descriptor, limit=1000)


def test_a_toc_larger_than_the_layer_is_refused():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    offset, _, uncompressed, _ = descriptor["annotations"][
        NEW_PREFIX + "manifest-position"].split(":")
    descriptor["annotations"][NEW_PREFIX + "manifest-position"] = \
        f"{offset}:{len(blob) + 1}:{uncompressed}:1"
    assert refused(blob, descriptor).endswith(
        f"the TOC ({len(blob) + 1} bytes) is larger than the layer ({len(blob)} bytes)")


def test_an_estargz_footer_pointing_nowhere_is_refused():
    blob, descriptor = MAKERS["eStargz"]()
    blob = blob[:-51] + seekable.estargz_footer(len(blob))
    descriptor.update(digest=seekable.sha256(blob))
    assert "the footer puts the TOC at byte" in refused(blob, descriptor)
    assert "no eStargz footer" in refused(blob[:-51] + bytes(51), descriptor)


@pytest.mark.parametrize("shape", MAKERS)
def test_an_unknown_version_is_refused(shape):
    def edit(document):
        document["version"] = 2
    assert refused(*MAKERS[shape](edit=edit)).endswith(
        "unknown TOC version 2 (this reads version 1)")


def test_a_toc_that_is_not_json_is_refused():
    text = b"{not json"
    compressed = seekable.zstd_frame(text)
    blob = bytes(100) + seekable.skippable(compressed)
    descriptor = {"digest": seekable.sha256(blob), "size": len(blob), "annotations": {
        NEW_PREFIX + "manifest-position": f"108:{len(compressed)}:{len(text)}:1",
        NEW_PREFIX + "manifest-checksum": seekable.sha256(compressed)}}
    assert "TOC: the TOC is not JSON (" in refused(blob, descriptor)


def test_a_toc_larger_uncompressed_than_its_annotation_says_is_refused():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    key = NEW_PREFIX + "manifest-position"
    offset, length, uncompressed, _ = descriptor["annotations"][key].split(":")
    descriptor["annotations"][key] = f"{offset}:{length}:{int(uncompressed) - 1}:1"
    assert refused(blob, descriptor).endswith(
        f"the TOC is {uncompressed} bytes uncompressed, not {int(uncompressed) - 1} as "
        f"{NEW_PREFIX}manifest-position says")


def test_a_position_not_at_a_skippable_frame_is_refused():
    blob, descriptor = MAKERS["new zstd:chunked"]()
    key = NEW_PREFIX + "manifest-position"
    offset, rest = descriptor["annotations"][key].split(":", 1)
    descriptor["annotations"][key] = f"{int(offset) - 1}:{rest}"
    assert "no skippable frame of" in refused(blob, descriptor)


def test_a_short_answer_to_a_range_is_refused():
    blob, descriptor = MAKERS["eStargz"]()
    with pytest.raises(CdiError, match=r"asked for bytes \d+-\d+ of the blob, got 10 bytes"):
        read_toc(descriptor, lambda start, end: blob[start:start + 10], IMAGE)


@pytest.mark.parametrize("shape", MAKERS)
def test_a_chunk_failing_its_digest_is_refused_before_its_last_piece(shape):
    blob, descriptor = MAKERS[shape]()
    toc = read(blob, descriptor)
    file = toc.files["disk/disk.img"]
    chunk = file.chunks[1]
    other = (seekable.zstd_frame if shape != "eStargz" else seekable.gzip_member)(
        os.urandom(chunk.length))
    liar = toc_module.Chunk(chunk.file_offset, chunk.length, chunk.blob_offset, len(other),
                            chunk.digest)
    pieces = unpack_chunk_pieces(toc, file, liar, other, piece=16 * KIB)
    served = []
    with pytest.raises(CdiError) as error:
        served.extend(pieces)
    assert len(served) == 3  # of 4: the last is never given
    assert str(error.value).startswith(f"{IMAGE}: layer {descriptor['digest']}: ")
    assert "file disk/disk.img: chunk at byte 65536: the chunk hashes to sha256:" \
        in str(error.value)
    assert str(error.value).endswith(f"its TOC says {chunk.digest}")


@pytest.mark.parametrize("shape", MAKERS)
def test_a_chunk_that_is_not_compressed_is_refused(shape):
    blob, descriptor = MAKERS[shape]()
    toc = read(blob, descriptor)
    file = toc.files["disk/disk.img"]
    chunk = file.chunks[0]
    with pytest.raises(CdiError, match="file disk/disk.img: chunk at byte 0: not valid"):
        unpack_chunk(toc, file, chunk, bytes(chunk.blob_length))
