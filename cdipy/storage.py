"""Serving a layer in place from podman's storage (overlay or vfs).

podman keeps, for each layer, its files (overlay/ID/diff/, or the full tree
vfs/dir/ID/) and the tar headers it was unpacked from (ID.tar-split.gz).
The tar is rebuilt from the two: the headers in memory, each file's
contents from the file itself.  A layer of few files has them all held
open, so that removing the image changes nothing served; a big one opens
them on demand, a bounded number at a time.  Anything unexpected raises
StorageUnavailable, and the copy path takes over.
"""

import base64
import collections
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import marshal
import os
import re
import resource
import stat
import tarfile
import threading
import zlib
from typing import Optional

from . import userns
from .cache import PrivateCache
from .errors import StorageUnavailable
from .layer import (
    FileSegment,
    Layer,
    Member,
    clean_name,
    give_way,
    identity,
    member_from_header,
)
from .userns import NamespaceOpener

# Tar headers of one layer kept in memory, at most.
MAX_HEADER_BYTES = 16 << 20
# A layer of at most this many files has them all opened before it is
# served, and held; a bigger one opens them when they are read...
EAGER_FILES = 1024
# ...keeping at most this many open at a time.
LAZY_OPEN_FILES = 256
# Entries mapped between two chances for other threads to take the GIL: a
# layer mapped in the background must not hold up a client's open.
GIL_TURN = 64
NO_CACHE = PrivateCache(None)


@dataclasses.dataclass(frozen=True)
class StoragePlan:
    """Where one layer is in podman's storage."""
    diff_dir: str
    tar_split: str
    diff_size: Optional[int]


def storage_plans(image, graph_root=None):
    """The StoragePlan of each layer of IMAGE (an inspect record), base
    first: overlay keeps a layer's own files in overlay/ID/diff, vfs a full
    tree in vfs/dir/ID (GRAPH_ROOT, which vfs images don't tell) holding
    that layer's bytes for each file its tar-split names."""
    driver = image.get("GraphDriver") or {}
    if driver.get("Name") == "overlay":
        upper = (driver.get("Data") or {}).get("UpperDir", "")
        layer_dir = os.path.dirname(upper)
        files_dir = os.path.dirname(layer_dir)
        if os.path.basename(upper) != "diff" or os.path.basename(files_dir) != "overlay":
            raise StorageUnavailable(f"unexpected layer directory {upper!r}")
        layers_dir = os.path.join(os.path.dirname(files_dir), "overlay-layers")
        chain = layer_chain(read_layers(layers_dir), os.path.basename(layer_dir))
        diff_dirs = [os.path.join(files_dir, record["id"], "diff") for record in chain]
    elif driver.get("Name") == "vfs" and graph_root:
        layers_dir = os.path.join(graph_root, "vfs-layers")
        chain = chain_of_digests(read_layers(layers_dir), image["RootFS"]["Layers"])
        diff_dirs = [os.path.join(graph_root, "vfs", "dir", record["id"]) for record in chain]
    else:
        raise StorageUnavailable(f"storage driver {driver.get('Name')!r} is not "
                                 "overlay or vfs")
    if [record.get("diff-digest") for record in chain] != image["RootFS"]["Layers"]:
        raise StorageUnavailable("storage layers do not match the image's diffIDs")
    return [StoragePlan(diff_dir, os.path.join(layers_dir, record["id"] + ".tar-split.gz"),
                        record.get("diff-size"))
            for diff_dir, record in zip(diff_dirs, chain)]


def read_layers(layers_dir):
    """The records of layers.json in LAYERS_DIR, by layer ID."""
    try:
        with open(os.path.join(layers_dir, "layers.json"), "rb") as file:
            return {record["id"]: record for record in json.load(file)}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StorageUnavailable(f"cannot read layers.json: {error}") from None


def chain_of_digests(records, diff_ids):
    """The records of a chain of layers, base first, whose digests are
    DIFF_IDS: each the child of the one before."""
    chain = []
    for diff_id in diff_ids:
        parent = chain[-1]["id"] if chain else None
        record = next((record for record in records.values()
                       if (record.get("parent") or None) == parent
                       and record.get("diff-digest") == diff_id), None)
        if record is None:
            raise StorageUnavailable(f"no layer {diff_id} in layers.json")
        chain.append(record)
    return checked_ids(chain)


def layer_chain(records, top_id):
    """The records from the base layer up to TOP_ID, following "parent"."""
    chain = []
    layer_id = top_id
    while layer_id:
        record = records.get(layer_id)
        if record is None or record in chain:
            raise StorageUnavailable(f"layer {layer_id} is not in layers.json")
        chain.append(record)
        layer_id = record.get("parent")
    chain.reverse()
    return checked_ids(chain)


def checked_ids(chain):
    """CHAIN, whose layer IDs become file names: each must be one."""
    for record in chain:
        if not re.fullmatch(r"\w[\w.-]*", record["id"]):
            raise StorageUnavailable(f"unexpected layer ID {record['id']!r} in layers.json")
    return chain


def storage_layer(index, diff_id, plan, image_name="the image", maps=NO_CACHE):
    """Layer INDEX read in place, as PLAN says where it is.  A layer of at
    most EAGER_FILES files has them all opened now and held; a bigger one
    opens them on demand, at most LAZY_OPEN_FILES at a time.  Files a
    rootless user cannot open are opened now, in podman's user namespace,
    and held.  The map of a big layer is kept in the PrivateCache MAPS."""
    layer = mapped_layer(index, diff_id, plan, maps)
    try:
        files = layer.files()
        if len(files) > EAGER_FILES:
            layer.opener = LazyFiles(plan.diff_dir)
        with DirectoryTree(plan.diff_dir) as tree, NamespaceOpener(image_name) as namespace:
            for segment in files:
                if layer.opener is None or not tree.readable(segment.name):
                    segment.fd = tree.open_file(segment.name, namespace)
                    if layer.opener is not None:
                        layer.opener.pin(segment)  # closed with the layer from now on
                    check_file(segment.fd, segment.name, segment.length)
    except OSError as error:
        layer.close()
        raise StorageUnavailable(f"cannot read {plan.diff_dir}: {error}") from None
    except BaseException:
        layer.close()
        raise
    return layer


def mapped_layer(index, diff_id, plan, maps):
    """Layer INDEX with its map: from MAPS if it holds one made from this
    very tar-split, else made from it (and kept, for a big layer)."""
    try:
        status = os.stat(plan.tar_split)
    except OSError as error:
        raise StorageUnavailable(f"cannot read {plan.tar_split}: {error.strerror}") from None
    name = hashlib.sha256(repr((diff_id, plan, identity(status))).encode()).hexdigest()
    data = maps.read(name + ".map")
    layer = data and load_map(Layer(index, diff_id, "storage"), data)
    if not (layer and layer.size == (plan.diff_size or layer.size)):
        layer = Layer(index, diff_id, "storage")
        map_layer(layer, plan)
        if len(layer.files()) > EAGER_FILES:
            maps.write(name + ".map", dump_map(layer))
    layer.origin = name
    return layer


def map_layer(layer, plan):
    """Fill LAYER's offset map and members from PLAN's tar-split: headers
    in memory, a FileSegment (not open yet) for each file's contents."""
    pending = bytearray()     # tar bytes not yet added to the layer
    paths = set()
    try:
        with gzip.open(plan.tar_split, "rb") as stream:
            for count, (data, name, size) in enumerate(
                    tar_split_entries(stream, plan.tar_split)):
                if count % GIL_TURN == 0:
                    give_way()
                if data is not None:
                    pending += data
                    continue
                if layer.bytes_held + len(pending) > MAX_HEADER_BYTES:
                    raise StorageUnavailable("too many headers to keep in memory")
                # Storage holds the last entry of a path only: an earlier
                # one would be served with its bytes.
                member_name = clean_name(name)
                if member_name.rstrip("/") in paths:
                    raise StorageUnavailable(f"{name!r} is in the layer twice")
                paths.add(member_name.rstrip("/"))
                layer.members.append(member_from_header(
                    pending[-tarfile.BLOCKSIZE:], member_name, size, layer.size + len(pending)))
                if size:
                    name_parts(name)  # raises for an unsafe name
                    layer.add_bytes(pending)
                    pending = bytearray()
                    layer.add_file(FileSegment(size, name=name))
    except OSError as error:
        raise StorageUnavailable(f"cannot read {plan.tar_split}: {error}") from None
    layer.add_bytes(pending)
    if plan.diff_size is not None and layer.size != plan.diff_size:
        raise StorageUnavailable(f"rebuilt {layer.size} bytes, storage says {plan.diff_size}")


# The version of dump_map's format.
MAP_FORMAT = 2
# Entries in one piece of a dumped map: each piece is loaded by one call
# that holds the GIL.
MAP_PIECE = 2048


def dump_map(layer):
    """LAYER's map and members, not its open files, as bytes to cache."""
    sources = [(source.length, source.name) if type(source) is FileSegment
               else len(source) if type(source) is memoryview else bytes(source)
               for source in layer.sources]
    members = [(member.name, member.kind, member.size, member.offset)
               for member in layer.members]
    return marshal.dumps((MAP_FORMAT, layer.size, pieces(sources), pieces(members)))


def pieces(entries):
    return [marshal.dumps(entries[start:start + MAP_PIECE])
            for start in range(0, len(entries), MAP_PIECE)]


def load_map(layer, data):
    """Fill the new LAYER from DATA, made by dump_map; return it, or None if
    DATA is not such a map."""
    try:
        version, size, sources, members = marshal.loads(data)
        if version != MAP_FORMAT:
            return None
        for piece in sources:
            give_way()
            for source in marshal.loads(piece):
                if type(source) is tuple:
                    layer.add_file(FileSegment(source[0], name=source[1]))
                elif type(source) is int:
                    layer.add_zeros(source)
                else:
                    layer.add_segment(source, len(source))
                    layer.bytes_held += len(source)
        for piece in members:
            give_way()
            layer.members += [Member(*member) for member in marshal.loads(piece)]
    except (EOFError, ValueError, TypeError, IndexError):
        return None
    return layer if layer.size == size else None


def tar_split_entries(stream, path):
    """Yield (bytes, None, 0) for raw tar data and (None, name, size) for a
    file's contents, from a tar-split STREAM (read from PATH)."""
    try:
        for entry in json_lines(stream):
            if entry["type"] == 2:
                yield base64.b64decode(entry.get("payload") or "", validate=True), None, 0
            elif entry["type"] == 1:
                raw = entry.get("name_raw")
                name = base64.b64decode(raw, validate=True) if raw else os.fsencode(entry["name"])
                size = entry.get("size") or 0
                if not isinstance(size, int) or size < 0:
                    raise ValueError(f"size {size!r}")
                yield None, name, size
            else:
                raise ValueError(f"entry of type {entry['type']}")
    except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error) as error:
        raise StorageUnavailable(f"unreadable tar-split {path}: {error}") from None


def json_lines(stream, chunk=256 << 10):
    """The JSON value on each line of STREAM, parsed a chunk at a time as
    one JSON array: a json.loads per line took most of the time to ready of
    a layer of 20,000 files."""
    rest = b""
    while True:
        block = stream.read(chunk)
        lines = (rest + block).split(b"\n")
        rest = lines.pop() if block else b""
        lines = [line for line in lines if line.strip()]
        if lines:
            yield from json.loads(b"[" + b",".join(lines) + b"]")
        if not block:
            return


def check_file(fd, name, size):
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_size != size:
        raise StorageUnavailable(f"{name!r} in storage is not the {size}-byte file "
                                 "the tar-split says")


def name_parts(name):
    """NAME's components, refusing names that could leave the layer."""
    parts = tuple(part for part in name.split(b"/") if part not in (b"", b"."))
    if not parts or b".." in parts:
        raise StorageUnavailable(f"unsafe name {name!r} in the tar-split")
    return parts


class DirectoryTree:
    """Opens files beneath directory PATH, following no symlink and no
    '..', and opening each directory on the way once.

    One of two walks beneath a directory, and the two must differ: this
    one, for opening every file of a layer at once, holds each directory
    open until it is done (each is opened once, however many files it
    has); open_beneath, for a big layer's files opened one at a time when
    read, holds none (holding a big layer's directories would hold
    thousands of descriptors for as long as it is served)."""

    def __init__(self, path):
        self.path = path
        try:
            self.directories = {(): os.open(path, os.O_RDONLY | os.O_DIRECTORY)}
        except OSError as error:
            raise StorageUnavailable(f"cannot open {path}: {error.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for fd in self.directories.values():
            os.close(fd)

    def open_file(self, name, namespace=None):
        """NAME opened read-only; one we may not open, through NAMESPACE."""
        parts = name_parts(name)
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW,
                           dir_fd=self.directory(parts[:-1]))
        except OSError as error:
            if not (namespace and userns.needed() and userns.is_permission_error(error)):
                raise StorageUnavailable(f"cannot open {name!r}: {error.strerror}") from None
        try:
            return namespace.open(self.path, parts)
        except OSError as error:
            raise StorageUnavailable(f"cannot open {name!r} in podman's user namespace: "
                                     f"{error.strerror}") from None

    def readable(self, name):
        """Whether we may open NAME ourselves (always, as root)."""
        if not userns.needed():
            return True
        parts = name_parts(name)
        try:
            return os.access(parts[-1], os.R_OK, dir_fd=self.directory(parts[:-1]),
                             follow_symlinks=False)
        except OSError:
            return False

    def directory(self, parts):
        fd = self.directories.get(parts)
        if fd is None:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY,
                         dir_fd=self.directory(parts[:-1]))
            self.directories[parts] = fd
        return fd


class LazyFiles:
    """Opens the files of a big layer beneath its directory when they are
    read, keeping at most LAZY_OPEN_FILES open (the least recently used is
    closed).  A descriptor is only used and closed under the lock, so it is
    never closed while a read uses it."""

    def __init__(self, path):
        self.root = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.lock = threading.Lock()
        self.open_segments = collections.OrderedDict()  # FileSegment -> None
        self.pinned = []  # segments opened once and held: never closed early

    def pin(self, segment):
        self.pinned.append(segment)

    @contextlib.contextmanager
    def holding(self, segment):
        with self.lock:
            if segment.fd is None:
                self.make_room()
                segment.fd = self.open(segment)
                self.open_segments[segment] = None
            elif segment in self.open_segments:
                self.open_segments.move_to_end(segment)
            yield segment.fd

    def make_room(self):
        while len(self.open_segments) >= LAZY_OPEN_FILES:
            oldest, _ = self.open_segments.popitem(last=False)
            os.close(oldest.fd)
            oldest.fd = None

    def open(self, segment):
        """SEGMENT's file, which must still be the file the tar-split (and,
        once checked, the digest check) saw; else OSError (EIO)."""
        try:
            fd = open_beneath(self.root, name_parts(segment.name))
        except OSError as error:
            raise OSError(errno.EIO, f"cannot open {segment.name!r} in storage: "
                                     f"{error.strerror}") from None
        status = os.fstat(fd)
        if (not stat.S_ISREG(status.st_mode) or status.st_size != segment.length
                or segment.identity not in (None, identity(status))):
            os.close(fd)
            raise OSError(errno.EIO, f"{segment.name!r} in storage is not the file "
                                     "the layer was built from")
        # From now on the file must stay this one, checked or not.
        segment.identity = identity(status)
        return fd

    def close(self):
        with self.lock:
            for segment in [*self.open_segments, *self.pinned]:
                os.close(segment.fd)
                segment.fd = None
            self.open_segments.clear()
            self.pinned = []
            os.close(self.root)


def open_beneath(root, parts):
    """Open PARTS beneath directory ROOT, following no symlink, holding no
    directory once done (see DirectoryTree)."""
    fd = root
    try:
        for part in parts[:-1]:
            parent, fd = fd, os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY,
                                     dir_fd=fd)
            if parent != root:
                os.close(parent)
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        if fd != root:
            os.close(fd)


def raise_open_file_limit():
    """Serving in place holds files open: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
