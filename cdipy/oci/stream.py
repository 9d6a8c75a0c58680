"""A gzip (or zstd) layer read from its registry in one stream and decompressed as it
arrives into a nameless file of the cache: served behind the stream's
front at once, a read ahead of it waiting for it; its tar entries listed
as their headers arrive, so that the disk export needs only its own; the
blob's digest and the layer's diffID checked once it is whole.

Before nbdkit forks, whoever needs bytes advances the stream itself, a
piece at a time (threads do not survive a fork); after, a thread of its
own does, in the background, to the end.  A response that breaks off is
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
import threading
import time

from ..errors import CdiError, RegistryError
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
from .blobs import decompressor
from .chunks import RETRY_SECONDS, retried

log = logging.getLogger("cdipy")

# Compressed bytes taken in at a time: what the front moves by, at most
# (a read waits for a whole piece to arrive: small enough for slow links).
PIECE = 256 << 10


class NotYet(Exception):
    """The bytes asked for have not arrived."""


class Stream:
    """Layer INDEX of an image, whose diffID is DIFF_ID: the gzip blob
    DESCRIPTOR (of the manifest) from REGISTRY, decompressed into FD (a
    nameless 0600 file).  CONDITION, shared by the streams of one image,
    is notified whenever one moves; WHOLE(stream) is called once it is
    whole and checked."""

    def __init__(self, index, registry, descriptor, diff_id, fd, *, condition, whole):
        self.index, self.registry, self.diff_id, self.fd = index, registry, diff_id, fd
        self.digest, self.size = descriptor["digest"], descriptor["size"]
        self.condition, self.whole = condition, whole
        self.image_name = registry.image_name
        self.received = 0          # compressed bytes taken in
        self.front = 0             # bytes of the tar in the file, final
        self.done = False          # whole, and checked
        self.failure = None        # why it cannot be right: every read fails
        self.stalled = None        # why the registry gives no more, for now
        self.members = []          # the Member of each entry, as its header arrives
        self.listed = False        # every entry is in members
        self.list_error = None     # why the entries cannot be listed, told once whole
        self.next_header = 0       # where the next entry's header is
        self.pieces = None         # the registry's answer being read
        self.thread = None
        self.stopping = False
        self.inflate = decompressor("zstd" if descriptor.get("mediaType", "").endswith("zstd")
                                    else "gzip")
        self.blob_hash, self.tar_hash = hashlib.sha256(), hashlib.sha256()
        self.writer = SparseWriter(fd, self.tar_hash)
        self.progress = Progress(f"layer {index}: arrived", self.size)

    def name(self):
        return f"layer {self.index} ({self.digest})"

    # ------------------------------------------------------- taking in

    def advance(self, until=None):
        """Take in one piece, retrying with backoff (until UNTIL, a monotonic
        time, if given); CdiError if the stream failed or the registry stays
        away (then it is stalled)."""
        try:
            data = retried(self.next_piece, lambda: self.stopping or (
                until is not None and time.monotonic() > until))
        except RegistryError as error:
            if not error.transient:
                self.fail(str(error))
            with self.condition:
                self.stalled = str(error)
                self.condition.notify_all()
            raise
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
        """Decompress DATA into the file; list the entries it completes;
        check the whole once it is."""
        if self.received + len(data) > self.size:
            self.fail(f"{self.image_name}: the registry sent more than the {self.size} "
                      f"bytes of blob {self.digest}")
        self.blob_hash.update(data)
        try:
            self.inflate.feed(data, self.writer.write)
            self.writer.flush_pending(len(self.writer.pending))
            os.ftruncate(self.fd, self.writer.written)  # zeros at the end stay holes
        except self.inflate.errors as error:
            self.fail(f"{self.image_name}: {self.name()} is not a valid {self.inflate.name} "
                      f"stream ({error})")
        except OSError as error:
            self.fail(f"{self.image_name}: cannot keep {self.name()} in the cache: "
                      f"{error.strerror}")
        with self.condition:
            self.received += len(data)
            self.front = self.writer.written
            self.stalled = None
            self.condition.notify_all()
        self.progress.add(len(data))
        self.list_arrived()
        if self.received == self.size:
            self.finish()

    def finish(self):
        """The whole blob is here: check it, and the layer, against their digests."""
        if not self.inflate.ended():
            self.fail(f"{self.image_name}: {self.name()}: the gzip stream ends early: the "
                      "blob is cut short")
        # The digests first: a damaged blob is told as one, not as a bad tar.
        for what, digest, expected in (("blob", self.blob_hash, self.digest),
                                       ("layer", self.tar_hash, self.diff_id)):
            if "sha256:" + digest.hexdigest() != expected:
                self.fail(f"{self.image_name}: verify: {self.name()}: the {what} is "
                          f"sha256:{digest.hexdigest()}, not {expected}; refusing to serve it")
        if self.pieces is not None:
            self.pieces.close()  # the answer's end, unread: nothing more is due
            self.pieces = None
        if self.list_error:
            self.fail(self.list_error)
        with self.condition:
            self.done = True
            self.condition.notify_all()
        log.debug(f"{self.name()} is whole ({self.front} bytes) and matches its digests")
        self.whole(self)

    def fail(self, reason):
        """From now on every read fails with REASON; raises it."""
        with self.condition:
            self.failure = self.failure or reason
            self.condition.notify_all()
        raise CdiError(self.failure)

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
                    self.list_error = (f"{self.image_name}: {self.name()} is not a tar "
                                       f"archive: {error}")
                    return
            with self.condition:
                if info is None:
                    self.listed = True
                else:
                    self.members.append(Member(clean_name(info.name),
                                               member_kind(info.name, info.type),
                                               info.size, info.offset_data))
                    self.next_header = archive.offset
                self.condition.notify_all()

    def done_arriving(self):
        return self.received == self.size

    # ---------------------------------------------------------- serving

    def wait_for(self, end, until=None):
        """Until the file holds bytes up to END (or UNTIL() is true), advancing
        the stream where no thread does; OSError (EIO) if it cannot.  A
        thread that had given up before this read is started again, once."""
        with self.condition:
            may_restart = self.thread is not None and not self.thread.is_alive()
        while True:
            with self.condition:
                if self.failure:
                    raise OSError(errno.EIO, self.failure)
                if (until() if until else self.front >= end or self.done):
                    return
                if self.thread is not None and self.thread.is_alive():
                    # Timed: a thread that gave up notifies, then ends.
                    self.condition.wait(timeout=1.0)
                    continue
                if self.stopping:
                    raise OSError(errno.EIO, f"{self.image_name}: the server is stopping")
                if self.thread is not None and not may_restart:
                    raise OSError(errno.EIO, self.stalled or f"{self.name()}: not arrived")
            if self.thread is not None:
                may_restart = False
                self.start()
                continue
            try:
                self.advance()
            except CdiError as error:
                raise OSError(errno.EIO, str(error)) from None

    def start(self):
        """Take in the rest in a thread of its own (once nbdkit has forked)."""
        with self.condition:
            if self.done or self.failure or self.stopping or (
                    self.thread and self.thread.is_alive()):
                return
            self.thread = threading.Thread(target=self.run, name=f"stream-{self.index}",
                                           daemon=True)
            self.thread.start()

    def run(self):
        try:
            while not (self.done or self.stopping):
                self.advance()
        except CdiError as error:
            log.debug(str(error))
        except Exception as error:  # a bug must not look like a registry gone quiet
            with self.condition:
                self.failure = self.failure or (f"{self.image_name}: streaming "
                                                f"{self.name()}: {error!r}")
                self.condition.notify_all()
            log.debug(self.failure)

    def take_the_rest(self, limit, deadline):
        """If no more than LIMIT bytes of the blob are left to take in, take
        them in, or wait for the thread that does, until DEADLINE (a
        monotonic time) at most; whether it is whole.  A thread that gave
        up is not started again.  Why: a client that read the whole disk
        stops the server before the tar's end has arrived, and that end is
        little."""
        with self.condition:
            if self.done or self.failure or self.size - self.received > limit or (
                    self.thread is not None and not self.thread.is_alive()):
                return self.done
        while time.monotonic() < deadline:
            with self.condition:
                if self.done or self.failure:
                    break
                if self.thread is not None:
                    if not self.thread.is_alive():
                        break
                    self.condition.wait(timeout=deadline - time.monotonic())
                    continue
            try:
                self.advance(until=deadline)
            except CdiError:
                break
        if self.done:
            log.debug(f"{self.name()}: taken in to its end as the server stops")
        return self.done

    def stop(self, timeout=RETRY_SECONDS + 5):
        """Stop the thread, waiting TIMEOUT at most; whether it has (else
        its file must stay open)."""
        self.stopping = True
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout)
        return self.thread is None or not self.thread.is_alive()


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
            self.stream.wait_for(offset + len(view))
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
        self.stream.wait_for(0, until=lambda: self.stream.done)
        self.size = self.stream.front
        self.members = list(self.stream.members)
        self.verified = True

    def close(self):
        """The stream's file is the source's, which closes it."""
