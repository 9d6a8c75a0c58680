"""Blobs of the cache's layout served as layers: in place, each checked
against its digest once and then remembered; a gzip blob unpacked once
into the cache as a sparse file.

A blob that is missing or no longer matches its digest raises
BlobMismatch, so that the caller can fetch it again.  The unpacked copy of
a gzip blob is written under a temporary name and renamed once whole and
checked: no reader ever finds half of one.
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import stat
import tempfile
import zlib

from ..cache import file_name
from ..errors import CdiError
from ..layer import FileSegment, Layer
from ..progress import Progress, describe_size
from ..save import scan_members
from ..sparse import SparseWriter
from ..verify import check_digest, fingerprint, recall_check

log = logging.getLogger("cdipy")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# The last three bytes of a skippable frame's magic, 0x184D2A5?, little-endian.
ZSTD_SKIPPABLE_MAGIC = b"\x2a\x4d\x18"
UNPACK_CHUNK = 1 << 20
# The name an unpacked copy has until it is whole.
PARTIAL = ".partial-"


class BlobMismatch(CdiError):
    """A cached blob is not what its digest says: fetch it again."""

    def __init__(self, message, digest):
        super().__init__(message)
        self.digest = digest


class Blobs:
    """The blobs of LAYOUT as layers, checked unless VERIFY is false, with
    the checks remembered in RECORDS (a CheckRecords)."""

    def __init__(self, layout, records, verify):
        self.layout = layout
        self.records = records
        self.verify = verify
        self.unpacked = layout.cache.entries("unpacked")
        self.fresh = set()  # digests of files just written, and checked as they were

    def blob_layer(self, index, descriptor):
        """Layer INDEX: the blob DESCRIPTOR (of a manifest) as it is."""
        digest = descriptor["digest"]
        layer = self.open_layer(index, digest, self.layout.blob_path(digest), "blob",
                                descriptor.get("size"))
        try:
            self.check(layer, f"{self.layout.blob_words} {digest}")
        except BaseException:
            layer.close()
            raise
        return layer

    def unpacked_layer(self, index, descriptor, expected=None):
        """Layer INDEX: the gzip blob DESCRIPTOR decompressed, unpacked into
        the cache if it is not yet; EXPECTED, if given, is the digest the
        result must have (an image layer's diffID)."""
        digest = descriptor["digest"]
        self.layout.blob_path(digest)  # refuses a digest that could name another file
        with self.unpacking():
            layer = self.unpacked_copy(index, digest)
            if layer is None:
                self.unpack(digest, descriptor.get("size"))
                layer = self.unpacked_copy(index, digest)
                if layer is None:
                    raise CdiError(f"{self.layout.image_name}: cannot find {digest} unpacked "
                                   f"in {self.unpacked.directory}")
        if expected is not None and layer.digest != expected:
            layer.close()
            raise CdiError(f"{self.layout.image_name}: verify: blob {digest} unpacks to "
                           f"{layer.digest} but the image says {expected}; refusing "
                           "to serve it")
        return layer

    def image_layer(self, index, descriptor, diff_id):
        """Layer INDEX of an image from an archive: a tar, perhaps gzipped,
        which must hash to DIFF_ID; with its tar members.  Of a gzip layer
        streamed from its registry, the cache keeps the unpacked copy alone."""
        if os.path.exists(self.layout.blob_path(descriptor["digest"])):
            with self.open_blob(descriptor["digest"]) as file:
                magic = file.read(4)
        else:
            magic = GZIP_MAGIC  # the unpacked copy, else BlobMismatch: fetch it
        compression = compression_of(magic)
        if compression == "gzip" or (compression == "zstd" and zstd_available()):
            layer = self.unpacked_layer(index, descriptor, expected=diff_id)
        elif compression == "zstd":
            raise CdiError(f"{self.layout.image_name}: layer {index} is compressed with "
                           "zstd, which this plugin unpacks only with python3-zstandard")
        else:
            layer = self.blob_layer(index, descriptor)
            if descriptor["digest"] != diff_id:
                layer.close()
                raise CdiError(f"{self.layout.image_name}: verify: layer {index} is "
                               f"{descriptor['digest']} but the image says {diff_id}")
        try:
            layer.members = scan_members(layer.sources[0].fd) if layer.size else []
        except Exception as error:  # tarfile raises more than TarError
            layer.close()
            raise CdiError(f"{self.layout.image_name}: layer {index} is not a tar "
                           f"archive: {error}") from None
        return layer

    # ------------------------------------------------------------ helpers

    def open_blob(self, digest):
        """The cached blob DIGEST, open for reading; BlobMismatch if it is
        missing (a start interrupted after removing it, say)."""
        try:
            return open(self.layout.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobMismatch(f"{self.layout.image_name}: {self.layout.blob_words} {digest} "
                               "is missing", digest) from None

    def open_layer(self, index, digest, path, origin, size=None):
        """Layer INDEX over the file at PATH, whose digest is DIGEST."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobMismatch(f"{self.layout.image_name}: {self.layout.blob_words} {digest} "
                               "is missing", digest) from None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or (size is not None and status.st_size != size):
            os.close(fd)
            raise BlobMismatch(f"{self.layout.image_name}: {self.layout.blob_words} {digest} "
                               f"has {status.st_size} bytes, the manifest says {size}", digest)
        layer = Layer(index, digest, "cache" if origin == "unpacked" else self.layout.served_from)
        layer.origin = origin
        layer.add_file(FileSegment(status.st_size, fd=fd))
        return layer

    def check(self, layer, what):
        """Make sure LAYER hashes to its digest: it was checked before and is
        unchanged since, or was just written and checked (by skopeo, or
        unpacked here), or hash it now."""
        if not self.verify or recall_check(layer, self.records):
            return
        if layer.digest in self.fresh:
            layer.verified = True
            self.records.store(layer.digest, fingerprint(layer), [])
            return
        log.debug(f"checking {what}: not checked before, or changed since")
        try:
            zeros = check_digest(layer, self.layout.image_name)
        except CdiError as error:
            raise BlobMismatch(f"{self.layout.image_name}: {what} no longer matches its "
                               f"digest ({error})", layer.digest) from None
        layer.learn_zeros(zeros)
        self.records.store(layer.digest, fingerprint(layer), zeros)

    @contextlib.contextmanager
    def unpacking(self):
        """Hold the lock of the unpacked copies (waiting for another nbdkit
        unpacking), with what unpackings cut short left removed."""
        if self.unpacked.directory is None:
            raise CdiError(f"{self.layout.image_name}: no cache directory to unpack gzip "
                           "blobs into: HOME is not set; pass cache=DIR")
        with self.layout.cache.locked("unpacked", self.layout.image_name,
                                      (PARTIAL, "an unpacking cut short")):
            yield

    def record_unpacked(self, digest, unpacked_digest):
        """Record that blob DIGEST, unpacked (the file named for it), has
        UNPACKED_DIGEST: sha256-HEX.json beside it."""
        self.unpacked.write(file_name(digest) + ".json",
                            json.dumps({"digest": unpacked_digest}).encode())

    def holds_unpacked(self, digest):
        """Whether the cache holds blob DIGEST unpacked, with its record."""
        name = file_name(digest)
        return os.path.exists(self.unpacked.path(name)) and \
            os.path.exists(self.unpacked.path(name + ".json"))

    def unpacked_copy(self, index, digest):
        """The checked Layer of blob DIGEST unpacked, or None if there is
        none (or it is damaged: then it is removed)."""
        name = file_name(digest)
        path = self.unpacked.path(name)
        try:
            unpacked_digest = json.loads(self.unpacked.read(name + ".json") or "{}")["digest"]
            layer = self.open_layer(index, unpacked_digest, path, "unpacked")
        except (ValueError, KeyError, CdiError):
            return None
        try:
            self.check(layer, f"{digest} unpacked")
        except BlobMismatch as error:
            log.debug(f"unpacking again: {error}")
            layer.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        return layer

    def unpack(self, digest, size):
        """Decompress gzip blob DIGEST into the cache, sparse, checking the
        blob against DIGEST as it is read."""
        image_name = self.layout.image_name
        name = file_name(digest)
        blob_hash, unpacked_hash = hashlib.sha256(), hashlib.sha256()
        # Under a temporary name until whole and checked; one left by a
        # process killed meanwhile is removed under the next lock.
        try:
            out_fd, temporary = tempfile.mkstemp(prefix=PARTIAL, dir=self.unpacked.directory)
        except OSError as error:
            raise CdiError(f"{image_name}: cannot unpack {digest} in "
                           f"{self.unpacked.directory}: {error.strerror}") from None
        mismatch = BlobMismatch(f"{image_name}: {self.layout.blob_words} {digest} no longer "
                                "matches its digest", digest)
        try:
            with self.open_blob(digest) as blob:
                try:
                    magic = blob.read(4)
                    blob.seek(0)
                    written = decompress_sparse(
                        blob, out_fd, blob_hash, unpacked_hash,
                        compression=compression_of(magic) or "gzip",
                        what=f"{image_name}: blob {digest}", size=size)
                except CdiError:
                    # A blob damaged in the cache is fetched again; one
                    # damaged at its source is an error.
                    if sha256_of(blob) != digest:
                        raise mismatch from None
                    raise
            if "sha256:" + blob_hash.hexdigest() != digest:
                raise mismatch
            os.replace(temporary, self.unpacked.path(name))
            temporary = None
        except OSError as error:
            raise CdiError(f"{image_name}: cannot unpack {digest} in "
                           f"{self.unpacked.directory}: {error.strerror}") from None
        finally:
            os.close(out_fd)
            if temporary is not None:
                os.unlink(temporary)
        unpacked_digest = "sha256:" + unpacked_hash.hexdigest()
        self.record_unpacked(digest, unpacked_digest)
        log.debug(f"unpacked {digest}: {describe_size(written)}, {unpacked_digest}")
        self.fresh.add(unpacked_digest)  # checked as it was written


def sha256_of(file):
    """The digest of the whole of FILE (hashlib.file_digest is Python 3.11+)."""
    file.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(UNPACK_CHUNK), b""):
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class Gunzip:
    """A gzip stream decompressed as it is fed, piece by piece; its members
    one after another, as gunzip reads them."""
    name = "gzip"
    errors = (zlib.error,)

    def __init__(self):
        self.decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def feed(self, data, write):
        """WRITE the bytes DATA decompresses to, UNPACK_CHUNK at most at a
        time; one of errors if it is not gzip."""
        while data:
            write(self.decompressor.decompress(data, UNPACK_CHUNK))
            data = self.decompressor.unconsumed_tail
            if self.decompressor.eof and self.decompressor.unused_data:
                data = self.decompressor.unused_data
                self.decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def ended(self):
        """Whether what was fed ends where a gzip member does."""
        return self.decompressor.eof


class Unzstd:
    """A zstd stream, its frames one after another, decompressed as it is
    fed (python3-zstandard's stream_writer: its output goes out
    UNPACK_CHUNK at most at a time, however well the input compresses)."""
    name = "zstd"

    def __init__(self):
        import zstandard  # noqa: PLC0415 (a package only zstd layers need)
        self.errors = (zstandard.ZstdError,)
        self.out = None
        self.writer = zstandard.ZstdDecompressor().stream_writer(self, write_size=UNPACK_CHUNK)

    def feed(self, data, write):
        self.out = write
        self.writer.write(data)

    def write(self, data):  # the stream_writer's output
        self.out(data)
        return len(data)

    def ended(self):
        return True  # a stream cut short fails the digests


def zstd_available():
    return importlib.util.find_spec("zstandard") is not None


def decompressor(compression):
    """A Gunzip or Unzstd for COMPRESSION, "gzip" or "zstd" (compression_of)."""
    return Unzstd() if compression == "zstd" else Gunzip()


def compression_of(head):
    """"gzip", "zstd" or None (not compressed, or not known): what the first
    bytes of a blob, HEAD (4 are enough), say, as containers/image decides;
    the media type is only a hint (ctr-remote writes gzip bytes under a
    tar+zstd type).  A zstd skippable frame (magic 0x184D2A50 to 0x184D2A5F)
    counts as zstd."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[0] & 0xF0 == 0x50
                                  and head[1:4] == ZSTD_SKIPPABLE_MAGIC):
        return "zstd"
    return None


def decompress_sparse(source, out_fd, source_hash, output_hash, *, what, size=None,
                  compression="gzip"):
    """Decompress the gzip (or zstd) stream SOURCE into OUT_FD, leaving
    all-zero blocks as holes; update the two hashes; return the bytes
    written."""
    inflate = decompressor(compression)
    progress = Progress("unpacked", size or 0)
    output = SparseWriter(out_fd, output_hash)
    try:
        for data in iter(lambda: source.read(UNPACK_CHUNK), b""):
            source_hash.update(data)
            progress.add(len(data))
            inflate.feed(data, output.write)
        if not inflate.ended():
            raise CdiError(f"{what}: the gzip stream ends early: the blob is cut short")
        return output.finish()
    except inflate.errors as error:
        raise CdiError(f"{what} is not a valid {inflate.name} stream ({error})") from None
    except OSError as error:
        raise CdiError(f"{what}: cannot unpack into the cache ({error.strerror})") from None
