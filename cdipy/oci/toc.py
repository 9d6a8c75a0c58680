"""The table of contents (TOC) of a seekable layer, zstd:chunked or
eStargz: which compressed range of the blob holds each piece of each file,
and how each piece is checked.  A description for whoever fetches the
bytes, read with one range (eStargz: two), checked against the layer's
annotation, and refused whole if it lies.

- zstd:chunked (containers/storage): every piece of a file is a zstd frame
  of its own; the TOC is zstd-compressed JSON in a skippable frame that the
  annotation ...zstd-chunked.manifest-position finds (OFFSET:LENGTH:
  UNCOMPRESSED LENGTH:1, OFFSET just past the frame's 8-byte header), and
  ...manifest-checksum checks (the sha256 of those LENGTH compressed
  bytes).  podman 4.3 writes the prefix io.containers.zstd-chunked., later
  ones io.github.containers.zstd-chunked.
- eStargz (stargz-snapshotter): every piece is a gzip member of its own
  (holding, after the piece, the tar headers that follow); the TOC,
  stargz.index.json, is a tar in a gzip member of its own, found by the
  51-byte footer at the end of the blob, and checked by the annotation
  containerd.io/snapshot/stargz/toc.digest (the sha256 of the JSON).

What is refused, each with one line naming the image, the layer and the
fault: a TOC that does not match its annotation, or larger than the layer
or than TOC_LIMIT, or not JSON of version 1; an entry named with an
absolute path, or a ".." component; the pieces of a file that overlap,
leave a gap, or run past its size; a compressed range past the blob or
into the TOC.  Names are cleaned as the layer's tar entries are: "./",
"." and empty components dropped, so "./disk//x.img" is "disk/x.img".
A piece is served only once unpack_chunk_pieces has checked it against its
digest; the whole file's digest is the caller's, once it is whole.

A layer without the annotations is not seekable, whatever footer it ends
in: nothing would check its TOC before the whole blob had been read.
(podman 4.3, pushing again a layer it once pushed as zstd:chunked, reuses
that blob and writes no annotations.)  READ_RANGE must give exactly the
bytes asked for: a registry that answers a range with the whole blob is
the caller's to cut.
"""

import bisect
import dataclasses
import functools
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import Callable, Optional

from ..disk import choose_disk
from ..errors import CdiError
from ..layer import Member, member_kind

__all__ = ["ESTARGZ", "TOC_LIMIT", "ZSTD_CHUNKED", "Chunk", "NotSeekable", "Toc", "TocFile",
           "find_disk", "read_toc", "seekable_kind", "unpack_chunk", "unpack_chunk_pieces"]

ZSTD_CHUNKED, ESTARGZ = "zstd:chunked", "eStargz"
# Newest first: a layer with both is read by the newer.
ZSTD_CHUNKED_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
ESTARGZ_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
# containers/storage's own limit (maxTocSize), compressed or not: what
# podman reads, this reads.
TOC_LIMIT = 150 << 20
# The most compressed bytes of one chunk read into memory; a layer with a
# larger chunk is streamed instead.
MAX_CHUNK = 64 << 20
SKIPPABLE_FRAME = b"\x50\x2a\x4d\x18"   # 0x184D2A50, little-endian
SKIPPABLE_HEADER = 8                     # the magic, then the frame's length
ESTARGZ_FOOTER = 51
ESTARGZ_TOC_NAME = "stargz.index.json"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
PIECE = 1 << 20
# TOC entry types, as the tar type flags layer.member_kind knows.
TYPE_FLAGS = {"reg": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4",
              "dir": b"5", "fifo": b"6"}


class NotSeekable(CdiError):
    """A TOC this module does not read (another version, an unknown type, a
    chunk too large to read at once): the layer is streamed instead."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """LENGTH bytes of a file from FILE_OFFSET: the decompression of the
    BLOB_LENGTH bytes of the blob at BLOB_OFFSET (a zstd frame, a gzip
    member), less its first INNER_OFFSET bytes; checked against DIGEST; or,
    if ZEROS, all zeros, to be served with no fetch."""
    file_offset: int
    length: int
    blob_offset: int
    blob_length: int
    digest: Optional[str]
    zeros: bool = False
    inner_offset: int = 0

    @property
    def blob_end(self):
        return self.blob_offset + self.blob_length


@dataclasses.dataclass(frozen=True)
class TocFile:
    """A regular file: NAME, SIZE bytes, whose whole content hashes to
    DIGEST (None if empty); CHUNKS, in order, tile it exactly."""
    name: str
    size: int
    digest: Optional[str]
    chunks: tuple

    def chunk_at(self, offset):
        """The Chunk holding byte OFFSET of the file."""
        return self.chunks[self.index_at(offset)]

    def index_at(self, offset):
        """The index in chunks of the one holding byte OFFSET of the file."""
        return bisect.bisect_right(self._starts, offset) - 1

    @functools.cached_property
    def _starts(self):
        return [chunk.file_offset for chunk in self.chunks]


@dataclasses.dataclass(frozen=True)
class Toc:
    """The checked TOC of layer LAYER (its digest) of image IMAGE_NAME, a
    KIND (ZSTD_CHUNKED or ESTARGZ) blob of BLOB_SIZE bytes: FILES, {name:
    TocFile} (the last entry of a name); MEMBERS, a layer.Member per entry
    in order, for disk.choose_disk (offset None: the bytes are the chunks');
    TOC_RANGE, (start, end) of the blob that the TOC and what follows it
    occupy; TAR_SPLIT, zstd:chunked's (offset, length, uncompressed length,
    digest) if the layer has one."""
    kind: str
    image_name: str
    layer: str
    blob_size: int
    files: dict
    members: tuple
    toc_range: tuple
    tar_split: Optional[tuple] = None


def seekable_kind(descriptor):
    """ZSTD_CHUNKED, ESTARGZ or None: what the annotations of layer
    DESCRIPTOR say it is (no I/O).  Both: ESTARGZ, for ctr-remote, turning a
    zstd:chunked layer into eStargz, keeps the old annotations beside its
    own; read_toc reads a zstd:chunked TOC if the blob has no eStargz footer."""
    annotations = descriptor.get("annotations") or {}
    if ESTARGZ_DIGEST in annotations:
        return ESTARGZ
    if any(prefix + "manifest-position" in annotations for prefix in ZSTD_CHUNKED_PREFIXES):
        return ZSTD_CHUNKED
    return None


def read_toc(descriptor, read_range: Callable[[int, int], bytes], image_name,
             limit=TOC_LIMIT) -> Optional[Toc]:
    """The checked Toc of layer DESCRIPTOR (mediaType, digest, size,
    annotations) of IMAGE_NAME, reading its blob with READ_RANGE(start,
    end), end excluded; None if its annotations call it neither zstd:chunked
    nor eStargz; CdiError if its TOC lies."""
    kind = seekable_kind(descriptor)
    if kind is None:
        return None
    blob_size = descriptor["size"]
    footer = None
    if kind == ESTARGZ and any(prefix + "manifest-position" in descriptor["annotations"]
                               for prefix in ZSTD_CHUNKED_PREFIXES):
        footer = _read(read_range, max(0, blob_size - ESTARGZ_FOOTER), blob_size,
                       _Fault(image_name, descriptor["digest"], kind))
        if _estargz_toc_offset(footer) is None:
            kind = ZSTD_CHUNKED
    fault = _Fault(image_name, descriptor["digest"], kind)
    if kind == ZSTD_CHUNKED:
        document, toc_range, tar_split = _zstd_chunked_toc(descriptor, read_range, fault, limit)
    else:
        document, toc_range = _estargz_toc(descriptor, read_range, fault, limit, footer)
        tar_split = None
    files, members = _Entries(kind, toc_range[0], blob_size, fault).read(document)
    return Toc(kind, image_name, descriptor["digest"], blob_size, files, members, toc_range,
               tar_split)


def unpack_chunk_pieces(toc: Toc, file: TocFile, chunk: Chunk, data,
                        piece=PIECE) -> Iterator[bytes]:
    """CHUNK of FILE, from DATA (its BLOB_LENGTH compressed bytes; unused
    for a zeros chunk), decompressed PIECE bytes at a time (a chunk of
    repetitive data may be the whole file).  The last piece comes only after
    the whole chunk has been checked against its digest: CdiError instead.
    Write the pieces aside; serve none before the end."""
    fault = _Fault(toc.image_name, toc.layer, toc.kind)
    where = f"file {file.name}: chunk at byte {chunk.file_offset}"
    if chunk.zeros:
        for start in range(0, chunk.length, piece):
            yield bytes(min(piece, chunk.length - start))
        return
    if len(data) != chunk.blob_length:
        raise fault(f"{where}: given {len(data)} compressed bytes, not {chunk.blob_length}")
    digest, count, pending = hashlib.sha256(), 0, None
    try:
        pieces = _unzstd(data, piece) if toc.kind == ZSTD_CHUNKED \
            else _gunzip(data, chunk.inner_offset, piece)
        for piece_out in pieces:
            out = piece_out[:chunk.length - count]
            digest.update(out)
            count += len(out)
            if pending is not None:
                yield pending
            pending = out
            if count == chunk.length:
                break
    except (zlib.error, EOFError, _zstd_errors()) as error:
        raise fault(f"{where}: not valid {'zstd' if toc.kind == ZSTD_CHUNKED else 'gzip'} "
                    f"({error})") from None
    if count != chunk.length:
        raise fault(f"{where}: {count} bytes decompressed, not {chunk.length}")
    if "sha256:" + digest.hexdigest() != chunk.digest:
        raise fault(f"{where}: the chunk hashes to sha256:{digest.hexdigest()}, its "
                    f"TOC says {chunk.digest}")
    if pending:
        yield pending


def unpack_chunk(toc: Toc, file: TocFile, chunk: Chunk, data) -> bytes:
    """CHUNK of FILE from DATA, whole and checked (unpack_chunk_pieces)."""
    return b"".join(unpack_chunk_pieces(toc, file, chunk, data))


def find_disk(layers, image_name):
    """(disk.Choice, the disk's TocFile or None) among LAYERS, [(index,
    Toc or [Member])] base first, by disk.choose_disk's one rule: layers
    mixing formats are merged as podman would."""
    listed = [(index, layer.members if isinstance(layer, Toc) else layer)
              for index, layer in layers]
    choice = choose_disk(listed, image_name)
    by_index = dict(layers)
    toc = by_index[choice.index]
    return choice, toc.files[choice.member.name] if isinstance(toc, Toc) else None


# ------------------------------------------------------------ zstd:chunked

def _zstd_chunked_toc(descriptor, read_range, fault, limit):
    """(the TOC's JSON document, the range it and the tar-split occupy,
    the tar-split or None)."""
    annotations = descriptor.get("annotations") or {}
    prefix = next(prefix for prefix in ZSTD_CHUNKED_PREFIXES
                  if prefix + "manifest-position" in annotations)
    position = annotations[prefix + "manifest-position"]
    numbers = _numbers(position, 4)
    if numbers is None:
        raise fault(f"{prefix}manifest-position is {position!r}, not "
                    "OFFSET:LENGTH:UNCOMPRESSED:TYPE")
    offset, length, uncompressed, manifest_type = numbers
    if manifest_type != 1:
        raise fault.unknown(f"unknown TOC type {manifest_type} (this reads type 1)")
    checksum = annotations.get(prefix + "manifest-checksum", "")
    if not DIGEST.match(checksum):
        raise fault(f"{prefix}manifest-checksum is {checksum!r}, not a sha256 digest")
    _check_toc_size(length, uncompressed, descriptor["size"], fault, limit)
    start = offset - SKIPPABLE_HEADER
    if start < 0 or offset + length > descriptor["size"]:
        raise fault(f"the TOC at bytes {offset}-{offset + length} lies past the "
                    f"{descriptor['size']}-byte blob")
    frame = _read(read_range, start, offset + length, fault)
    if frame[:4] != SKIPPABLE_FRAME or int.from_bytes(frame[4:8], "little") != length:
        raise fault(f"no skippable frame of {length} bytes at byte {start}, where "
                    f"{prefix}manifest-position puts the TOC")
    compressed = frame[SKIPPABLE_HEADER:]
    actual = "sha256:" + hashlib.sha256(compressed).hexdigest()
    if actual != checksum:
        raise fault(f"checksum mismatch: the TOC hashes to {actual}, its annotation "
                    f"{prefix}manifest-checksum says {checksum}")
    import zstandard  # noqa: PLC0415 (a package only zstd layers need)
    try:
        # A size in the frame's header is allocated at once: check it first.
        declared = zstandard.frame_content_size(compressed)
        if declared not in (-1, uncompressed):
            raise fault(f"the TOC is {declared} bytes uncompressed, not {uncompressed} as "
                        f"{prefix}manifest-position says")
        text = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=uncompressed)
    except zstandard.ZstdError as error:
        raise fault(f"the TOC is not valid zstd ({error})") from None
    if len(text) != uncompressed:
        raise fault(f"the TOC is {len(text)} bytes uncompressed, not {uncompressed} as "
                    f"{prefix}manifest-position says")
    document = _json(text, fault)
    tar_split = None
    split_position = annotations.get(prefix + "tarsplit-position")
    if split_position is not None:
        split = _numbers(split_position, 3)
        if split is None or split[0] < SKIPPABLE_HEADER \
                or split[0] + split[1] > descriptor["size"]:
            raise fault.unknown(f"{prefix}tarsplit-position is {split_position!r}: not "
                        f"OFFSET:LENGTH:UNCOMPRESSED within the blob")
        tar_split = (*split, document.get("tarSplitDigest"))
        start = min(start, split[0] - SKIPPABLE_HEADER)
    return document, (start, descriptor["size"]), tar_split


def _unzstd(data, piece):
    import zstandard  # noqa: PLC0415
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    yield from iter(lambda: reader.read(piece), b"")


def _zstd_errors():
    try:
        import zstandard  # noqa: PLC0415
    except ImportError:
        return ()
    return zstandard.ZstdError


# ------------------------------------------------------------ eStargz

def _estargz_toc(descriptor, read_range, fault, limit, footer=None):
    """(the TOC's JSON document, the range it and the footer occupy);
    FOOTER, the blob's last bytes, if already read."""
    expected = descriptor["annotations"][ESTARGZ_DIGEST]
    if not DIGEST.match(expected):
        raise fault(f"{ESTARGZ_DIGEST} is {expected!r}, not a sha256 digest")
    size = descriptor["size"]
    if size <= ESTARGZ_FOOTER:
        raise fault(f"the {size}-byte blob is too small for the {ESTARGZ_FOOTER}-byte footer")
    footer = footer or _read(read_range, size - ESTARGZ_FOOTER, size, fault)
    toc_offset = _estargz_toc_offset(footer)
    if toc_offset is None:
        raise fault(f"no eStargz footer in the last {ESTARGZ_FOOTER} bytes of the blob")
    toc_end = size - ESTARGZ_FOOTER
    if toc_offset >= toc_end:
        raise fault(f"the footer puts the TOC at byte {toc_offset}, past its end at {toc_end}")
    _check_toc_size(toc_end - toc_offset, None, size, fault, limit)
    compressed = _read(read_range, toc_offset, toc_end, fault)
    inflate = zlib.decompressobj(wbits=31)
    try:
        archive = inflate.decompress(compressed, limit + 2 * tarfile.BLOCKSIZE)
        if inflate.unconsumed_tail:
            raise fault(f"the TOC is larger than the limit, {limit} bytes uncompressed")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.next()
            if member is None or member.name != ESTARGZ_TOC_NAME or not member.isfile():
                raise fault(f"the TOC's archive does not start with {ESTARGZ_TOC_NAME}")
            text = tar.extractfile(member).read()
    except (zlib.error, tarfile.TarError, EOFError) as error:
        raise fault(f"the TOC at byte {toc_offset} is not a gzipped tar ({error})") from None
    actual = "sha256:" + hashlib.sha256(text).hexdigest()
    if actual != expected:
        raise fault(f"checksum mismatch: the TOC hashes to {actual}, its annotation "
                    f"{ESTARGZ_DIGEST} says {expected}")
    return _json(text, fault), (toc_offset, size)


def _estargz_toc_offset(footer):
    """The TOC's offset that FOOTER, an eStargz footer, gives; None if it is
    not one: a gzip member with no data, whose extra field (XLEN 26) is the
    subfield "SG", of length 22: "%016xSTARGZ" % the offset."""
    if len(footer) != ESTARGZ_FOOTER or footer[:2] != b"\x1f\x8b" or not footer[3] & 4 \
            or footer[10:16] != b"\x1a\x00SG\x16\x00" or footer[32:38] != b"STARGZ":
        return None
    digits = footer[16:32]
    if not all(digit in b"0123456789abcdefABCDEF" for digit in digits):
        return None
    return int(digits, 16)


def _gunzip(data, skip, piece):
    """The gzip member DATA decompressed, PIECE bytes at a time, less its
    first SKIP bytes."""
    inflate = zlib.decompressobj(wbits=31)
    pending = memoryview(data)
    while pending and not inflate.eof:
        out = inflate.decompress(pending, piece)
        pending = inflate.unconsumed_tail
        if skip:
            dropped = min(skip, len(out))
            out, skip = out[dropped:], skip - dropped
        if out:
            yield out
    if not inflate.eof:
        raise EOFError("the member ends early")


# ------------------------------------------------------------ the entries

class _Entries:
    """Reads the entries of a TOC of KIND, each file's chunks checked
    against its size and the bytes of a BLOB_SIZE blob before TOC_START."""

    def __init__(self, kind, toc_start, blob_size, fault):
        self.kind, self.toc_start, self.blob_size, self.fault = \
            kind, toc_start, blob_size, fault

    def read(self, document):
        """({name: TocFile}, (Member, ...)) of the TOC DOCUMENT."""
        fault = self.fault
        if not isinstance(document, dict) or document.get("version") != 1:
            version = document.get("version") if isinstance(document, dict) else None
            raise fault.unknown(f"unknown TOC version {version!r} (this reads version 1)")
        entries = document.get("entries")
        if not isinstance(entries, list) or not all(isinstance(item, dict) for item in entries):
            raise fault("the TOC's entries are not a list of objects")
        ends = _compressed_ends(entries, self.kind, self.toc_start, fault)
        files, members, current = {}, [], None
        for entry, end in zip(entries, ends):
            if entry.get("type") == "chunk":
                if current is None:
                    raise fault("a chunk entry follows no regular file")
                name = entry.get("name")
                if name is not None and _clean(name, fault) != current.name:
                    raise fault(f"a chunk of {current.name} is named {name}")
                current.chunks.append((entry, end))
                continue
            if current is not None:
                files[current.name] = self.file(current)
                current = None
            member = _member(entry, fault)
            if member is None:
                continue  # the root directory itself
            members.append(member)
            if entry["type"] == "reg" and member.kind == "file":
                digest = entry.get("digest") or None
                if digest is not None and not DIGEST.match(digest):
                    raise fault(f"file {member.name}: digest {digest!r} is not a sha256 digest")
                if member.size and digest is None:
                    raise fault(f"file {member.name}: {member.size} bytes, and no digest")
                current = TocFile(member.name, member.size, digest,
                                  [(entry, end)] if member.size else [])
        if current is not None:
            files[current.name] = self.file(current)
        return files, tuple(members)

    def file(self, listed):
        """The TocFile LISTED, whose chunks are (entry, compressed end), checked."""
        chunks, expected = [], 0
        for entry, end in listed.chunks:
            chunk = self.chunk(listed, entry, end, expected)
            chunks.append(chunk)
            expected = chunk.file_offset + chunk.length
        if expected != listed.size:
            raise self.fault(f"file {listed.name}: no chunk holds bytes {expected}-{listed.size}")
        return dataclasses.replace(listed, chunks=tuple(chunks))

    def chunk(self, listed, entry, end, expected):
        """The Chunk of file LISTED that ENTRY describes, which must start at
        EXPECTED and whose compressed bytes end at END."""
        fault, name, size = self.fault, listed.name, listed.size
        file_offset = _integer(entry, "chunkOffset", fault, name)
        length = _integer(entry, "chunkSize", fault, name) or size - file_offset
        where = f"file {name}: chunk at byte {file_offset}"
        if file_offset < expected:
            raise fault(f"{where} overlaps the chunk before, which ends at byte {expected}")
        if file_offset > expected:
            raise fault(f"file {name}: no chunk holds bytes {expected}-{file_offset}")
        if length <= 0 or file_offset + length > size:
            raise fault(f"{where} ({length} bytes) runs past the end of the {size}-byte file")
        blob_offset = _integer(entry, "offset", fault, name)
        if end is None or end <= blob_offset:
            raise fault(f"{where}: its compressed bytes start at {blob_offset} and end at {end}")
        if end > self.blob_size:
            raise fault(f"{where} lies at bytes {blob_offset}-{end}, past the "
                        f"{self.blob_size}-byte blob")
        if end > self.toc_start:
            raise fault(f"{where} lies at bytes {blob_offset}-{end}, into the TOC at "
                        f"byte {self.toc_start}")
        if end - blob_offset > MAX_CHUNK:
            raise fault.unknown(f"{where} is {end - blob_offset} bytes compressed, more than "
                                f"the {MAX_CHUNK} this reads at once")
        chunk_type = entry.get("chunkType", "")
        if chunk_type not in ("", "zeros"):
            raise fault.unknown(f"{where}: unknown chunk type {chunk_type!r}")
        digest = entry.get("chunkDigest") or None
        if digest is None and len(listed.chunks) == 1:
            digest = listed.digest  # one chunk: the file's digest checks it
        if chunk_type != "zeros" and (digest is None or not DIGEST.match(digest)):
            raise fault(f"{where}: chunk digest {digest!r} is not a sha256 digest")
        return Chunk(file_offset, length, blob_offset, end - blob_offset, digest,
                     chunk_type == "zeros", _integer(entry, "innerOffset", fault, name))


def _member(entry, fault):
    """The layer.Member of the TOC's ENTRY (not a chunk); None for the root."""
    entry_type = entry.get("type")
    if entry_type not in TYPE_FLAGS:
        raise fault.unknown(f"entry {entry.get('name')!r}: unknown type {entry_type!r}")
    name = _clean(entry.get("name"), fault)
    size = _integer(entry, "size", fault, name)
    if not name:
        if entry_type != "dir":
            raise fault(f"a {entry_type} entry with no name")
        return None
    tar_name = f"{name}/" if entry_type == "dir" else name
    return Member(name, member_kind(tar_name, TYPE_FLAGS[entry_type]),
                  size if entry_type == "reg" else 0, None)


def _compressed_ends(entries, kind, toc_start, fault):
    """The end in the blob of each entry's compressed bytes (None for an
    entry without).  zstd:chunked: a file's last chunk ends at the file's
    endOffset, the others where the next chunk starts.  eStargz: where the
    next gzip member of a piece starts (pieces sharing a member, with an
    innerOffset, end where it does), or the TOC."""
    ends = [None] * len(entries)
    if kind == ZSTD_CHUNKED:
        first = None
        for index, entry in enumerate([*entries, {}]):
            if entry.get("type") == "chunk":
                ends[index - 1] = _integer(entry, "offset", fault, entry.get("name"))
                continue
            if first is not None:
                ends[index - 1] = _integer(entries[first], "endOffset", fault,
                                           entries[first].get("name"))
            first = index if entry.get("type") == "reg" else None
        return ends
    following = toc_start
    for index in range(len(entries) - 1, -1, -1):
        entry = entries[index]
        if entry.get("type") in ("reg", "chunk"):
            ends[index] = following
            if _integer(entry, "offset", fault, entry.get("name")) \
                    and not entry.get("innerOffset"):
                following = entry["offset"]
    return ends


# ------------------------------------------------------------ helpers

class _Fault:
    """Makes the CdiError of a fault of the TOC of one layer: a lie, or
    (unknown) NotSeekable, what this module does not read."""

    def __init__(self, image_name, layer, kind):
        self.prefix = f"{image_name}: layer {layer}: {kind} TOC"

    def __call__(self, text):
        return CdiError(f"{self.prefix}: {text}")

    def unknown(self, text):
        return NotSeekable(f"{self.prefix}: {text}")


def _clean(name, fault):
    """NAME as the layer's tar path; CdiError if absolute or with "..": a
    lie, for no runtime would put that file in the image."""
    if not isinstance(name, str):
        raise fault(f"an entry named {name!r}, not a string")
    if name.startswith("/"):
        raise fault(f"entry {name!r}: an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise fault(f"entry {name!r}: a name with a '..' component")
    if "\0" in name:
        raise fault(f"entry {name!r}: a name with a NUL byte")
    return "/".join(parts)


def _integer(entry, key, fault, name):
    value = entry.get(key, 0)
    if type(value) is not int or value < 0:
        raise fault(f"entry {name!r}: {key} is {value!r}, not a byte count")
    return value


def _numbers(text, count):
    parts = text.split(":")
    if len(parts) != count or not all(part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


def _check_toc_size(length, uncompressed, blob_size, fault, limit):
    if length > blob_size:
        raise fault(f"the TOC ({length} bytes) is larger than the layer ({blob_size} bytes)")
    if length > limit or (uncompressed or 0) > limit:
        raise fault(f"the TOC ({max(length, uncompressed or 0)} bytes) is larger than the "
                    f"limit, {limit} bytes")
    if length == 0:
        raise fault("the TOC is empty")


def _read(read_range, start, end, fault):
    data = read_range(start, end)
    if len(data) != end - start:
        raise fault(f"asked for bytes {start}-{end} of the blob, got {len(data)} bytes")
    return data


def _json(text, fault):
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise fault(f"the TOC is not JSON ({error})") from None
