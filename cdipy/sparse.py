"""Zero blocks: found in data as it goes by, and left as holes when data is
written.  One block size and one scan serve the copy path and the gzip
unpacking (which write sparse files) and the digest check (which notes the
zero ranges that extents then reports)."""

import os

# The block: all-zero blocks of this size, aligned, are holes or noted zeros.
ZERO_BLOCK = bytes(64 << 10)
BLOCK = len(ZERO_BLOCK)
# Bytes a SparseWriter gathers before writing.
GATHER = 1 << 20


def blocks(data, length=None):
    """Yield (start, size, all_zero) for each block of DATA[:LENGTH], from
    its start; the last may be short."""
    length = len(data) if length is None else length
    for start in range(0, length, BLOCK):
        size = min(BLOCK, length - start)
        # startswith compares in place: no copy of the block.
        yield start, size, data.startswith(ZERO_BLOCK[:size], start)


class SparseWriter:
    """Writes to FD from its start, all-zero blocks (aligned in the file)
    left as holes; HASH, if given, sees every byte."""

    def __init__(self, fd, hash_=None):
        self.fd = fd
        self.hash = hash_
        self.pending = bytearray()  # less than a block, or not yet flushed
        self.written = 0

    def write(self, data):
        if not self.pending and len(data) % BLOCK == 0:
            self.flush(data)  # whole blocks (a copy's usual chunk): no copy
            return
        self.pending += data
        if len(self.pending) >= GATHER:
            self.flush_pending(len(self.pending) - len(self.pending) % BLOCK)

    def finish(self):
        """Write what is left; return the file's size."""
        self.flush_pending(len(self.pending))
        os.ftruncate(self.fd, self.written)
        return self.written

    def flush_pending(self, count):
        data = bytes(self.pending[:count])
        del self.pending[:count]
        self.flush(data)

    def flush(self, data):
        for start, size, all_zero in blocks(data):
            if not all_zero:
                write_exactly(self.fd, memoryview(data)[start:start + size],
                              self.written + start)
        if self.hash is not None:
            self.hash.update(data)
        self.written += len(data)


def write_exactly(fd, data, offset):
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count
