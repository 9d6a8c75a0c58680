"""A gzip (or zstd) layer read from its registry in one stream and
decompressed as it arrives into a nameless file of the cache (a format on
the engine of arrival.py, its pieces in order): served behind the stream's
front at once, a read ahead of it waiting for it; its tar entries listed
as their headers arrive, so that the disk export needs only its own; the
blob's digest and the layer's diffID checked once it is whole.

Before nbdkit forks, whoever needs bytes advances the stream itself, a
piece at a time (threads do not survive a fork); after, the engine's
fill does, in the background, to the end.  A response that breaks off is
resumed at the byte reached (a Range from there, into the same
decompressor), with backoff, for RETRY_SECONDS without progress; then a
read of what has not arrived fails with EIO (what has is still served) and
the next such read tries again.  A stream that cannot be right (not gzip,
not a tar, a digest that does not match, a full cache) fails every read.
"""

import errno
import hashlib
import logging
import os
import tarfile

from ..errors import RegistryError
from ..layer import (
    DATA,
    Layer,
    Member,
    clean_name,
    file_extents,
    member_kind,
    merge_runs,
    read_exactly,
)
from ..progress import Progress
from ..sparse import SparseWriter
from .arrival import RETRY_SECONDS, Arrival, Broken
from .blobs import compression_of, decompressor

log = logging.getLogger("cdipy")

# Compressed bytes taken in at a time: what the front moves by, at most
# (a read waits for a whole piece to arrive: small enough for slow links).
PIECE = 256 << 10


class NotYet(Exception):
    """The bytes asked for have not arrived."""


class Stream:
    """The format of a compressed layer on the engine: layer INDEX of an
    image, whose diffID is DIFF_ID, the gzip or zstd blob DESCRIPTOR (of the
    manifest) from REGISTRY, decompressed into FD (a nameless 0600 file).
    Its pieces come in order, each named by the blob offset it starts at.
    WHOLE(stream) is called once it is whole and checked."""
    read_ahead, count = 0, None  # in order, one at a time: nothing to read ahead
    fill_idle = 0.0              # the stream must pass anyway: as fast as it comes

    def __init__(self, index, registry, descriptor, diff_id, fd, *, whole):
        self.index, self.registry, self.diff_id, self.fd = index, registry, diff_id, fd
        self.digest, self.size = descriptor["digest"], descriptor["size"]
        self.on_whole = whole
        self.image_name = registry.image_name
        self.name = f"layer {index} ({self.digest})"
        self.label = f"{self.image_name}: {self.name}"
        self.received = 0          # compressed bytes taken in
        self.front = 0             # bytes of the tar in the file, final
        self.members = []          # the Member of each entry, as its header arrives
        self.listed = False        # every entry is in members
        self.list_error = None     # why the entries cannot be listed, told once whole
        self.next_header = 0       # where the next entry's header is
        self.pieces = None         # the registry's answer being read
        # The media type is a hint; the first bytes tell (take).
        self.hinted = "zstd" if descriptor.get("mediaType", "").endswith("zstd") else "gzip"
        self.inflate = decompressor(self.hinted)
        self.blob_hash, self.tar_hash = hashlib.sha256(), hashlib.sha256()
        self.writer = SparseWriter(fd, self.tar_hash)
        self.progress = Progress(f"layer {index}: arrived", self.size)
        self.arrival = Arrival(self, lambda _: self.on_whole(self), workers=1)

    # ------------------------------------------- what a reader of it asks

    @property
    def done(self):
        """Whole, and checked."""
        return self.arrival.whole

    @property
    def failure(self):
        return self.arrival.failure

    def wait_until(self, predicate):
        """Take in until PREDICATE() is true; OSError (EIO) if it cannot be."""
        self.arrival.wait_until(predicate)

    def start(self):
        """Take in the rest in the background (once nbdkit has forked)."""
        self.arrival.start()

    def take_the_rest(self, limit, deadline):
        return self.arrival.take_the_rest(limit, deadline)

    def stop(self, timeout=RETRY_SECONDS + 5):
        return self.arrival.stop(timeout)

    # ------------------------------------------- what the engine asks

    def holds(self, piece):
        return self.received > piece

    def needed(self, offset, count):
        if self.front >= offset + count or self.received == self.size:
            return []
        return [self.received]

    def missing(self):
        return [] if self.received == self.size else [self.received]

    def left(self):
        return self.size - self.received

    def parallel(self):
        return 1

    def parked(self):
        return None

    def produce(self, piece, last):
        """Take in the piece that starts at blob offset PIECE."""
        if piece != self.received:
            return  # taken in already
        try:
            data = self.next_piece()
        except RegistryError as error:
            if error.transient:
                raise
            raise Broken(str(error)) from None
        self.take(data)

    def next_piece(self):
        """The next piece of the answer, asking for the rest of the blob
        from the byte reached if there is no answer (or it broke off)."""
        try:
            if self.pieces is None:
                self.pieces = self.registry.blob_pieces(self.digest, self.received, PIECE)
            data = next(self.pieces, b"")
        except RegistryError:
            self.pieces = None
            raise
        if not data:
            self.pieces = None
            raise RegistryError(f"{self.image_name}: the registry sent {self.received} of the "
                                f"{self.size} bytes of blob {self.digest}", transient=True)
        return data

    def take(self, data):
        """Decompress DATA into the file; list the entries it completes."""
        if self.received + len(data) > self.size:
            raise Broken(f"{self.image_name}: the registry sent more than the {self.size} "
                         f"bytes of blob {self.digest}")
        self.blob_hash.update(data)
        if self.received == 0:
            # As containers/image: ctr-remote writes gzip under a tar+zstd type.
            told = compression_of(data[:4]) or self.hinted
            if told != self.hinted:
                self.inflate = decompressor(told)
        try:
            self.inflate.feed(data, self.writer.write)
            self.writer.flush_pending(len(self.writer.pending))
            os.ftruncate(self.fd, self.writer.written)  # zeros at the end stay holes
        except self.inflate.errors as error:
            raise Broken(f"{self.image_name}: {self.name} is not a valid {self.inflate.name} "
                         f"stream ({error})") from None
        except OSError as error:
            raise Broken(f"{self.image_name}: cannot keep {self.name} in the cache: "
                         f"{error.strerror}") from None
        with self.arrival.condition:
            self.received += len(data)
            self.front = self.writer.written
        self.progress.add(len(data))
        self.list_arrived()

    def check(self):
        """The whole blob is here: check it, and the layer, against their digests."""
        if self.pieces is not None:
            self.pieces.close()  # the answer's end, unread: nothing more is due
            self.pieces = None
        if not self.inflate.ended():
            raise Broken(f"{self.image_name}: {self.name}: the {self.inflate.name} stream "
                         "ends early: the blob is cut short")
        # The digests first: a damaged blob is told as one, not as a bad tar.
        for what, digest, expected in (("blob", self.blob_hash, self.digest),
                                       ("layer", self.tar_hash, self.diff_id)):
            if "sha256:" + digest.hexdigest() != expected:
                raise Broken(f"{self.image_name}: verify: {self.name}: the {what} is "
                             f"sha256:{digest.hexdigest()}, not {expected}; refusing to serve it")
        if self.list_error:
            raise Broken(self.list_error)
        log.debug(f"{self.name} is whole ({self.front} bytes) and matches its digests")

    # ---------------------------------------------------------- listing

    def list_arrived(self):
        """List the entries whose headers have arrived."""
        while not self.listed and not self.list_error:
            reader = Arrived(self)
            reader.seek(self.next_header)
            try:
                archive = tarfile.TarFile(fileobj=reader, mode="r", encoding="utf-8",
                                          errors="surrogateescape")
                info = archive.firstmember
            except NotYet:
                return
            except Exception as error:  # tarfile raises more than TarError
                if self.next_header == 0 and self.done_arriving() and self.front == 0:
                    info = None  # an empty layer
                else:
                    self.list_error = (f"{self.image_name}: {self.name} is not a tar "
                                       f"archive: {error}")
                    return
            with self.arrival.condition:
                if info is None:
                    self.listed = True
                else:
                    self.members.append(Member(clean_name(info.name),
                                               member_kind(info.name, info.type),
                                               info.size, info.offset_data))
                    self.next_header = archive.offset
                self.arrival.condition.notify_all()

    def done_arriving(self):
        return self.received == self.size


class Arrived:
    """A file object of the bytes of STREAM that have arrived: reading
    beyond them raises NotYet, until the stream's end."""

    def __init__(self, stream):
        self.stream = stream
        self.position = 0

    def seek(self, offset, whence=os.SEEK_SET):
        self.position = offset if whence == os.SEEK_SET else self.position + offset
        return self.position

    def tell(self):
        return self.position

    def read(self, count=-1):
        stream = self.stream
        if count < 0 or self.position + count > stream.front:
            if not stream.done_arriving():
                raise NotYet
            count = max(stream.front - self.position, 0) if count < 0 \
                else min(count, max(stream.front - self.position, 0))
        data = os.pread(stream.fd, count, self.position)
        self.position += len(data)
        return data


class StreamedLayer(Layer):
    """The bytes of STREAM as they arrive: a tar whose size is known once
    it is whole, or a Window onto one of its files, readable at once."""
    reads_through_windows = True
    checked_when_whole = True

    def __init__(self, stream):
        super().__init__(stream.index, stream.diff_id, "registry")
        self.stream = stream
        self.origin = "unpacked"

    def read(self, view, offset):
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        if not self.stream.done:  # once it is, nothing changes
            self.stream.arrival.wait(offset, len(view))
        read_exactly(self.stream.fd, view, offset)

    def extents(self, offset, count, first_only=False):
        """What has arrived as its file says; what has not, as data (never
        called zero before it is known)."""
        failure = self.failure or self.stream.failure
        if failure:
            raise OSError(errno.EIO, failure)
        front = min(self.stream.front, offset + count)
        runs = file_extents(self.stream.fd, offset, front - offset, first_only) \
            if front > offset else []
        if offset + count > max(front, offset) and not (first_only and runs):
            runs.append((max(front, offset), offset + count - max(front, offset), DATA))
        return runs[:1] if first_only else merge_runs(runs)

    def prefetch(self, offset, count):
        pass

    def wait_whole(self):
        """Wait for the whole tar, then take its size and entries (it was
        checked as it arrived); OSError if it cannot arrive."""
        self.stream.wait_until(lambda: self.stream.done)
        self.size = self.stream.front
        self.members = list(self.stream.members)
        self.verified = True

    def close(self):
        """The stream's file is the source's, which closes it."""
