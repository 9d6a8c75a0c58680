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
- Security: read-only at every level, a private copy.

Images are crafted byte by byte (lab.py writes a docker-archive that podman
loads), so every byte of every layer is known in advance.
"""

import contextlib
import errno
import hashlib
import io
import os
import random
import re
import signal
import socket
import stat
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbd
import pytest

from conftest import read_export, run_nbdkit, serve
from lab import CDI, MIB, check_passed, podman, processes_mentioning, registry, wait_for, words_of
from tars import directory, regular, symlink, tar_layer

PATIENCE = 30  # seconds anything promised may take


# ------------------------------------------------------------ crafted images


def unique_tag(what):
    return f"localhost/cdi-test/{what}-{os.urandom(4).hex()}:1"


@pytest.fixture
def crafted(lab):
    """load(what, layers) -> Image; every image loaded is removed at the end."""
    images = []

    def load(what, layers):
        images.append(lab.load(unique_tag(what), layers))
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
    layer = tar_layer(SMALL_ENTRIES, seed=f"small-{os.urandom(4).hex()}")
    return crafted("small", [layer]), layer


# ------------------------------------------------------------------ servers


def rss(pid):
    """The resident memory of process PID, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def read_all(handle):
    size = handle.get_size()
    return b"".join(handle.pread(min(4 * MIB, size - offset), offset)
                    for offset in range(0, size, 4 * MIB))


def read_error(handle, length, offset):
    """The errno of a read that must fail."""
    with pytest.raises(nbd.Error) as failure:
        handle.pread(length, offset)
    return failure.value.errnum


def read_fails(handle, length, offset):
    """Whether the read fails with EIO (rather than returning bytes)."""
    try:
        handle.pread(length, offset)
    except nbd.Error as error:
        return error.errnum == errno.EIO
    return False


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
                    # Pacing, not waiting: this is what makes the line slow.
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
    image = crafted("pulled", [tar_layer([regular("data/random.bin", blob_size)],
                                         seed=f"pulled-{os.urandom(4).hex()}")])
    with registry(lab.workdir, f"dying-registry-{os.urandom(4).hex()}") as dying:
        host, port = dying.address.split(":")
        remote = f"{dying.address}/cdi-test/pulled:1"
        podman("push", "--quiet", "--tls-verify=false", image.name, f"docker://{remote}")
        podman("rmi", "--force", image.id)  # or podman finds the layer locally
        line = SlowLine((host, int(port)), rate=4 * MIB)
        name = f"{line.address}/cdi-test/pulled:1"
        try:
            with serve(lab, f"name={name}", "pull=always", "tls-verify=false",
                       "pull-into=podman", ready=False) as nbdkit:
                wait_for(lambda: line.largest_response > 2 * MIB
                         or nbdkit.process.poll() is not None, PATIENCE,
                         lambda: f"the blob did not start flowing: {nbdkit.log()}")
                assert nbdkit.process.poll() is None, nbdkit.log()
                dying.process.kill()
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
    # podman 5 tries the download again, and says what refused it.
    assert "happened during read: unexpected EOF" + words_of(
        "podman", {"4": ")", "5": ' (while reconnecting: Get "http://'}) in log
    assert not processes_mentioning(name)
    wait_for(lambda: not os.listdir(plugin_tmpdir), PATIENCE, "TMPDIR not emptied")


@pytest.fixture(scope="module")
def big(lab):
    """A 256 MiB layer (three files from a PRNG, a symlink, small files):
    (Image, Layer).  Big enough that an import takes seconds."""
    layer = tar_layer([
        directory("data/"),
        regular("data/a.bin", MIB + 123),
        regular("data/hello.txt", b"hello\n"),
        regular("data/b.bin", 200 * MIB + 45),
        symlink("data/link", "b.bin"),
        regular("data/c.bin", 55 * MIB - 168),
    ], seed=f"big-{os.urandom(4).hex()}")
    image = lab.load(unique_tag("big"), [layer])
    yield image, layer
    podman("rmi", "--force", image.id, check=False)


def test_podman_killed_mid_save_is_reported_and_leaves_nothing(lab, big, plugin_tmpdir):
    image, layer = big
    with serve(lab, f"name={image.name}", "copy=true", ready=False) as nbdkit:
        # Mid-save: the plugin is copying what podman writes.
        wait_for(lambda: nameless_copies(nbdkit.pid) or nbdkit.process.poll() is not None,
                 PATIENCE, lambda: f"the copy did not start: {nbdkit.log()}")
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
    wait_for(lambda: not os.listdir(plugin_tmpdir), PATIENCE, "TMPDIR not emptied")


# ------------------------------------------------------ faults while serving


@pytest.mark.parametrize("copy", ["false", "true"])
def test_image_removed_while_serving_keeps_serving_its_bytes(lab, small, copy):
    image, layer = small
    directory_in_storage = diff_dir(image)
    with serve(lab, f"name={image.name}", f"copy={copy}") as nbdkit:
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
    with serve(lab, f"name={image.name}", verbose=True) as nbdkit:
        wait_for_verification(nbdkit)  # it passed: the layer is served
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
    ("auto", "no VM disk: the merged filesystem of its 0 layers has no regular file "
             "under disk/ nor at the root"),
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
    with pytest.raises(AssertionError) as refused:
        lab.load(tag, [b"this is not a tar archive\n" * 100])
    assert ": exit status 125: " in str(refused.value)
    assert words_of("podman", {
        "4": "processing tar file(archive/tar: invalid tar header)",
        "5": "unpacking failed (error: exit status 1; output: archive/tar: invalid tar header)",
    }) in str(refused.value)
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
    with serve(lab, f"name={image.name}") as nbdkit:
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

            wait_for(refused, PATIENCE, "reads of the changed layer never failed")
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
    with serve(lab, f"name={image.name}") as nbdkit:
        os.truncate(stored, 0)
        handle = nbdkit.connect()  # starts the check, which cannot read blob.bin
        try:
            assert read_error(handle, 512, start) == errno.EIO
            # The check has given up once even the tar header at 0, held in
            # memory, is refused.
            wait_for(lambda: read_fails(handle, 512, 0), PATIENCE,
                     "the check that met a read error never refused the layer")
            # The file comes back the right size, with other bytes.
            changed = bytearray(layer.read(start, size))
            changed[:4] = bytes(byte ^ 0xFF for byte in changed[:4])
            with open(stored, "r+b") as file:
                file.write(changed)
            assert read_fails(handle, 4096, start), "the changed layer is served unverified"
        finally:
            handle.shutdown()


def test_symlinks_out_of_the_layer_are_served_as_symlinks(crafted):
    targets = {"etc/shadow-link": "/etc/shadow", "escape": "../../../x",
               "etc/up": "../../../../../../../../etc/passwd"}
    layer = tar_layer([directory("etc/"), regular("etc/hosts", b"127.0.0.1 here\n")]
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
    layer = tar_layer([regular("../../../x", b"from the layer\n")])
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


def wait_for_verification(nbdkit):
    """Until the check of layer 0 has passed, now or remembered from an
    earlier server, as nbdkit -v says (serve(..., verbose=True)): no test
    wants to measure memory while it runs."""
    handle = nbdkit.connect()  # the first open starts the check
    try:
        wait_for(lambda: check_passed(nbdkit.log(), 0), PATIENCE,
                 lambda: f"the background verification did not finish: {nbdkit.log()}",
                 interval=0.05)
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
    with serve(lab, f"name={image.name}", verbose=True) as nbdkit:
        wait_for_verification(nbdkit)
        with connections(nbdkit, CONNECTIONS) as handles:
            random_reads(handles, layer, 2)  # warm up: threads, malloc arenas
            before = rss(nbdkit.pid)
            reads = random_reads(handles, layer, 10)
            after = rss(nbdkit.pid)
    assert reads > 1000, f"only {reads} reads in 10 s"
    assert after - before < MEMORY_GROWTH, \
        f"nbdkit grew from {before >> 10} KiB to {after >> 10} KiB over {reads} reads"


@pytest.mark.soak
def test_soak_reads_stay_right_and_memory_flat(lab, big):
    """`make soak`: the load test for CDI_SOAK_SECONDS (default 300)."""
    image, layer = big
    seconds = int(os.environ.get("CDI_SOAK_SECONDS", "300"))
    with serve(lab, f"name={image.name}", verbose=True) as nbdkit:
        wait_for_verification(nbdkit)
        with connections(nbdkit, CONNECTIONS) as handles:
            random_reads(handles, layer, 10)
            samples = [rss(nbdkit.pid)]
            reads = 0
            for _ in range(max(1, seconds // 30)):
                reads += random_reads(handles, layer, 30)
                samples.append(rss(nbdkit.pid))
    growth = max(samples) - samples[0]
    assert growth < MEMORY_GROWTH, \
        f"nbdkit's RSS in KiB every 30 s: {[sample >> 10 for sample in samples]}"
    assert reads > 100 * seconds



# ------------------------------------------------------------------ security


@pytest.mark.parametrize("copy", ["false", "true"])
def test_export_refuses_writes_at_every_level(lab, small, copy):
    image, layer = small
    graph_root = str(Path(diff_dir(image)).parents[2])
    with serve(lab, f"name={image.name}", f"copy={copy}") as nbdkit:
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
        return nbdkit.is_ready() or nbdkit.process.poll() is not None

    with serve(lab, f"name={image.name}", "copy=true", ready=False, umask=0) as nbdkit:
        wait_for(watch_import, PATIENCE, "nbdkit did not start", interval=0.001)
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

