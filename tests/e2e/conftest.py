"""Fixtures: a private podman, a real registry, small images, nbdkit runs.

Everything lives under one temporary directory: podman's storage and
configuration (through CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF
and CONTAINERS_CONF), two registries on 127.0.0.1 (one open, one that
requires a password) and the TMPDIR each test gives the plugin.  The user's
own podman storage and /etc are never touched.
"""

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

CDI = str(Path(__file__).resolve().parents[2] / "cdi.py")
NBDKIT = shutil.which("nbdkit") or "nbdkit"  # absolute: tests may empty PATH
REGISTRY_USER = "tester"
REGISTRY_PASSWORD = "cdi-test-password"
# bcrypt of REGISTRY_PASSWORD, made once with bcrypt.hashpw (cost 4).
REGISTRY_PASSWORD_HASH = "$2b$04$EDKwHu0455l8FQL.stnNVeXRKyIL4nB1/5VRbiT/JytpnoaKv5Ema"


@dataclass
class Image:
    name: str               # the local tag
    id: str
    diff_ids: list = field(default_factory=list)


def podman(*args, check=True):
    result = subprocess.run(["podman", *args], check=False, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def inspect(reference):
    record = json.loads(podman("image", "inspect", reference))[0]
    return Image(reference, record["Id"], record["RootFS"]["Layers"])


def build_image(tag, layers, workdir, platform=None):
    """Build TAG FROM scratch with one ADD, so one layer, per entry of
    LAYERS, a list of {path in image: bytes}."""
    context = Path(tempfile.mkdtemp(dir=workdir))
    lines = ["FROM scratch"]
    for index, files in enumerate(layers):
        for path, data in files.items():
            source = context / f"layer{index}" / path.lstrip("/")
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(data)
        lines.append(f"ADD layer{index}/ /")
    (context / "Containerfile").write_text("\n".join(lines) + "\n")
    platform_args = [f"--platform={platform}"] if platform else []
    podman("build", "--quiet", "--no-cache", *platform_args, "-t", tag, str(context))
    shutil.rmtree(context)
    return inspect(tag)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def registry(workdir, name, auth=False):
    """A Distribution registry on 127.0.0.1; yields its host:port."""
    port = free_port()
    root = Path(workdir) / name
    root.mkdir()
    config = [
        "version: 0.1",
        "log: {level: error}",
        f"storage: {{filesystem: {{rootdirectory: {root}/data}}}}",
        f"http: {{addr: '127.0.0.1:{port}'}}",
    ]
    if auth:
        (root / "htpasswd").write_text(f"{REGISTRY_USER}:{REGISTRY_PASSWORD_HASH}\n")
        config.append(f"auth: {{htpasswd: {{realm: cdi-test, path: {root}/htpasswd}}}}")
    (root / "config.yml").write_text("\n".join(config) + "\n")
    process = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None, "docker-registry exited at start"
            assert time.monotonic() < deadline, "docker-registry did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


class Lab:
    """The session's podman, registries and images."""

    def __init__(self, workdir, registry_address, auth_registry_address):
        self.workdir = workdir
        self.registry = registry_address
        self.auth_registry = auth_registry_address
        self.authfile = Path(workdir) / "auth.json"
        token = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode())
        self.authfile.write_text(json.dumps(
            {"auths": {auth_registry_address: {"auth": token.decode()}}}))

    def build(self, tag, layers, platform=None):
        return build_image(tag, layers, self.workdir, platform)

    def push(self, image, remote, authfile=None):
        extra = [f"--authfile={authfile}"] if authfile else []
        podman("push", "--quiet", *extra, image.name, f"docker://{remote}")


def write_podman_config(workdir, registries):
    storage = Path(workdir) / "storage.conf"
    storage.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{workdir}/graph"\n'
        f'runroot = "{workdir}/run"\n'
        "[storage.options.overlay]\n"
        # No private bind mount of the graph root: nothing to unmount later.
        'skip_mount_home = "true"\n')
    registries_conf = Path(workdir) / "registries.conf"
    registries_conf.write_text(
        "unqualified-search-registries = []\n" + "".join(
            f'[[registry]]\nlocation = "{address}"\ninsecure = true\n'
            for address in registries))
    containers = Path(workdir) / "containers.conf"
    containers.write_text(
        "[engine]\n"
        f'tmp_dir = "{workdir}/libpod-tmp"\n'
        'events_logger = "none"\n')
    return {"CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
            "CONTAINERS_CONF": str(containers),
            "TMPDIR": str(Path(workdir) / "tmp")}


@pytest.fixture(scope="session")
def lab():
    workdir = tempfile.mkdtemp(prefix="cdi-tests-")
    saved = dict(os.environ)
    try:
        with registry(workdir, "registry") as open_registry, \
             registry(workdir, "auth-registry", auth=True) as auth_registry:
            os.environ.update(write_podman_config(workdir, [open_registry, auth_registry]))
            os.mkdir(os.environ["TMPDIR"])
            try:
                yield Lab(workdir, open_registry, auth_registry)
            finally:
                podman("rmi", "--all", "--force", check=False)
                podman("manifest", "rm", "--all", check=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(workdir, ignore_errors=True)


def make_disk(size=8 << 20):
    """A raw disk with recognisable data at a few places, and zeros between."""
    disk = bytearray(size)
    for offset in (0, 1 << 20, size // 2 + 12345, size - 4096):
        chunk = hashlib.sha256(str(offset).encode()).digest() * 128
        disk[offset:offset + len(chunk)] = chunk
    return bytes(disk)


@pytest.fixture(scope="session")
def disk(lab):
    """(raw bytes, qcow2 bytes) of the demo VM disk."""
    raw = make_disk()
    raw_path = Path(lab.workdir) / "disk.raw"
    qcow2_path = Path(lab.workdir) / "disk.qcow2"
    raw_path.write_bytes(raw)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                    str(raw_path), str(qcow2_path)], check=True)
    qcow2 = qcow2_path.read_bytes()
    raw_path.unlink()
    qcow2_path.unlink()
    return raw, qcow2


@pytest.fixture(scope="session")
def three(lab, disk):
    """A 3-layer containerdisk: data, a small file, the qcow2 disk on top.
    Local as localhost/cdi-test/three:1 and in the registry."""
    image = lab.build("localhost/cdi-test/three:1", [
        {"data/random.bin": os.urandom(300 << 10)},
        {"etc/hello.txt": b"hello from the middle layer\n"},
        {"disk/downloaded": disk[1]},
    ])
    lab.push(image, f"{lab.registry}/cdi-test/three:1")
    return image


@pytest.fixture(autouse=True)
def plugin_tmpdir(lab, monkeypatch):
    """The TMPDIR of every test, which must be empty when the test ends."""
    path = tempfile.mkdtemp(dir=lab.workdir, prefix="plugin-tmp-")
    monkeypatch.setenv("TMPDIR", path)
    before = set(podman("images", "--all", "--quiet", "--no-trunc").split())
    yield path
    for image_id in set(podman("images", "--all", "--quiet", "--no-trunc").split()) - before:
        podman("rmi", "--force", image_id, check=False)
    deadline = time.monotonic() + 30
    while os.listdir(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = os.listdir(path)
    shutil.rmtree(path, ignore_errors=True)
    assert left == [], f"TMPDIR not empty after the test: {left}"


def nbdkit_command(*params, options=(), filters=()):
    return ([NBDKIT, *options, "--exit-with-parent"]
            + [f"--filter={name}" for name in filters]
            + ["python", CDI, *params])


def run_nbdkit(*params, run="true", env=None, timeout=120, verbose=False, filters=()):
    """nbdkit in captive mode: runs RUN with $uri set, then exits."""
    # Not "-U -": nbdkit 1.32 leaves that socket's directory in /tmp
    # whenever a plugin fails to start.
    directory = tempfile.mkdtemp(prefix="cdi-sock-")
    command = [NBDKIT, "-U", os.path.join(directory, "sock")]
    command += (["-v"] if verbose else []) + [f"--filter={name}" for name in filters]
    command += ["python", CDI, *params, "--run", run]
    try:
        return subprocess.run(command, check=False, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def nbdkit_error(*params, env=None):
    """Run nbdkit expecting failure; return its stderr."""
    result = run_nbdkit(*params, env=env)
    assert result.returncode != 0, f"nbdkit succeeded: {result.stdout}"
    return result.stderr


def read_export(*params, export_name=""):
    """All the bytes of the export that nbdkit serves with PARAMS."""
    handle = nbd.NBD()
    handle.set_export_name(export_name)
    handle.connect_command(nbdkit_command(*params, options=["-s"]))
    try:
        size = handle.get_size()
        return b"".join(handle.pread(min(4 << 20, size - offset), offset)
                        for offset in range(0, size, 4 << 20))
    finally:
        handle.shutdown()


@contextlib.contextmanager
def serve(*params, filters=()):
    """nbdkit in the background on a Unix socket; yields the socket path."""
    directory = tempfile.mkdtemp(prefix="cdi-sock-")
    sock = os.path.join(directory, "sock")
    command = nbdkit_command(*params, options=["-f", "-U", sock], filters=filters)
    process = subprocess.Popen(command,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if process.poll() is not None:
                raise AssertionError(f"nbdkit exited: {process.stderr.read()}")
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        yield sock
    finally:
        process.terminate()
        process.wait()
        process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
