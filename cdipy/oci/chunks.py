"""A blob served while it arrives: read from the registry a chunk at a time,
as clients ask for it and, behind them, in order until it is whole; kept
in the cache as it comes, so that a restart resumes where it stopped.

CACHE/partial/sha256-HEX (cache.py names it) holds the blob's bytes (sparse: what has not
arrived is a hole) and sha256-HEX.chunks one byte per chunk, set once that
chunk is written and synced, never before: a process killed at any point
leaves a record that tells only the truth, and a blob no one names whole.
Several nbdkit processes may fetch one blob at once: each writes whole
chunks, the same bytes, and reads the record before fetching.  Once every
chunk is held the blob is hashed against its digest; if it matches, it
becomes a blob of the cache's layout (the warm path), if not every read
fails from then on and the partial files are removed.

A pull-through cache that does not hold the blob yet answers a range with
the whole blob (HTTP 200): that answer is kept, every chunk of it stored
as it arrives, the same way, and nothing else is fetched meanwhile, so that
the blob is sent once; once the cache holds it, ranges are answered as
ranges.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import os

from ..cache import file_name, locked_file, make_private
from ..errors import CdiError, RegistryError
from ..layer import DATA, FileSegment, Layer, merge_runs, read_exactly
from ..progress import describe_size
from ..sparse import write_exactly
from ..verify import note_zeros
from .arrival import Arrival, Broken

log = logging.getLogger("cdipy")

# Bytes fetched by one request: a 4 KiB read costs one chunk; a boot reads
# a few MiB in small pieces, so a chunk should hold many of them.
CHUNK = 2 << 20
# Chunks fetched at once for clients (a copy keeps them all busy)...
IN_FLIGHT = 4
# ...and ahead of a client reading in order.
READ_AHEAD = 4
# The fill fetches only once clients have read nothing for this long: a
# booting VM, or a copy, has the link to itself.
FILL_IDLE = 1.0


class PartialBlob:
    """Blob DIGEST of SIZE bytes, in the partial/ area of CACHE (a
    cache.Cache) for IMAGE_NAME: its bytes (fd) and which chunks it holds
    (held).

    sha256-HEX.lock, never removed, is what processes lock: shared while
    one writes a chunk, exclusive while one opens the files, makes them
    anew, or checks the blob and names it whole (then removes them).  Each
    lock is taken on a descriptor of its own, so that threads of one
    process exclude each other as processes do."""

    def __init__(self, cache, digest, size, image_name):
        self.digest, self.size, self.image_name = digest, size, image_name
        self.count = -(-size // CHUNK)
        name = file_name(digest)
        directory = cache.path("partial")
        self.path = cache.path("partial", name)
        self.record_path = cache.path("partial", name + ".chunks")
        self.lock_path = cache.path("partial", name + ".lock")
        self.fd = self.record_fd = None
        try:
            make_private(directory)
            with self.locked(fcntl.LOCK_EX):
                self.fd = open_private(self.path)
                self.record_fd = open_private(self.record_path)
                self.held = self.read_record(directory)
        except OSError as error:
            self.close_files()
            raise CdiError(f"{image_name}: cannot keep {digest} in {directory}: "
                           f"{error.strerror}") from None
        log.debug(f"{digest}: {sum(self.held)} of {self.count} chunks of "
                  f"{describe_size(CHUNK)} held already")

    def read_record(self, directory):
        """The chunks held, from the record; a damaged one is made anew."""
        held = bytearray(os.pread(self.record_fd, self.count + 1, 0))
        if len(held) != self.count or set(held) - {0, 1} or os.fstat(self.fd).st_size > self.size:
            if any(held) or os.fstat(self.fd).st_size:
                log.debug(f"the record of {self.digest} in {directory} is damaged: "
                          "fetching the blob anew")
            held = bytearray(self.count)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.record_fd, bytes(held), 0)
            os.ftruncate(self.record_fd, self.count)
        if os.fstat(self.fd).st_size != self.size:  # a new file (truncating changes ctime)
            os.ftruncate(self.fd, self.size)
        return held

    def locked(self, how):
        return locked_file(self.lock_path, how)

    def holds(self, chunk):
        """Whether CHUNK is here, written by us or another process."""
        if not self.held[chunk]:
            self.held[chunk] = os.pread(self.record_fd, 1, chunk) == b"\1"
        return self.held[chunk]

    def span(self, chunk):
        return chunk * CHUNK, min((chunk + 1) * CHUNK, self.size)

    def store(self, chunk, data):
        """Write CHUNK's DATA, then mark it held; a full disk is a CdiError."""
        start, _ = self.span(chunk)
        try:
            with self.locked(fcntl.LOCK_SH):
                if os.fstat(self.record_fd).st_nlink == 0:
                    # Another process checked the blob and named it whole:
                    # these are its bytes, every chunk of them.
                    self.held[:] = bytes([1]) * self.count
                    return
                write_exactly(self.fd, data, start)
                os.fdatasync(self.fd)
                os.pwrite(self.record_fd, b"\1", chunk)
        except OSError as error:
            raise CdiError(f"{self.image_name}: cannot keep {self.digest} in the cache "
                           f"({os.path.dirname(self.path)}): {error.strerror}") from None
        self.held[chunk] = 1

    def missing(self):
        return [chunk for chunk in range(self.count) if not self.holds(chunk)]

    def remove(self):
        """Remove the files' names, if they are still ours (under the
        exclusive lock)."""
        for path, fd in ((self.path, self.fd), (self.record_path, self.record_fd)):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)

    def close_files(self):
        """Close the record; the data's descriptor too, unless a layer took it."""
        for fd in (self.fd, self.record_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.record_fd = None

    def close(self):
        if self.record_fd is not None:  # self.fd is the layer's, which closes it
            os.close(self.record_fd)
            self.record_fd = None


def open_private(path):
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class BlobChunks:
    """The format of PARTIAL's blob (a PartialBlob) on the engine: pieces
    are its chunks, each a range asked of REGISTRY, in any order; checked
    against the blob's digest once whole.  arrival is the engine it runs
    on (set by it)."""
    read_ahead = READ_AHEAD
    fill_idle = FILL_IDLE

    def __init__(self, registry, partial):
        self.registry, self.partial = registry, partial
        self.digest, self.size, self.count = partial.digest, partial.size, partial.count
        self.label = f"{partial.image_name}: blob {partial.digest}"
        self.arrival = None
        # Until a source answered a range of the blob as a range, one fetch
        # at a time: a pull-through cache that does not hold it yet would
        # send the whole blob to each (and fetch it for each).
        self.ranges_answered = False
        self.whole_answer = False      # a whole blob arrives: no worker fetches meanwhile
        self.parked_answer = None      # (answer, next chunk, bytes beyond it): read on later

    # -------------------------------------------------- what the engine asks

    def holds(self, chunk):
        return self.partial.holds(chunk)

    def needed(self, offset, count):
        first, last = offset // CHUNK, (offset + max(count, 1) - 1) // CHUNK
        return [chunk for chunk in range(first, min(last + 1, self.partial.count))
                if not self.partial.holds(chunk)]

    def span(self, offset, count):
        return offset // CHUNK, (offset + max(count, 1) - 1) // CHUNK

    def missing(self):
        return self.partial.missing()

    def parked(self):
        return self.parked_answer[1] if self.parked_answer else None

    def left(self):
        return sum(self.length(chunk) for chunk in self.partial.missing())

    def parallel(self):
        if self.whole_answer:
            return 0  # every chunk missing comes in that answer
        if self.parked_answer:
            return 1  # the one that reads the answer on
        return IN_FLIGHT if self.ranges_answered else 1

    def produce(self, chunk, last):
        """Fetch CHUNK; a whole blob answered instead is kept to its end,
        or, before the workers run, to chunk LAST."""
        if self.partial.holds(chunk):
            return  # a whole answer that broke off brought it
        with self.arrival.condition:
            parked, self.parked_answer = self.parked_answer, None
            if parked:
                self.whole_answer = True
        if parked:
            self.keep_whole(*parked, last)
            return
        start, end = self.partial.span(chunk)
        answer = self.registry.blob_range_or_whole(self.digest, start, end, CHUNK)
        if isinstance(answer, (bytes, bytearray)):
            self.partial.store(chunk, answer)
            self.ranges_answered = True
            return
        with self.arrival.condition:
            running = self.whole_answer
            self.whole_answer = True
        if running:  # another whole answer brings this chunk: wait for it
            answer.close()
            with self.arrival.condition:
                self.arrival.condition.wait_for(
                    lambda: not self.whole_answer or self.arrival.stopping)
            if not self.partial.holds(chunk):
                raise RegistryError(f"{self.registry.image_name}: blob {self.digest}: the "
                                    f"whole answer ended before chunk {chunk}", transient=True)
            return
        log.debug(f"{self.registry.host} sends the whole of {self.digest} for a range: "
                  "keeping every chunk of it as it arrives")
        self.keep_whole(answer, 0, b"", last)

    def keep_whole(self, answer, chunk, pending, last):
        """Store each chunk of ANSWER (the whole blob, from a source that
        ignored the range; CHUNK the next to arrive, PENDING its bytes
        arrived) as it arrives, waking the readers waiting for it; to the
        end, or to chunk LAST: then the answer is parked, read on by the
        next fetch (the workers', once they run)."""
        pending, pieces, parked = bytearray(pending), iter(answer), False
        try:
            while not self.arrival.stopping:
                while chunk < self.partial.count and len(pending) >= self.length(chunk):
                    length = self.length(chunk)
                    if not self.partial.holds(chunk):
                        self.partial.store(chunk, bytes(pending[:length]))
                    del pending[:length]
                    chunk += 1
                    if chunk - 1 == last and chunk < self.partial.count:
                        self.parked_answer, parked = (answer, chunk, bytes(pending)), True
                        return
                    self.arrival.changed(produced=True)
                if chunk == self.partial.count and pending:
                    raise RegistryError(f"{self.registry.image_name}: the registry sent more "
                                        f"than the {self.size} bytes of blob {self.digest}")
                piece = next(pieces, None)
                if piece is None:
                    break
                pending += piece
            if chunk < self.partial.count:
                raise RegistryError(f"{self.registry.image_name}: the registry sent "
                                    f"{chunk * CHUNK + len(pending)} bytes of the {self.size} "
                                    f"of blob {self.digest}", transient=True)
        finally:
            if not parked:
                answer.close()
            with self.arrival.condition:
                self.whole_answer = False
                self.arrival.condition.notify_all()

    def length(self, chunk):
        start, end = self.partial.span(chunk)
        return end - start

    def check(self):
        """Hash the whole blob: its zero ranges if it matches its digest,
        else Broken (and the partial files are removed)."""
        digest, zeros = hashlib.sha256(), []
        buffer = bytearray(1 << 20)
        # No chunk is written meanwhile, by this process or another.
        with self.partial.locked(fcntl.LOCK_EX):
            for offset in range(0, self.size, len(buffer)):
                view = memoryview(buffer)[:min(len(buffer), self.size - offset)]
                read_exactly(self.partial.fd, view, offset)
                digest.update(view)
                note_zeros(buffer, len(view), offset, zeros)
            if "sha256:" + digest.hexdigest() != self.digest:
                self.partial.remove()
                raise Broken(f"{self.registry.image_name}: verify: blob {self.digest} from "
                             f"{self.registry.host} hashes to sha256:{digest.hexdigest()}; "
                             "refusing to serve it")
        log.debug(f"{self.digest} is whole and matches its digest")
        return [tuple(zero) for zero in zeros]

    def close(self):
        if self.parked_answer:
            self.parked_answer[0].close()
            self.parked_answer = None


class RemoteBlob(Layer):
    """Layer INDEX: PARTIAL's blob, read from REGISTRY as clients read it
    (and, once started, in order behind them).  WHOLE(layer, zeros) is
    called, once, when every chunk is here and the blob matches its digest."""
    reads_through_windows = True  # a window must ask for the chunks too
    checked_when_whole = True

    def __init__(self, index, registry, partial, whole):
        super().__init__(index, partial.digest, "registry")
        self.registry, self.partial, self.on_whole = registry, partial, whole
        self.add_file(FileSegment(partial.size, fd=partial.fd))
        self.origin = "blob"  # its check record is a cached blob's, once it is one
        self.format = BlobChunks(registry, partial)
        self.arrival = Arrival(self.format, self.arrived_whole, workers=IN_FLIGHT)
        self.format.arrival = self.arrival

    def read(self, view, offset):
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        self.arrival.wait(offset, len(view))
        super().read(view, offset)

    def extents(self, offset, count, first_only=False):
        """What has arrived as its file says; what has not, as data (it is
        never called zero before it is known)."""
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        self.arrival.raise_failure()
        runs, end = [], offset + count
        while offset < end and not (first_only and runs):
            held = self.partial.holds(offset // CHUNK)
            stop = offset
            while stop < end and self.partial.holds(stop // CHUNK) == held:
                stop = min((stop // CHUNK + 1) * CHUNK, end)
            runs += (super().extents(offset, stop - offset, first_only) if held
                     else [(offset, stop - offset, DATA)])
            offset = stop
        return runs[:1] if first_only else merge_runs(runs)

    def read_range(self, start, end):
        """Bytes START to END (excluded), once they have arrived."""
        data = bytearray(end - start)
        self.read(memoryview(data), start)
        return bytes(data)

    def start(self):
        """Start fetching in the background (after nbdkit forked)."""
        self.arrival.start()

    def arrived_whole(self, zeros):
        self.learn_zeros(zeros)
        self.verified = True
        self.on_whole(self, self.zeros)

    def close(self):
        """Stop the workers; a blob whole by now is checked and kept first."""
        if not self.sources:
            return  # closed already
        stopped = self.arrival.stop()
        self.format.close()
        if not stopped:
            return  # its files stay open: a fetch may still write
        super().close()
        self.partial.close()
