"""A layer as an offset map: the tar archive's bytes as a list of segments,
each either bytes in memory (tar headers) or a range of an open file (a
file's contents), and the tar members they hold; and a window onto one
file of a layer, which the disk export serves."""

import bisect
import contextlib
import errno
import os
import re
import tarfile
import threading
import time

from .sparse import ZERO_BLOCK

# Tar type flags, by what they mean to us.
TAR_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"5": "directory",
             b"1": "link", b"2": "link"}
# lseek errors that mean "this filesystem cannot tell data from holes".
NO_HOLE_SUPPORT = (errno.EINVAL, errno.EOPNOTSUPP)


class Member:
    """One entry of a layer's tar archive."""

    def __init__(self, name, kind, size, offset):
        self.name = name          # str, without a leading "./"
        self.kind = kind          # "file", "directory", "link", "whiteout", "other"
        self.size = size
        self.offset = offset      # where its data starts in the layer

    def is_disk(self):
        return self.kind == "file" and self.name.startswith("disk/")


class FileSegment:
    """LENGTH bytes of a file, from offset START: open as FD, or, in a
    layer with an opener, opened on demand by NAME (then IDENTITY, once
    known, is the (device, inode, size, mtime, ctime) it must still have)."""

    __slots__ = ("fd", "length", "name", "identity", "start")

    def __init__(self, length, fd=None, name=None, start=0):
        self.fd = fd
        self.length = length
        self.name = name
        self.identity = None
        self.start = start


LEADING_ZEROS = re.compile(rb"\0*")
# Seconds give_way sleeps.
GIVE_WAY = 50e-6
# Zeros that segments of zeros are views of.
SHARED_ZEROS = memoryview(ZERO_BLOCK)
# Kinds of extent.
DATA, HOLE, ZERO = "data", "hole", "zero"


class Layer:
    """The bytes of layer INDEX, whose digest is DIGEST (an image layer's
    diffID, an artifact blob's digest), from SERVED_FROM
    (for messages: "storage", "copy", "cache", "artifact store" or
    "registry").  OPENER, if given, opens its files on demand (see
    storage.LazyFiles); otherwise every file is open."""
    # A layer whose bytes arrive as they are read: a Window onto it reads
    # through it, not from descriptors of its own.
    reads_through_windows = False
    # A layer that checks its digest itself, once all its bytes are here.
    checked_when_whole = False

    def __init__(self, index, digest, served_from, opener=None):
        self.index = index
        self.digest = digest
        self.served_from = served_from
        self.opener = opener
        self.starts = []      # offset in the layer of each segment
        self.sources = []     # bytes, a view of zeros, or a FileSegment
        self.bytes_held = 0   # tar bytes kept in memory
        self.size = 0
        self.members = []
        self.zeros = ()       # sorted (start, end) ranges known to be all zeros
        self.failure = None   # set when the layer fails its check: reads then fail
        self.reads = 0        # calls of read; threads may lose a count: a hint only
        self.origin = ""      # what its map was made from, for the check records
        self.windows = []     # Windows onto this one
        self.description = None  # what the export serving it says it is
        self.verified = False    # its digest was checked before it was served

    def add_bytes(self, data):
        """Add tar bytes DATA.  Zeros that lead it (the padding after a file,
        the end of the archive) are a view of shared zeros, not a copy: a
        layer of many small files would otherwise keep as many zeros as
        headers in memory."""
        zeros = LEADING_ZEROS.match(data).end()
        self.add_zeros(zeros)
        if zeros < len(data):
            self.add_segment(bytes(data[zeros:]), len(data) - zeros)
            self.bytes_held += len(data) - zeros

    def add_zeros(self, count):
        while count:
            piece = min(count, len(SHARED_ZEROS))
            self.add_segment(SHARED_ZEROS[:piece], piece)
            count -= piece

    def add_segment(self, source, length):
        self.starts.append(self.size)
        self.sources.append(source)
        self.size += length

    def add_file(self, segment):
        self.add_segment(segment, segment.length)

    def files(self):
        return [source for source in self.sources if type(source) is FileSegment]

    def segments(self, offset, count):
        """Yield (source, offset within it, length) covering the range; for
        a FileSegment, the offset is in its file."""
        index = bisect.bisect_right(self.starts, offset) - 1
        end = offset + count
        while offset < end:
            source = self.sources[index]
            within = offset - self.starts[index]
            if type(source) is FileSegment:
                piece = min(source.length - within, end - offset)
                yield source, within + source.start, piece
            else:
                piece = min(len(source) - within, end - offset)
                yield source, within, piece
            offset += piece
            index += 1

    def holding(self, segment):
        """A context manager giving SEGMENT's open descriptor."""
        if self.opener is None:
            return contextlib.nullcontext(segment.fd)
        return self.opener.holding(segment)

    def read(self, view, offset):
        """Fill VIEW with the bytes at OFFSET; OSError if they can't be read."""
        self.reads += 1
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        # The common case, a read inside one file held open, costs one
        # bisect and one preadv: Python's per-request cost is what limits
        # throughput.
        index = bisect.bisect_right(self.starts, offset) - 1
        source = self.sources[index]
        within = offset - self.starts[index]
        if (type(source) is FileSegment and self.opener is None
                and within + len(view) <= source.length):
            read_exactly(source.fd, view, within + source.start)
            return
        for source, within, piece in self.segments(offset, len(view)):
            if type(source) is not FileSegment:
                view[:piece] = source[within:within + piece]
            else:
                with self.holding(source) as fd:
                    read_exactly(fd, view[:piece], within)
            view = view[piece:]

    def extents(self, offset, count, first_only=False):
        """(offset, length, kind) runs covering the range, or only the first;
        kind is DATA, HOLE or ZERO (known to read as zeros).  A range whose
        bytes can't be read raises OSError: it must never be called a hole
        or zero, or a client would copy zeros for it."""
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        runs = []
        position = offset
        for source, within, piece in self.segments(offset, count):
            if type(source) is not FileSegment:
                runs.append((position, piece, DATA))
            else:
                with self.holding(source) as fd:
                    runs += [(position + start - within, length, kind) for start, length, kind
                             in file_extents(fd, within, piece, first_only)]
            if first_only:
                break
            position += piece
        if self.zeros:
            runs = split_zeros(runs, self.zeros)
        return runs[:1] if first_only else merge_runs(runs)

    def prefetch(self, offset, count):
        for source, within, piece in self.segments(offset, count):
            if type(source) is FileSegment:
                with self.holding(source) as fd:
                    os.posix_fadvise(fd, within, piece, os.POSIX_FADV_WILLNEED)

    def fail(self, reason):
        """From now on every read fails with REASON, here and in windows."""
        self.failure = reason
        for window in self.windows:
            window.fail(reason)

    def learn_zeros(self, zeros):
        """ZEROS, sorted (start, end) ranges, read as zeros: so do the
        matching ranges of its windows."""
        self.zeros = zeros
        for window in self.windows:
            window.learn_zeros(window.zeros_within(zeros))

    def close(self):
        if self.opener is not None:
            self.opener.close()
        else:
            for segment in self.files():
                if segment.fd is not None:
                    os.close(segment.fd)
        self.sources = []
        self.starts = []



class Window(Layer):
    """A layer of the bytes of MEMBER, one file of layer PARENT, alone (a
    file, not a tar): the disk export.  It reads from descriptors of its
    own, so that closing either closes nothing of the other (but through
    a parent whose bytes arrive as they are read: reads_through_windows);
    a failed check of the parent fails it, and the zeros the parent learns
    are its too.  WHY says, for its description, why this file."""

    def __init__(self, parent, member, why):
        super().__init__(parent.index, parent.digest, parent.served_from)
        self.parent, self.member, self.why = parent, member, why
        self.through = parent if parent.reads_through_windows else None
        if self.through:
            self.size = member.size
            parent.windows.append(self)
            return
        try:
            for source, within, piece in parent.segments(member.offset, member.size):
                if type(source) is not FileSegment:
                    self.add_segment(source[within:within + piece], piece)
                    continue
                with parent.holding(source) as fd:
                    self.add_file(FileSegment(piece, fd=os.dup(fd), start=within))
        except BaseException:
            self.close()
            raise
        # Registered before its state is copied: a check failing meanwhile
        # reaches it either way.
        parent.windows.append(self)
        self.failure = self.failure or parent.failure
        self.zeros = self.zeros_within(parent.zeros)

    def read(self, view, offset):
        if self.through is None:
            return super().read(view, offset)
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        return self.through.read(view, offset + self.member.offset)

    def extents(self, offset, count, first_only=False):
        if self.through is None:
            return super().extents(offset, count, first_only)
        if self.failure:
            raise OSError(errno.EIO, self.failure)
        start = self.member.offset
        return [(position - start, length, kind) for position, length, kind
                in self.through.extents(offset + start, count, first_only)]

    def prefetch(self, offset, count):
        if self.through is None:
            super().prefetch(offset, count)

    def zeros_within(self, zeros):
        """The parts of ZEROS, ranges of the parent layer, inside this
        window, in the window's offsets."""
        start, end = self.member.offset, self.member.offset + self.member.size
        return [(max(zero_start, start) - start, min(zero_end, end) - start)
                for zero_start, zero_end in zeros
                if zero_start < end and zero_end > start]


def identity(status):
    """What tells a file apart, and tells that it changed."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


def member_kind(name, typeflag):
    if name.rstrip("/").rsplit("/", 1)[-1].startswith(".wh."):
        return "whiteout"
    if name.endswith("/"):
        return "directory"  # old tars mark directories by name alone
    return TAR_KINDS.get(typeflag, "other")


def clean_name(name):
    text = os.fsdecode(name)
    while text.startswith("./"):
        text = text[2:]
    return text


def read_exactly(fd, view, offset):
    count = os.preadv(fd, [view], offset)
    while count < len(view):
        if count == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        view = view[count:]
        offset += count
        count = os.preadv(fd, [view], offset)


def file_extents(fd, offset, count, first_only=False):
    """(offset, length, DATA or HOLE) runs of FD's range, from SEEK_DATA and
    SEEK_HOLE.  A range past the end of the file raises OSError (EIO)."""
    end = offset + count
    check_file_covers(fd, end)
    runs = []
    while offset < end and not (first_only and runs):
        data = seek(fd, offset, os.SEEK_DATA, end)
        if data > offset:
            runs.append((offset, data - offset, HOLE))
        if data >= end or (first_only and runs):
            break
        hole = seek(fd, data, os.SEEK_HOLE, end)
        runs.append((data, hole - data, DATA))
        offset = hole
    # Shortened meanwhile?  Then the "hole" at its end was lost data.
    check_file_covers(fd, end)
    return runs


def check_file_covers(fd, end):
    size = os.fstat(fd).st_size
    if size < end:
        raise OSError(errno.EIO, f"the file in storage has {size} bytes, "
                                 f"the layer needs {end}")


def seek(fd, offset, whence, end):
    """lseek, capped at END.  Past the last data SEEK_DATA fails with ENXIO:
    a hole up to END.  A filesystem that can't tell holes: data up to END."""
    try:
        return min(os.lseek(fd, offset, whence), end)
    except OSError as error:
        if error.errno == errno.ENXIO and whence == os.SEEK_DATA:
            return end
        if error.errno in NO_HOLE_SUPPORT:
            return offset if whence == os.SEEK_DATA else end
        raise


def member_from_header(header, name, size, offset):
    """The Member for entry NAME, whose own tar header block is HEADER."""
    # Only the type flag is needed: parsing whole headers with tarfile
    # took 40% of the time to ready of a layer with thousands of files.
    typeflag = bytes(header[156:157]) if len(header) == tarfile.BLOCKSIZE else b""
    return Member(name, member_kind(name, typeflag), size, offset)


def split_zeros(runs, zeros):
    """RUNS with the parts of DATA runs inside ZEROS, sorted (start, end)
    ranges, turned into ZERO runs."""
    starts = [start for start, _ in zeros]
    result = []
    for start, length, kind in runs:
        offset, end = start, start + length
        if kind != DATA:
            result.append((start, length, kind))
            continue
        index = max(bisect.bisect_right(starts, offset) - 1, 0)
        while offset < end:
            zero_start, zero_end = zeros[index] if index < len(zeros) else (end, end)
            if zero_end <= offset:
                index += 1
                continue
            if zero_start > offset:
                piece = min(zero_start, end) - offset
                result.append((offset, piece, DATA))
            else:
                piece = min(zero_end, end) - offset
                result.append((offset, piece, ZERO))
            offset += piece
    return result


def merge_runs(runs):
    """RUNS with neighbours of the same kind joined."""
    merged = []
    for start, length, kind in runs:
        if merged and merged[-1][2] == kind:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, kind)
        else:
            merged.append((start, length, kind))
    return merged


def give_way():
    """In a thread of its own (mapping a layer in the background, say), let
    a thread answering a client take the GIL: a sleep, not sleep(0), which
    may take the GIL straight back."""
    if threading.current_thread() is not threading.main_thread():
        time.sleep(GIVE_WAY)
