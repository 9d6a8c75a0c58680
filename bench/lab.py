"""The bench's private world: podman storage, a registry, a tmpfs, images,
and the nbdkit servers it starts.

Everything lives under one temporary directory in /var/tmp, as in
tests/conftest.py: podman's storage and configuration (through
CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF and CONTAINERS_CONF),
a Distribution registry on 127.0.0.1 and, as root, a tmpfs mounted inside
it to measure the plugin's TMPDIR on a filesystem of its own.  Lab's exit
stops every process it started, removes every image, unmounts the tmpfs
and removes the directory, however the bench ends.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NBDKIT = shutil.which("nbdkit") or "nbdkit"
PODMAN_TIMEOUT = 3600
# A long-lived child gets SIGTERM when the bench dies, even by SIGKILL, so
# no registry or baseline script outlives it (nbdkit has --exit-with-parent).
# Not preexec_fn: the bench forks while its disk sampler thread runs.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv, timeout=PODMAN_TIMEOUT, env=None):
    """Run ARGV to completion; return its stdout; raise with its stderr."""
    result = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit status {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
    return result.stdout


def podman(*args, check=True):
    if check:
        return run(["podman", *args])
    subprocess.run(["podman", *args], check=False, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=PODMAN_TIMEOUT)
    return ""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts(path):
    """Whether the Unix socket PATH accepts a connection now."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def stop(process, patience=10):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def random_file(path, size, chunk=8 << 20):
    """SIZE bytes of random data: incompressible, no holes, like a
    compressed qcow2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        for offset in range(0, size, chunk):
            file.write(os.urandom(min(chunk, size - offset)))


class Server:
    """nbdkit in the background on a Unix socket, its stderr in a log."""

    def __init__(self, lab, label, args, env=None, wrapper=None):
        """ARGS follow nbdkit's options; or WRAPPER(socket) is the command
        line of a program that ends by exec'ing nbdkit on that socket."""
        self.label = label
        self.directory = Path(tempfile.mkdtemp(prefix="server-", dir=lab.workdir))
        self.socket = str(self.directory / "sock")
        self.log_path = self.directory / "log"
        # -v for the plugin's "verified layer" lines; no line per request.
        self.command = wrapper(self.socket) if wrapper else [
            NBDKIT, "-f", "-v", "-D", "nbdkit.backend.datapath=0", "--exit-with-parent",
            "-U", self.socket, *args]
        self.env = env
        self.process = None
        lab.servers.append(self)

    def start(self):
        with open(self.log_path, "wb") as log_file:
            self.started = time.perf_counter()
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log_file,
                                            env=self.env)
        return self

    def wait_ready(self, timeout=3600, interval=0.002):
        """Seconds from start until the socket accepts a connection."""
        deadline = self.started + timeout
        while not accepts(self.socket):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label}: nbdkit exited "
                                   f"{self.process.returncode}: {self.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.label}: not ready after {timeout} s")
            time.sleep(interval)
        return time.perf_counter() - self.started

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.socket}"

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def log_tail(self):
        return " / ".join(self.log_text().strip().splitlines()[-5:])

    def wait_verified(self, indexes, timeout=1800):
        """Wait for cdi.py's background sha256 of each layer in INDEXES."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if "refusing to serve" in text:
                raise RuntimeError(f"{self.label}: verification failed: {self.log_tail()}")
            done = {int(index) for index in re.findall(r"verified layer (\d+) in", text)}
            if set(indexes) <= done:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: layers {indexes} not verified")
            time.sleep(0.05)

    def peak_rss(self):
        """VmHWM of the nbdkit process, in bytes."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.label}: no VmHWM")

    def stop(self):
        if self.process is not None:
            stop(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


class Lab:
    """The bench's temporary directory, podman, registry and tmpfs."""

    def __init__(self, tmpfs_size):
        self.tmpfs_size = tmpfs_size
        self.servers = []
        self.registry_process = None
        self.tmpfs = None
        self.saved_environment = dict(os.environ)

    def __enter__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="cdi-bench-", dir="/var/tmp"))
        try:
            self.registry = self.start_registry()
            os.environ.update(self.podman_environment())
            (self.workdir / "tmp").mkdir()
            self.disk_tmpdir = self.workdir / "plugin-tmp"
            self.disk_tmpdir.mkdir()
            self.tmpfs = self.mount_tmpfs()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        log("cleaning up")
        for server in self.servers:
            server.stop()
        podman("rmi", "--all", "--force", check=False)
        if self.registry_process is not None:
            stop(self.registry_process)
        if self.tmpfs is not None:
            self.unmount(self.tmpfs)
        os.environ.clear()
        os.environ.update(self.saved_environment)
        # podman build may leave overlay mounts; never remove through one.
        for mount in self.mounts_below():
            self.unmount(mount)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.workdir.exists():
            log(f"could not remove {self.workdir} entirely")

    # -------------------------------------------------------------- setup

    def start_registry(self):
        port = free_port()
        root = self.workdir / "registry"
        root.mkdir()
        (root / "config.yml").write_text(
            "version: 0.1\n"
            "log: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {root}/data}}}}\n"
            f"http: {{addr: '127.0.0.1:{port}'}}\n")
        self.registry_process = subprocess.Popen(
            [*DIE_WITH_PARENT, "docker-registry", "serve", str(root / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1):
                return f"127.0.0.1:{port}"
            if self.registry_process.poll() is not None:
                raise RuntimeError("docker-registry exited at start")
            if time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.05)

    def podman_environment(self):
        storage = self.workdir / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.workdir}/graph"\n'
            f'runroot = "{self.workdir}/run"\n'
            "[storage.options.overlay]\n"
            'skip_mount_home = "true"\n')
        registries = self.workdir / "registries.conf"
        registries.write_text(
            "unqualified-search-registries = []\n"
            f'[[registry]]\nlocation = "{self.registry}"\ninsecure = true\n')
        containers = self.workdir / "containers.conf"
        containers.write_text(
            "[engine]\n"
            f'tmp_dir = "{self.workdir}/libpod-tmp"\n'
            'events_logger = "none"\n')
        return {"CONTAINERS_STORAGE_CONF": str(storage),
                "CONTAINERS_REGISTRIES_CONF": str(registries),
                "CONTAINERS_CONF": str(containers),
                "TMPDIR": str(self.workdir / "tmp")}

    def mount_tmpfs(self):
        """A tmpfs of its own for the plugin's TMPDIR, so that statvfs sees
        exactly what an import writes there, named files or not.  None when
        mounting is not allowed (not root)."""
        path = self.workdir / "tmpfs"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o",
                                 f"size={self.tmpfs_size},mode=0700", "cdi-bench", str(path)],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            log(f"cannot mount a tmpfs ({result.stderr.strip()}): disk figures come "
                "from a shared filesystem")
            return None
        return path

    def mounts_below(self):
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        prefix = str(self.workdir) + "/"
        return sorted((point for point in points if point.startswith(prefix)),
                      key=len, reverse=True)

    @staticmethod
    def unmount(path):
        for attempt in range(20):
            if subprocess.run(["umount", str(path)], check=False,
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.25 * (attempt + 1) / 4)
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)

    def measured_tmpdir(self):
        """The TMPDIR whose usage is measured: the tmpfs, or a plain directory."""
        return self.tmpfs or self.disk_tmpdir

    # ------------------------------------------------------------- images

    def build(self, tag, layers):
        """Build TAG FROM scratch, one ADD (one layer) per entry of LAYERS,
        a function that fills the directory it is given."""
        context = Path(tempfile.mkdtemp(prefix="context-", dir=self.workdir))
        try:
            lines = ["FROM scratch"]
            for index, fill in enumerate(layers):
                directory = context / f"layer{index}"
                directory.mkdir()
                fill(directory)
                lines.append(f"ADD layer{index}/ /")
            (context / "Containerfile").write_text("\n".join(lines) + "\n")
            podman("build", "--quiet", "--no-cache", "-t", tag, str(context))
        finally:
            shutil.rmtree(context, ignore_errors=True)
        return self.inspect(tag)

    @staticmethod
    def inspect(reference):
        record = json.loads(podman("image", "inspect", reference))[0]
        return {"id": record["Id"], "diff_ids": record["RootFS"]["Layers"],
                "size": record.get("Size", 0)}

    def publish(self, local_tag, path):
        """Push LOCAL_TAG to the registry as PATH and drop it from storage,
        so that a pull must download every layer.  Returns the remote name."""
        remote = f"{self.registry}/{path}"
        podman("push", "--quiet", local_tag, f"docker://{remote}")
        podman("rmi", "--force", local_tag)
        return remote

    @staticmethod
    def present(reference):
        result = subprocess.run(["podman", "image", "exists", reference], check=False,
                                stdin=subprocess.DEVNULL, capture_output=True)
        return result.returncode == 0

    def forget(self, reference):
        """Remove REFERENCE from storage: the next use is cold."""
        podman("rmi", "--force", reference, check=False)
        if self.present(reference):
            raise RuntimeError(f"{reference} still in storage after podman rmi")
