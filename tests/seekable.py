"""Seekable layers made byte by byte, as containers/storage writes
zstd:chunked and stargz-snapshotter writes eStargz: every piece of a file a
zstd frame or gzip member of its own, the TOC where the annotations and
the footer say.  The unit tests read them with cdipy.oci.toc; EDIT changes
the TOC's JSON document before it is written (its checksum follows), so
that a test can make it lie."""

import hashlib
import io
import json
import tarfile
import zlib

import zstandard

from tars import MTIME

NEW_PREFIX = "io.github.containers.zstd-chunked."   # podman >= 4.4
OLD_PREFIX = "io.containers.zstd-chunked."          # podman 4.3
ESTARGZ_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ZERO_RUN = 1024  # containers/storage's holesThreshold


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def header(name, size, directory=False):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = (0, MTIME) if directory else (size, MTIME)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT)


def padding(size):
    return bytes(-size % tarfile.BLOCKSIZE)


def zstd_frame(data):
    return zstandard.ZstdCompressor().compress(data)


def skippable(data):
    return b"\x50\x2a\x4d\x18" + len(data).to_bytes(4, "little") + data


def zstd_chunked(files, *, prefix=NEW_PREFIX, edit=None, checksum=None):
    """(blob, layer descriptor) of a zstd:chunked layer of FILES: (name,
    content, [chunk sizes]) each, in order (a name ending in "/" is a
    directory); a chunk of zeros of ZERO_RUN bytes or more is a zeros chunk.
    PREFIX says which annotations (NEW_PREFIX or OLD_PREFIX, which also
    means no tar-split, and the 40-byte footer); CHECKSUM overrides the
    manifest-checksum."""
    blob, entries, before = bytearray(), [], b""
    for name, content, sizes in files:
        if name.endswith("/"):
            before += header(name, 0, directory=True)
            entries.append({"type": "dir", "name": name.rstrip("/")})
            continue
        blob += zstd_frame(before + header(name, len(content)))
        before = padding(len(content))
        entry = {"type": "reg", "name": name, "size": len(content)}
        if content:
            entry.update(digest=sha256(content), offset=len(blob))
        file_entries, start = [entry], 0
        for size in sizes or ([len(content)] if content else []):
            piece = content[start:start + size]
            chunk = entry if start == 0 else {"type": "chunk", "name": name,
                                              "chunkOffset": start}
            chunk.update(offset=len(blob), chunkSize=size, chunkDigest=sha256(piece))
            if size >= ZERO_RUN and not piece.strip(b"\0"):
                chunk["chunkType"] = "zeros"
            if start:
                file_entries.append(chunk)
            blob += zstd_frame(piece)
            start += size
        if len(file_entries) == 1:  # one chunk: no chunk fields, as containers/storage
            for key in ("chunkSize", "chunkDigest", "chunkType"):
                entry.pop(key, None)
        if content:
            entry["endOffset"] = len(blob)
        entries += file_entries
    blob += zstd_frame(before + bytes(2 * tarfile.BLOCKSIZE))
    document = {"version": 1, "entries": entries}
    tar_split = zstd_frame(b'{"type":1}\n')
    if prefix == NEW_PREFIX:
        document["tarSplitDigest"] = sha256(tar_split)
    if edit:
        edit(document)
    text = json.dumps(document).encode()
    compressed = zstd_frame(text)
    manifest_offset = len(blob) + 8
    blob += skippable(compressed)
    annotations = {
        prefix + "manifest-checksum": checksum or sha256(compressed),
        prefix + "manifest-position": f"{manifest_offset}:{len(compressed)}:{len(text)}:1"}
    footer = [manifest_offset, len(compressed), len(text), 1]
    if prefix == NEW_PREFIX:
        annotations[prefix + "tarsplit-position"] = f"{len(blob) + 8}:{len(tar_split)}:11"
        footer += [len(blob) + 8, len(tar_split), 11]
        blob += skippable(tar_split)
    footer_bytes = b"".join(number.to_bytes(8, "little") for number in footer)
    blob += skippable(footer_bytes + b"GNUlInUx")
    return bytes(blob), {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                         "digest": sha256(blob), "size": len(blob),
                         "annotations": annotations}


def gzip_member(data):
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()


def estargz_footer(toc_offset):
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % toc_offset
    return (b"\x1f\x8b\x08\x04" + bytes(5) + b"\xff" + len(extra).to_bytes(2, "little") + extra
            + b"\x01\x00\x00\xff\xff" + bytes(8))


def estargz(files, *, edit=None, digest=None, media_type="tar+gzip"):
    """(blob, layer descriptor) of an eStargz layer of FILES, as for
    zstd_chunked (zeros are not special in eStargz); DIGEST overrides the
    toc.digest annotation."""
    blob, entries, pending = bytearray(), [], b""
    for name, content, sizes in files:
        if name.endswith("/"):
            pending += header(name, 0, directory=True)
            entries.append({"type": "dir", "name": name})
            continue
        pending += header(name, len(content))
        entry = {"type": "reg", "name": name, "size": len(content)}
        entries.append(entry)
        if content:
            entry["digest"] = sha256(content)
        start = 0
        for size in sizes or ([len(content)] if content else []):
            blob += gzip_member(pending)
            piece, pending = content[start:start + size], b""
            chunk = entry if start == 0 else {"type": "chunk", "name": name,
                                              "chunkOffset": start}
            chunk.update(offset=len(blob), chunkDigest=sha256(piece))
            if start + size < len(content):
                chunk["chunkSize"] = size  # the last one's runs to the end of the file
            if start:
                entries.append(chunk)
            pending = piece
            start += size
        pending += padding(len(content))
    blob += gzip_member(pending + bytes(2 * tarfile.BLOCKSIZE))
    document = {"version": 1, "entries": entries}
    if edit:
        edit(document)
    text = json.dumps(document).encode()
    toc = io.BytesIO()
    with tarfile.open(fileobj=toc, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    toc_offset = len(blob)
    blob += gzip_member(toc.getvalue()) + estargz_footer(toc_offset)
    return bytes(blob), {"mediaType": f"application/vnd.oci.image.layer.v1.{media_type}",
                         "digest": sha256(blob), "size": len(blob),
                         "annotations": {ESTARGZ_DIGEST: digest or sha256(text)}}


def reader(blob, log=None):
    """read_range over BLOB, noting each range in LOG if given."""
    def read_range(start, end):
        if log is not None:
            log.append((start, end))
        return blob[start:end]
    return read_range
