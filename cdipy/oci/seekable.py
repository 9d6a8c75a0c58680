"""A file of a seekable layer (zstd:chunked, eStargz) served as its chunks
arrive: the VM disk of a containerdisk, booted after reading what the VM
reads.

The layer's compressed blob arrives on the engine (arrival.py) as any blob
does (chunks.RemoteBlob: ranges, kept in the cache's partial area as they
come, a restart resuming, the whole checked against the layer's digest and
then kept in the cache's layout).  A read of the file asks the blob for
the compressed bytes of the file's chunks it covers, as the TOC
(toc.py) places them; each chunk is decompressed alone and checked against
its digest before any of it is served, into a nameless file of the cache;
a chunk of zeros is served as zeros, a hole, with no fetch.  Once readers
have brought every chunk (a whole copy, say), the file is checked against
its own digest too; the blob's own check, once it is whole, covers every
chunk either way.

A chunk that fails its check, or a file that does not match its digest,
fails every read of the file from then on: the TOC lied, or the registry
sent other bytes.
"""

import contextlib
import errno
import hashlib
import logging
import os
import threading

from ..errors import CdiError, RegistryError
from ..layer import DATA, HOLE, Layer, file_extents, merge_runs, read_exactly
from ..sparse import write_exactly
from .toc import unpack_chunk_pieces

log = logging.getLogger("cdipy")


class SeekableFile(Layer):
    """FILE (a toc.TocFile) of the layer TOC describes, whose diffID is
    DIFF_ID, chosen as CHOICE (a disk.Choice) says; its compressed blob
    arrives in BLOB (a chunks.RemoteBlob); its chunks are decompressed into
    FD (a nameless 0600 file, this layer's to close).  It is the disk
    export as a Window onto a tar would be: member, why, parent."""
    checked_when_whole = True

    def __init__(self, choice, toc, file, blob, fd, *, diff_id):
        super().__init__(choice.index, diff_id, "registry")
        self.member, self.why, self.parent = choice.member, choice.why, self
        self.toc, self.file, self.blob, self.fd = toc, file, blob, fd
        self.size = file.size
        os.ftruncate(fd, file.size)
        self.origin = "unpacked"
        # Chunks decompressed and checked; zeros are holes already.
        self.held = bytearray(chunk.zeros for chunk in file.chunks)
        self.unpacking = {}        # chunk number -> Event, set once it is held (or failed)
        self.errors = {}           # chunk number -> why its last unpacking failed
        self.lock = threading.Lock()
        self.closed = False

    def read(self, view, offset):
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        for number in self.numbers(offset, len(view)):
            self.unpack(number)
        read_exactly(self.fd, view, offset)

    def extents(self, offset, count, first_only=False):
        """What is held, as its file says (zeros chunks are holes); what is
        not, as data (never called zero before it is known)."""
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        runs, end = [], min(offset + count, self.size)
        while offset < end and not (first_only and runs):
            number = self.file.index_at(offset)
            chunk = self.file.chunks[number]
            stop = min(chunk.file_offset + chunk.length, end)
            if chunk.zeros:
                runs.append((offset, stop - offset, HOLE))
            elif self.held[number]:
                runs += file_extents(self.fd, offset, stop - offset, first_only)
            else:
                runs.append((offset, stop - offset, DATA))
            offset = stop
        return runs[:1] if first_only else merge_runs(runs)

    def numbers(self, offset, count):
        """The numbers of the chunks that hold [OFFSET, OFFSET+COUNT)."""
        end = min(offset + count, self.size)
        if end <= offset:
            return range(0)
        return range(self.file.index_at(offset), self.file.index_at(end - 1) + 1)

    def unpack(self, number):
        """Make chunk NUMBER held: its compressed bytes fetched, decompressed
        and checked, by this thread or another; OSError (EIO) if it cannot be."""
        while not self.held[number]:
            with self.lock:
                if self.held[number]:
                    return
                event = self.unpacking.get(number)
                mine = event is None
                if mine:
                    event = self.unpacking[number] = threading.Event()
            if not mine:
                event.wait()
                if self.failure:
                    raise OSError(errno.EIO, self.failure)
                if number in self.errors:  # the reader that tried says why; the next read tries
                    raise OSError(errno.EIO, self.errors[number])
                continue
            try:
                self.errors.pop(number, None)
                self.fetch_and_check(number)
            except OSError as error:
                self.errors[number] = error.strerror
                raise
            finally:
                with self.lock:
                    del self.unpacking[number]
                event.set()
        if self.failure:
            raise OSError(errno.EIO, self.failure)

    def fetch_and_check(self, number):
        chunk = self.file.chunks[number]
        self.blob.arrival.wait(chunk.blob_offset, chunk.blob_length)
        data = bytearray(chunk.blob_length)
        read_exactly(self.blob.partial.fd, memoryview(data), chunk.blob_offset)
        position = chunk.file_offset
        try:
            for piece in unpack_chunk_pieces(self.toc, self.file, chunk, data):
                write_exactly(self.fd, piece, position)
                position += len(piece)
        except CdiError as error:
            self.fail(f"{error}; refusing to serve it")
            raise OSError(errno.EIO, self.failure) from None
        self.held[number] = 1
        if all(self.held):
            self.check_whole()

    def check_whole(self):
        """Every chunk is here: the file against its digest."""
        digest, buffer = hashlib.sha256(), bytearray(1 << 20)
        for offset in range(0, self.size, len(buffer)):
            view = memoryview(buffer)[:min(len(buffer), self.size - offset)]
            read_exactly(self.fd, view, offset)
            digest.update(view)
        if self.file.digest and "sha256:" + digest.hexdigest() != self.file.digest:
            self.fail(f"{self.toc.image_name}: verify: {self.file.name} of layer "
                      f"{self.toc.layer} is sha256:{digest.hexdigest()}, not the "
                      f"{self.file.digest} of its TOC; refusing to serve it")
            raise OSError(errno.EIO, self.failure)
        self.verified = True
        log.debug(f"{self.file.name} of layer {self.toc.layer} is whole and matches its digest")

    def prefetch(self, offset, count):
        pass

    def close(self):
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)


class ThroughBlob:
    """What a Stream reads a seekable layer's blob through, as it would a
    registry: BLOB's bytes (a chunks.RemoteBlob) as they arrive on its
    engine, so that the layer export fetches nothing the disk fetched."""

    def __init__(self, blob):
        self.blob = blob
        self.image_name, self.host = blob.registry.image_name, blob.registry.host

    def blob_pieces(self, digest, start, piece):
        for offset in range(start, self.blob.size, piece):
            try:
                data = self.blob.read_range(offset, min(offset + piece, self.blob.size))
            except OSError as error:
                raise RegistryError(error.strerror,
                                    transient=self.blob.arrival.failure is None) from None
            yield data
