"""Tar archives known byte by byte, for the tests' layers: the unit tests
and the end-to-end lab (lab.py) build them alike, and nothing here needs
nbdkit, podman or the nbd module.

Entries are (TarInfo, data) pairs; an archive is laid out as tarfile lays
it out, so that its bytes are what a layer of podman's holds.
"""

import hashlib
import os
import random
import tarfile

MTIME = 1_700_000_000  # of every crafted entry: layers are reproducible
MIB = 1 << 20


def regular(name, data=b"", mode=0o644):
    """A file entry.  DATA: its bytes, or a size: that many bytes of the
    layer's pseudo-random stream."""
    info = tarfile.TarInfo(name)
    info.size = data if isinstance(data, int) else len(data)
    info.mode, info.mtime = mode, MTIME
    return info, data


def directory(name):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    return info, None


def symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, MTIME
    return info, None


def hardlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o644, MTIME
    return info, None


def whiteout(path):
    """The entry that deletes PATH of a lower layer."""
    parent, _, base = path.rpartition("/")
    return regular(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def layer_tar(entries, tar_format=tarfile.PAX_FORMAT):
    """The bytes of a small layer holding ENTRIES, as tarfile writes them."""
    return tar_layer(entries, tar_format=tar_format).read()


def tar_layer(entries, seed="", tar_format=tarfile.PAX_FORMAT):
    """The Layer of a tar archive of ENTRIES, (TarInfo, data) pairs, laid
    out as tarfile lays them out.  Names are str; surrogate escapes stand
    for bytes that are not UTF-8."""
    layer = Layer(seed=seed)
    for info, data in entries:
        layer.append(info.tobuf(tar_format, "utf-8", "surrogateescape"))
        if info.size:
            layer.files[info.name] = (layer.size, info.size)
            layer.append(data if isinstance(data, bytes) else info.size)
            layer.append(bytes(-info.size % tarfile.BLOCKSIZE))
    layer.append(bytes(2 * tarfile.BLOCKSIZE))
    layer.append(bytes(-layer.size % tarfile.RECORDSIZE))
    return layer


class Layer:
    """A layer known byte by byte, never held whole in memory: PIECES,
    (offset, length, bytes or an offset in the pseudo-random stream named
    SEED), in ascending order, and zeros between them."""

    def __init__(self, size=0, pieces=(), seed=""):
        self.size, self.pieces, self.seed = size, list(pieces), seed
        self.files = {}  # name -> (offset of its data in the layer, size)
        self.stream_size = 0

    @classmethod
    def of(cls, data):
        return cls(len(data), [(0, len(data), data)])

    def append(self, data):
        """Add DATA, bytes or a length of the stream, at the end."""
        if isinstance(data, int):
            self.pieces.append((self.size, data, self.stream_size))
            self.stream_size += data
            self.size += data
        elif data:
            self.pieces.append((self.size, len(data), bytes(data)))
            self.size += len(data)

    def read(self, offset=0, length=None):
        """The bytes of the range, up to the end of the layer."""
        end = self.size if length is None else min(offset + length, self.size)
        out = bytearray(max(0, end - offset))
        for start, size, source in self.pieces:
            low, high = max(offset, start), min(end, start + size)
            if low < high:
                out[low - offset:high - offset] = (
                    source[low - start:high - start] if isinstance(source, bytes)
                    else prng_bytes(self.seed, source + low - start, high - low))
        return bytes(out)

    def chunks(self, size=4 * MIB):
        for offset in range(0, self.size, size):
            yield self.read(offset, size)

    def write_to(self, file, chunk_size=4 * MIB):
        """Write the layer at FILE's position, seeking over chunks of zeros
        (a big sparse layer stays sparse); return its "sha256:" digest."""
        digest = hashlib.sha256()
        zeros = bytes(chunk_size)
        for chunk in self.chunks(chunk_size):
            digest.update(chunk)
            if chunk == zeros[:len(chunk)]:
                file.seek(len(chunk), os.SEEK_CUR)
            else:
                file.write(chunk)
        return "sha256:" + digest.hexdigest()


PRNG_BLOCK = 64 << 10


def prng_bytes(seed, offset, length):
    """LENGTH bytes at OFFSET of an endless pseudo-random stream named SEED,
    computed block by block."""
    out = bytearray()
    block, skip = divmod(offset, PRNG_BLOCK)
    while len(out) < length:
        data = random.Random(f"{seed}:{block}").randbytes(PRNG_BLOCK)
        out += data[skip:skip + length - len(out)]
        skip = 0
        block += 1
    return bytes(out)
