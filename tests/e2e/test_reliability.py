"""Faults, hostile images and load, each caused for real: the promises hold.

- Faults during the import: the registry dies mid-pull, podman dies
  mid-save.  The user gets one clear line naming the step; TMPDIR is empty
  and nothing keeps running.
- Faults while serving: the image removed from storage (the bytes stay
  right), a backing file truncated (reads of that range fail with EIO, the
  rest and new clients still work).
- Hostile images: no layers, a layer that is not a tar, a file changed in
  storage behind the tar-split, symlinks and names pointing out of the layer.
- Load: 16 connections reading at random, every byte checked, memory flat;
  a long soak (`make soak`) outside the default run.
- Security: read-only at every level, a private copy, no shell.

Images are crafted byte by byte (a docker-archive written here, then
`podman load`), so every byte of every layer is known in advance.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbd
import pytest

from conftest import (
    CDI,
    inspect,
    nbdkit_command,
    podman,
    read_export,
    registry,
    run_nbdkit,
)

PATIENCE = 30  # seconds anything promised may take
MIB = 1 << 20


# ------------------------------------------------------------ crafted images

PRNG_BLOCK = 64 << 10


def prng_bytes(seed, offset, length):
    """LENGTH bytes at OFFSET of an endless pseudo-random stream named SEED,
    computed block by block so that no test keeps a whole layer in memory."""
    out = bytearray()
    block = offset // PRNG_BLOCK
    skip = offset - block * PRNG_BLOCK
    while len(out) < length:
        data = random.Random(f"{seed}:{block}").randbytes(PRNG_BLOCK)
        out += data[skip:skip + length - len(out)]
        skip = 0
        block += 1
    return bytes(out)


class Layer:
    """A layer tar known byte by byte: headers and padding in memory, file
    contents from the PRNG stream SEED (or given bytes)."""

    def __init__(self, seed, entries):
        """ENTRIES: (name, size or bytes, tarfile type, linkname)."""
        self.seed = seed
        self.pieces = []     # (offset in the layer, length, bytes or stream offset)
        self.size = 0
        self.files = {}      # name -> (offset of its data in the layer, size)
        stream = 0
        for name, content, kind, linkname in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = linkname
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.mtime = 1_700_000_000
            info.size = len(content) if isinstance(content, bytes) else content
            self.add(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if info.size:
                self.files[name] = (self.size, info.size)
                if isinstance(content, bytes):
                    self.add(content)
                else:
                    self.pieces.append((self.size, content, stream))
                    self.size += content
                    stream += content
                self.add(bytes(-info.size % 512))
        self.add(bytes(1024))

    def add(self, data):
        if data:
            self.pieces.append((self.size, len(data), bytes(data)))
            self.size += len(data)

    def read(self, offset, length):
        """The expected bytes of the range."""
        out = bytearray()
        end = min(offset + length, self.size)
        for start, size, source in self.pieces:
            if start + size <= offset or start >= end:
                continue
            low, high = max(offset, start) - start, min(end, start + size) - start
            if isinstance(source, bytes):
                out += source[low:high]
            else:
                out += prng_bytes(self.seed, source + low, high - low)
        return bytes(out)

    def chunks(self, size=4 * MIB):
        for offset in range(0, self.size, size):
            yield self.read(offset, size)


class RawLayer(Layer):
    """A "layer" that is just these bytes, tar or not."""

    def __init__(self, data):
        self.seed = None
        self.pieces = [(0, len(data), data)]
        self.size = len(data)
        self.files = {}


def regular(name, content):
    return (name, content, tarfile.REGTYPE, "")


def directory(name):
    return (name, 0, tarfile.DIRTYPE, "")


def symlink(name, target):
    return (name, 0, tarfile.SYMTYPE, target)


class Stream(io.RawIOBase):
    """A layer as a file object for tarfile, hashing what is read."""

    def __init__(self, layer):
        self.chunks = layer.chunks()
        self.pending = b""
        self.digest = hashlib.sha256()

    def readable(self):
        return True

    def read(self, size=-1):
        while len(self.pending) < size:
            chunk = next(self.chunks, b"")
            if not chunk:
                break
            self.pending += chunk
        data, self.pending = self.pending[:size], self.pending[size:]
        self.digest.update(data)
        return data


def unique_tag(what):
    return f"localhost/cdi-test/{what}-{os.urandom(4).hex()}:1"


def write_docker_archive(path, tag, layers):
    """A docker-archive (what podman save writes) of an image made of
    LAYERS; returns their diffIDs.  The config comes after the layers so
    that each layer is hashed while it is written."""
    diff_ids = []
    with tarfile.open(path, "w", copybufsize=MIB) as archive:
        for index, layer in enumerate(layers):
            stream = Stream(layer)
            info = tarfile.TarInfo(f"layer{index}.tar")
            info.size = layer.size
            archive.addfile(info, stream)
            diff_ids.append("sha256:" + stream.digest.hexdigest())
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            # A nonce: the image ID is unique to this test session.
            "config": {"Labels": {"cdi-test-nonce": os.urandom(8).hex()}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "test_reliability.py"}] * len(layers),
        }).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{
            "Config": config_name, "RepoTags": [tag],
            "Layers": [f"layer{index}.tar" for index in range(len(layers))],
        }]).encode()
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return diff_ids


def podman_load(lab, tag, layers):
    """`podman load` the image; returns podman's CompletedProcess."""
    path = Path(lab.workdir) / f"archive-{os.urandom(4).hex()}.tar"
    try:
        write_docker_archive(path, tag, layers)
        return subprocess.run(["podman", "load", "--quiet", "--input", str(path)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300, check=False)
    finally:
        path.unlink(missing_ok=True)


def load_image(lab, what, layers):
    tag = unique_tag(what)
    result = podman_load(lab, tag, layers)
    assert result.returncode == 0, result.stderr
    image = inspect(tag)
    assert len(image.diff_ids) == len(layers)
    return image


@pytest.fixture
def crafted(lab):
    """load(what, layers) -> Image; every image loaded is removed at the end."""
    images = []

    def load(what, layers):
        images.append(load_image(lab, what, layers))
        return images[-1]

    yield load
    for image in images:
        podman("rmi", "--force", image.id, check=False)


def diff_dir(image):
    return podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                  image.id).strip()


# A layer of a few MiB: a small file, a big one, a small one.
SMALL_ENTRIES = [directory("data/"), regular("data/head.txt", b"head\n"),
                 regular("data/blob.bin", 4 * MIB + 123), regular("data/tail.txt", b"tail\n")]


@pytest.fixture
def small(crafted):
    """A one-layer image of SMALL_ENTRIES: (Image, Layer)."""
    layer = Layer(f"small-{os.urandom(4).hex()}", SMALL_ENTRIES)
    return crafted("small", [layer]), layer


# ------------------------------------------------------------------ servers


class Server:
    """nbdkit -f on a Unix socket with its stderr in a file."""

    def __init__(self, process, socket_path, log_path):
        self.process = process
        self.pid = process.pid
        self.socket = socket_path
        self.log_path = log_path
        self.final_log = None  # the log, once nbdkit has stopped

    def connect(self, export=""):
        handle = nbd.NBD()
        handle.set_export_name(export)
        handle.connect_unix(self.socket)
        return handle

    def log(self):
        if self.final_log is not None:
            return self.final_log
        return Path(self.log_path).read_text(errors="replace")

    def rss(self):
        """nbdkit's resident memory in bytes."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


@contextlib.contextmanager
def started(lab, *params, ready=True, umask=-1):
    """nbdkit serving PARAMS; waits for its socket unless READY is false."""
    directory = tempfile.mkdtemp(prefix="sock-", dir=lab.workdir)
    socket_path = os.path.join(directory, "sock")
    log_path = os.path.join(directory, "stderr")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(nbdkit_command(*params, options=["-f", "-U", socket_path]),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log, umask=umask)
    server = Server(process, socket_path, log_path)
    try:
        if ready:
            wait_for(lambda: os.path.exists(socket_path) or process.poll() is not None,
                     "nbdkit did not start")
            assert process.poll() is None, f"nbdkit exited: {server.log()}"
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.final_log = server.log()
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(condition, message, patience=PATIENCE, interval=0.01):
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


def read_all(handle):
    size = handle.get_size()
    return b"".join(handle.pread(min(4 * MIB, size - offset), offset)
                    for offset in range(0, size, 4 * MIB))


def read_error(handle, length, offset):
    """The errno of a read that must fail."""
    with pytest.raises(nbd.Error) as failure:
        handle.pread(length, offset)
    return failure.value.errnum


def children(pid, command):
    """PIDs of the live children of PID running COMMAND (its comm)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields["Name"].strip() == command and int(fields["PPid"]) == pid:
                found.append(int(entry.name))
    return found


def processes_mentioning(*words):
    """PIDs of live processes (other than this one) whose command line
    holds one of WORDS."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            command_line = (entry / "cmdline").read_bytes()
            if any(word.encode() in command_line for word in words):
                found.append(int(entry.name))
    return found


def open_files(pid):
    """{fd: target} of PID's open descriptors."""
    files = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            files[int(entry.name)] = os.readlink(entry)
    return files


def nameless_copies(pid):
    """PID's descriptors on regular files without a name in a workspace."""
    found = []
    for fd, target in open_files(pid).items():
        if "/cdi-py-" in target and target.endswith(" (deleted)"):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                    found.append(fd)
    return found


# ------------------------------------------------------ faults during import


class SlowLine:
    """A TCP relay to a registry that carries at most RATE bytes a second
    towards podman: a slow network, so that the registry can be killed
    while a blob is in flight.  The registry is real; only the line is slow."""

    def __init__(self, upstream, rate):
        self.upstream = upstream
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.largest_response = 0  # bytes carried on the busiest connection
        self.sockets = []
        self.threads = [threading.Thread(target=self.accept, daemon=True)]
        self.threads[0].start()

    def accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                self.sockets.append(client)
                self.spawn(self.relay, client)

    def spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def relay(self, client):
        server = socket.socket()
        self.sockets.append(server)
        # A small window, so that the registry cannot run far ahead of us.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        with contextlib.suppress(OSError):
            server.connect(self.upstream)
            self.spawn(self.pump, client, server, None)
            self.pump(server, client, self.rate)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def pump(self, source, target, rate):
        carried = 0
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(16 << 10)
                if not data:
                    break
                target.sendall(data)
                carried += len(data)
                if rate:
                    self.largest_response = max(self.largest_response, carried)
                    time.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self):
        """Gone with the registry: new connections are refused."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=PATIENCE)


def test_registry_killed_mid_pull_is_reported_and_leaves_nothing(lab, crafted, plugin_tmpdir):
    blob_size = 16 * MIB  # random, so the compressed blob is as big
    image = crafted("pulled", [Layer(f"pulled-{os.urandom(4).hex()}",
                                     [regular("data/random.bin", blob_size)])])
    registry_name = f"dying-registry-{os.urandom(4).hex()}"
    with registry(lab.workdir, registry_name) as address:
        host, port = address.split(":")
        # conftest keeps the Popen to itself: find the process by its config path.
        registry_pid, = [pid for pid in processes_mentioning(registry_name)
                         if Path(f"/proc/{pid}/comm").read_text().strip() == "docker-registry"]
        remote = f"{address}/cdi-test/pulled:1"
        podman("push", "--quiet", "--tls-verify=false", image.name, f"docker://{remote}")
        podman("rmi", "--force", image.id)  # or podman finds the layer locally
        line = SlowLine((host, int(port)), rate=4 * MIB)
        name = f"{line.address}/cdi-test/pulled:1"
        try:
            with started(lab, f"name={name}", "pull=always", "tls-verify=false",
                         ready=False) as nbdkit:
                wait_for(lambda: line.largest_response > 2 * MIB or nbdkit.process.poll(),
                         lambda: f"the blob did not start flowing: {nbdkit.log()}")
                assert nbdkit.process.poll() is None, nbdkit.log()
                os.kill(registry_pid, signal.SIGKILL)
                line.close()
                status = nbdkit.process.wait(timeout=PATIENCE)
                log = nbdkit.log()
        finally:
            line.close()
    assert status == 1, log
    assert line.largest_response < blob_size, "the pull was not cut short"
    assert log.count("\n") == 1 and "Traceback" not in log, log
    assert f"nbdkit: error: {CDI}: get_ready: error: {name}: pull: the connection to " \
        f"{line.address} was cut during the download (podman exit status 125: " \
        "Error: writing blob: storing blob to file" in log
    assert "happened during read: unexpected EOF)" in log
    assert not processes_mentioning(name)
    wait_for(lambda: not os.listdir(plugin_tmpdir), "TMPDIR not emptied")


@pytest.fixture(scope="module")
def big(lab):
    """A 256 MiB layer (three files from a PRNG, a symlink, small files):
    (Image, Layer).  Big enough that an import takes seconds."""
    layer = Layer(f"big-{os.urandom(4).hex()}", [
        directory("data/"),
        regular("data/a.bin", MIB + 123),
        regular("data/hello.txt", b"hello\n"),
        regular("data/b.bin", 200 * MIB + 45),
        symlink("data/link", "b.bin"),
        regular("data/c.bin", 55 * MIB - 168),
    ])
    image = load_image(lab, "big", [layer])
    yield image, layer
    podman("rmi", "--force", image.id, check=False)


def test_podman_killed_mid_save_is_reported_and_leaves_nothing(lab, big, plugin_tmpdir):
    image, layer = big
    with started(lab, f"name={image.name}", "copy=true", ready=False) as nbdkit:
        # Mid-save: the plugin is copying what podman writes.
        wait_for(lambda: nameless_copies(nbdkit.pid) or nbdkit.process.poll() is not None,
                 lambda: f"the copy did not start: {nbdkit.log()}")
        save, = children(nbdkit.pid, "podman")
        assert b"save" in Path(f"/proc/{save}/cmdline").read_bytes().split(b"\0")
        os.kill(save, signal.SIGKILL)
        status = nbdkit.process.wait(timeout=PATIENCE)
        log = nbdkit.log()
    assert status == 1, log
    assert log.splitlines() == [
        f"nbdkit: error: {CDI}: get_ready: error: {image.name}: save: podman failed "
        "(podman killed by signal 9: (no message))"]
    assert not processes_mentioning(image.id, image.name)
    wait_for(lambda: not os.listdir(plugin_tmpdir), "TMPDIR not emptied")


# ------------------------------------------------------ faults while serving


@pytest.mark.parametrize("copy", ["false", "true"])
def test_image_removed_while_serving_keeps_serving_its_bytes(lab, small, copy):
    image, layer = small
    directory_in_storage = diff_dir(image)
    with started(lab, f"name={image.name}", f"copy={copy}") as nbdkit:
        handle = nbdkit.connect()
        try:
            first = handle.pread(layer.size // 2, 0)
            podman("rmi", "--force", image.id)
            assert not os.path.exists(directory_in_storage)
            rest = handle.pread(layer.size - len(first), len(first))
            assert hashlib.sha256(first + rest).hexdigest() == image.diff_ids[0][7:]
        finally:
            handle.shutdown()
        late = nbdkit.connect()  # a client arriving after the removal
        try:
            assert read_all(late) == layer.read(0, layer.size)
        finally:
            late.shutdown()


def test_truncated_backing_file_fails_only_reads_of_the_lost_range(lab, small):
    image, layer = small
    start, size = layer.files["data/blob.bin"]
    kept = MIB  # what is left of data/blob.bin
    lost = start + kept
    with started(lab, f"name={image.name}") as nbdkit:
        wait_for_verification(nbdkit, layer)  # it passed: the layer is served
        handle = nbdkit.connect()
        try:
            assert handle.pread(4096, lost) == layer.read(lost, 4096)
            os.truncate(os.path.join(diff_dir(image), "data/blob.bin"), kept)
            # Inside the lost range, and across its start: an error, never
            # zeros or stale bytes.
            assert read_error(handle, 4096, lost + MIB) == errno.EIO
            assert read_error(handle, 8192, lost - 4096) == errno.EIO
            assert read_error(handle, size - kept, lost) == errno.EIO
            # Everything else still reads right, on this connection...
            assert handle.pread(lost, 0) == layer.read(0, lost)
            tail = start + size
            assert handle.pread(layer.size - tail, tail) == layer.read(tail, layer.size - tail)
        finally:
            handle.shutdown()
        # ...and on a new one: the server is still up.
        other = nbdkit.connect()
        try:
            assert other.get_size() == layer.size
            assert other.pread(lost, 0) == layer.read(0, lost)
            assert read_error(other, 512, lost) == errno.EIO
        finally:
            other.shutdown()
        assert nbdkit.process.poll() is None
        assert f"pread: error: reading layer 0 at offset {lost + MIB}: " \
            "unexpected end of file" in nbdkit.log()



# ----------------------------------------------------------- hostile images


@pytest.mark.parametrize("layer, message", [
    ("0", "layer=0 is out of range: the image has 0 layers (allowed: none)"),
    ("-1", "layer=-1 is out of range: the image has 0 layers (allowed: none)"),
    ("auto", "layer=auto: no layer holds a VM disk (a regular file under disk/); "
             "looked at 0 layers"),
])
def test_image_without_layers_is_reported(crafted, layer, message):
    # podman loads an image whose manifest lists no layer at all.
    image = crafted("empty", [])
    assert image.diff_ids == []
    result = run_nbdkit(f"name={image.name}", f"layer={layer}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"nbdkit: error: {CDI}: get_ready: error: {image.name}: {message}"]


def test_layer_that_is_not_a_tar_is_refused_by_podman(lab):
    # Nothing reaches the plugin: podman will not store such a layer.
    tag = unique_tag("not-a-tar")
    result = podman_load(lab, tag, [RawLayer(b"this is not a tar archive\n" * 100)])
    assert result.returncode == 125
    assert "processing tar file(archive/tar: invalid tar header)" in result.stderr
    assert podman("images", "--quiet", tag) == ""


def tamper(image, layer, name):
    """Change NAME in podman's storage, keeping its size: the tar-split
    then describes other bytes than the files hold.  Returns the layer's
    sha256 as the plugin now reads it."""
    with open(os.path.join(diff_dir(image), name), "r+b") as stored:
        original = stored.read(4)
        stored.seek(0)
        stored.write(bytes(byte ^ 0xFF for byte in original))
    start, _ = layer.files[name]
    digest = hashlib.sha256()
    for offset in range(0, layer.size, 4 * MIB):
        chunk = bytearray(layer.read(offset, 4 * MIB))
        if offset <= start < offset + len(chunk):
            position = start - offset
            chunk[position:position + 4] = bytes(byte ^ 0xFF for byte in original)
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_file_changed_in_storage_is_refused_with_verify_before(small):
    image, layer = small
    actual = tamper(image, layer, "data/blob.bin")
    result = run_nbdkit(f"name={image.name}", "verify=before")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"nbdkit: error: {CDI}: get_ready: error: {image.name}: verify: layer 0 hashes to "
        f"{actual} but the image says {image.diff_ids[0]}; refusing to serve it "
        "(verify=false skips this check)"]


def test_file_changed_in_storage_fails_reads_once_verified(lab, small):
    image, layer = small
    actual = tamper(image, layer, "data/blob.bin")
    start, _ = layer.files["data/blob.bin"]
    with started(lab, f"name={image.name}") as nbdkit:
        handle = nbdkit.connect()  # starts the background check
        try:
            def refused():
                try:
                    data = handle.pread(4096, start)
                except nbd.Error as error:
                    assert error.errnum == errno.EIO
                    return True
                # Until the check completes, storage is served as it is.
                assert data[4:] == layer.read(start + 4, 4092)
                return False

            wait_for(refused, "reads of the changed layer never failed")
            # Then the whole layer is refused, on every connection.
            assert read_error(handle, 512, 0) == errno.EIO
            other = nbdkit.connect()
            try:
                assert read_error(other, 512, layer.size - 512) == errno.EIO
            finally:
                other.shutdown()
        finally:
            handle.shutdown()
        assert (f"pread: error: {image.name}: verify: layer 0 hashes to {actual} but the "
                f"image says {image.diff_ids[0]}; refusing to serve it") in nbdkit.log()



def test_layer_whose_check_met_a_read_error_is_not_served_unverified(lab, small):
    image, layer = small
    start, size = layer.files["data/blob.bin"]
    stored = os.path.join(diff_dir(image), "data/blob.bin")
    with started(lab, f"name={image.name}") as nbdkit:
        os.truncate(stored, 0)
        handle = nbdkit.connect()  # starts the check, which cannot read blob.bin
        try:
            wait_for(lambda: read_error(handle, 512, start) == errno.EIO, "no EIO")
            time.sleep(1)
            # The file comes back the right size, with other bytes.
            changed = bytearray(layer.read(start, size))
            changed[:4] = bytes(byte ^ 0xFF for byte in changed[:4])
            with open(stored, "r+b") as file:
                file.write(changed)

            def refused():
                try:
                    handle.pread(4096, start)
                except nbd.Error as error:
                    return error.errnum == errno.EIO
                return False

            wait_for(refused, "the changed layer is served, and never verified", patience=5)
        finally:
            handle.shutdown()

def test_symlinks_out_of_the_layer_are_served_as_symlinks(crafted):
    targets = {"etc/shadow-link": "/etc/shadow", "escape": "../../../x",
               "etc/up": "../../../../../../../../etc/passwd"}
    layer = Layer("symlinks", [directory("etc/"), regular("etc/hosts", b"127.0.0.1 here\n")]
                  + [symlink(name, target) for name, target in targets.items()])
    image = crafted("symlinks", [layer])
    for copy in ("false", "true"):
        data = read_export(f"name={image.name}", f"copy={copy}")
        assert data == layer.read(0, layer.size)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            for name, target in targets.items():
                member = archive.getmember(name)
                assert member.issym() and member.linkname == target and member.size == 0


def test_name_climbing_out_of_the_layer_is_never_read_there(lab, crafted):
    # podman stores "../../../x" as diff/x, but its tar-split keeps the name,
    # which from the diff directory leads to <graph root>/x.
    layer = Layer("climbing", [regular("../../../x", b"from the layer\n")])
    image = crafted("climbing", [layer])
    graph_root = Path(diff_dir(image)).parents[2]
    outside = graph_root / "x"
    outside.write_bytes(b"NOT the layer\n")  # same size, other bytes
    try:
        result = run_nbdkit(f"name={image.name}", verbose=True)
    finally:
        outside.unlink()
    assert result.returncode == 1
    # The plugin refuses the name, so it tries podman save, whose own check
    # catches podman reading the file outside.
    assert "cannot serve from podman's storage (unsafe name b'../../../x' in the " \
        "tar-split): copying the layer with podman save" in result.stderr
    assert (f"{image.name}: save: the layer in local storage does not match its digest: "
            "remove the image (podman rmi) and pull it again (podman exit status 125: "
            "Error: reading blob sha256:") in result.stderr
    assert 'file integrity checksum failed for "../../../x")' in result.stderr
    assert b"NOT the layer" not in result.stdout.encode()


# ---------------------------------------------------------------------- load

CONNECTIONS = 16
LARGEST_READ = 256 << 10
MEMORY_GROWTH = 4 * MIB  # what nbdkit's resident memory may grow by under load


def random_reads(handles, layer, seconds):
    """Every handle reads at random places for SECONDS, in parallel; each
    read is checked against the layer.  Returns how many reads were made."""
    deadline = time.monotonic() + seconds

    def reader(number, handle):
        chooser = random.Random(number)
        reads = 0
        while time.monotonic() < deadline:
            length = chooser.randint(1, LARGEST_READ)
            offset = chooser.randrange(layer.size - length + 1)
            data = handle.pread(length, offset)
            assert data == layer.read(offset, length), \
                f"connection {number}: wrong bytes at {offset}+{length}"
            reads += 1
        return reads

    with ThreadPoolExecutor(len(handles)) as pool:
        return sum(pool.map(reader, range(len(handles)), handles))


def wait_for_verification(nbdkit, layer):
    """Until the background check of the layer has read it all: no test
    wants to measure memory while it runs."""
    def bytes_read():
        io_stats = Path(f"/proc/{nbdkit.pid}/io").read_text()
        return int(re.search(r"^rchar: (\d+)", io_stats, re.MULTILINE).group(1))

    start = bytes_read()
    handle = nbdkit.connect()  # the first open starts the check
    try:
        wait_for(lambda: bytes_read() - start >= sum(size for _, size in layer.files.values()),
                 "the background verification did not finish", interval=0.1)
        time.sleep(0.2)  # the last chunk's hash
        handle.pread(512, 0)  # a mismatch would fail this
    finally:
        handle.shutdown()


@contextlib.contextmanager
def connections(nbdkit, count):
    handles = []
    try:
        for _ in range(count):
            handles.append(nbdkit.connect())
        yield handles
    finally:
        for handle in handles:
            handle.shutdown()


def test_sixteen_connections_read_right_bytes_in_flat_memory(lab, big):
    image, layer = big
    with started(lab, f"name={image.name}") as nbdkit:
        wait_for_verification(nbdkit, layer)
        with connections(nbdkit, CONNECTIONS) as handles:
            random_reads(handles, layer, 2)  # warm up: threads, malloc arenas
            before = nbdkit.rss()
            reads = random_reads(handles, layer, 10)
            after = nbdkit.rss()
    assert reads > 1000, f"only {reads} reads in 10 s"
    assert after - before < MEMORY_GROWTH, \
        f"nbdkit grew from {before >> 10} KiB to {after >> 10} KiB over {reads} reads"


@pytest.mark.soak
def test_soak_reads_stay_right_and_memory_flat(lab, big):
    """`make soak`: the load test for CDI_SOAK_SECONDS (default 300)."""
    image, layer = big
    seconds = int(os.environ.get("CDI_SOAK_SECONDS", "300"))
    with started(lab, f"name={image.name}") as nbdkit:
        wait_for_verification(nbdkit, layer)
        with connections(nbdkit, CONNECTIONS) as handles:
            random_reads(handles, layer, 10)
            samples = [nbdkit.rss()]
            reads = 0
            for _ in range(max(1, seconds // 30)):
                reads += random_reads(handles, layer, 30)
                samples.append(nbdkit.rss())
    growth = max(samples) - samples[0]
    assert growth < MEMORY_GROWTH, \
        f"nbdkit's RSS in KiB every 30 s: {[sample >> 10 for sample in samples]}"
    assert reads > 100 * seconds



# ------------------------------------------------------------------ security


@pytest.mark.parametrize("copy", ["false", "true"])
def test_export_refuses_writes_at_every_level(lab, small, copy):
    image, layer = small
    graph_root = str(Path(diff_dir(image)).parents[2])
    with started(lab, f"name={image.name}", f"copy={copy}") as nbdkit:
        handle = nbdkit.connect()
        try:
            # What the server advertises...
            assert handle.is_read_only()
            assert not handle.can_trim()
            assert not handle.can_zero()
            assert not handle.can_fua()
            # ...and what it does when a client sends writes anyway (libnbd
            # would refuse them itself in strict mode).
            handle.set_strict_mode(0)
            for write in (lambda: handle.pwrite(b"x" * 512, 0),
                          lambda: handle.zero(512, 0),
                          lambda: handle.trim(512, 0)):
                with pytest.raises(nbd.Error) as refused:
                    write()
                assert refused.value.errnum in (errno.EPERM, errno.EROFS)
            assert read_all(handle) == layer.read(0, layer.size)
        finally:
            handle.shutdown()
        # ...and the descriptors it holds on podman's storage: read-only.
        in_storage = {fd: target for fd, target in open_files(nbdkit.pid).items()
                      if target.startswith(graph_root + "/")}
        if copy == "false":
            assert any(target.endswith("/diff/data/blob.bin") for target in in_storage.values())
        for fd, target in in_storage.items():
            flags = Path(f"/proc/{nbdkit.pid}/fdinfo/{fd}").read_text().split("flags:")[1]
            assert int(flags.split()[0], 8) & os.O_ACCMODE == os.O_RDONLY, target
    assert "write request on readonly connection" in nbdkit.log()


def test_layer_copy_is_private_whatever_the_umask(lab, big, plugin_tmpdir):
    image, layer = big
    workspaces = {}  # seen during the import: path -> stat
    copies = {}      # nameless files nbdkit holds: inode -> stat

    def watch_import():
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(plugin_tmpdir):
                workspaces[entry.path] = entry.stat(follow_symlinks=False)
        for fd in nameless_copies(nbdkit.pid):
            with contextlib.suppress(FileNotFoundError):
                status = os.stat(f"/proc/{nbdkit.pid}/fd/{fd}")
                copies[status.st_ino] = status
        return os.path.exists(nbdkit.socket) or nbdkit.process.poll() is not None

    with started(lab, f"name={image.name}", "copy=true", ready=False, umask=0) as nbdkit:
        wait_for(watch_import, "nbdkit did not start", interval=0.001)
        assert nbdkit.process.poll() is None, nbdkit.log()
        assert workspaces, "no workspace seen in TMPDIR during the import"
        for path, status in workspaces.items():
            assert os.path.basename(path).startswith(f"cdi-py-{nbdkit.pid}-")
            assert stat.S_ISDIR(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o700
            assert status.st_uid == os.geteuid()
        during, = copies.values()  # seen during the import...
        fd, = nameless_copies(nbdkit.pid)
        now = os.stat(f"/proc/{nbdkit.pid}/fd/{fd}")  # ...and while serving
        assert now.st_ino == during.st_ino
        for status in (during, now):
            assert stat.S_ISREG(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o600
            assert status.st_nlink == 0
        assert now.st_size == layer.size
        assert os.listdir(plugin_tmpdir) == []


def test_plugin_source_never_asks_for_a_shell():
    source = Path(CDI).read_text()
    for call in ("shell=True", "os.system", "os.popen", "/bin/sh", "os.exec", "pty."):
        assert call not in source
    # Its one subprocess.Popen takes an argv list that starts with podman.
    assert re.findall(r"subprocess\.(\w+)\(", source) == ["Popen"]
    assert 'argv = ["podman"] + args' in source
