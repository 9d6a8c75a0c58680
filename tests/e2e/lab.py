"""The lab the end-to-end tests and the bench share: a private podman,
Distribution registries, images, and nbdkit servers in the background.

Everything lives under one temporary directory: podman's storage and
configuration (through CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF
and CONTAINERS_CONF), the registries' data on 127.0.0.1, the plugin's cache
(XDG_CACHE_HOME) and the servers' sockets and logs.  The user's own podman
storage, ~/.cache and /etc are never touched.
Images are built FROM scratch with one ADD per layer, or crafted byte by
byte as docker-archives, so that every byte of every layer is known.
"""

import base64
import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from tars import MTIME, Layer

CDI = str(Path(__file__).resolve().parents[2] / "cdi.py")
NBDKIT = shutil.which("nbdkit") or "nbdkit"  # absolute: tests may empty PATH
REGISTRY_USER = "tester"
REGISTRY_PASSWORD = "cdi-test-password"
# bcrypt of REGISTRY_PASSWORD, made once with bcrypt.hashpw (cost 4).
REGISTRY_PASSWORD_HASH = "$2b$04$EDKwHu0455l8FQL.stnNVeXRKyIL4nB1/5VRbiT/JytpnoaKv5Ema"
# A registry gets SIGTERM when its starter dies, even by SIGKILL (nbdkit has
# --exit-with-parent for that).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
MIB = 1 << 20


class Lab:
    """A private podman with registries, as a context manager: inside it,
    the environment points podman at the lab; on exit every image and
    registry is gone, the environment is as it was and the directory removed."""

    def __init__(self, prefix, parent=None, registry=True, auth_registry=False):
        """The directory is PREFIX... in PARENT (default: tempfile's); REGISTRY
        and AUTH_REGISTRY say which registries to start, by address in
        self.registry and self.auth_registry (with its self.authfile)."""
        self.prefix, self.parent = prefix, parent
        self.wants_registry, self.wants_auth_registry = registry, auth_registry
        self.registry = self.auth_registry = self.authfile = None
        self.podman_is_ours = False

    def __enter__(self):
        self.saved_environment = dict(os.environ)
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        self.services = contextlib.ExitStack()
        try:
            if self.wants_registry:
                self.registry = self.services.enter_context(
                    registry(self.workdir, "registry")).address
            if self.wants_auth_registry:
                self.auth_registry = self.services.enter_context(
                    registry(self.workdir, "auth-registry", auth=True)).address
                token = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode())
                self.authfile = self.workdir / "auth.json"
                self.authfile.write_text(json.dumps(
                    {"auths": {self.auth_registry: {"auth": token.decode()}}}))
            addresses = [address for address in (self.registry, self.auth_registry) if address]
            os.environ.update(podman_environment(self.workdir, addresses))
            self.podman_is_ours = True
            os.mkdir(os.environ["TMPDIR"])
            # cdi.py remembers the layers it checked there: not in ~/.cache.
            os.environ["XDG_CACHE_HOME"] = str(self.workdir / "cache")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.podman_is_ours:  # never "rmi --all" in the user's own storage
                podman("rmi", "--all", "--force", check=False)
                podman("manifest", "rm", "--all", check=False)
                remove_artifacts(stored_artifacts())
        finally:
            self.services.close()
            os.environ.clear()
            os.environ.update(self.saved_environment)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def build(self, tag, layers, platform=None):
        """Build TAG FROM scratch with one ADD, so one layer, per entry of
        LAYERS, a dict {path in the image: bytes, or a function that writes
        the file at the path it is given}."""
        context = Path(tempfile.mkdtemp(prefix="context-", dir=self.workdir))
        try:
            lines = ["FROM scratch"]
            for index, files in enumerate(layers):
                for path, content in files.items():
                    source = context / f"layer{index}" / path.lstrip("/")
                    source.parent.mkdir(parents=True, exist_ok=True)
                    if callable(content):
                        content(source)
                    else:
                        source.write_bytes(content)
                lines.append(f"ADD layer{index}/ /")
            (context / "Containerfile").write_text("\n".join(lines) + "\n")
            platform_args = [f"--platform={platform}"] if platform else []
            podman("build", "--quiet", "--no-cache", *platform_args, "-t", tag, str(context))
        finally:
            shutil.rmtree(context, ignore_errors=True)
        return inspect(tag)

    def load(self, tag, layers):
        """Load image TAG whose layers are LAYERS (Layers or bytes), base
        first, from a docker-archive written here."""
        layers = [layer if isinstance(layer, Layer) else Layer.of(layer) for layer in layers]
        archive = self.workdir / f"archive-{os.urandom(4).hex()}.tar"
        try:
            diff_ids = write_docker_archive(archive, tag, layers)
            # Not "podman load": it tries the file as an oci-archive first,
            # and unpacks all of it into TMPDIR to find out.
            podman("pull", "--quiet", f"docker-archive:{archive}")
        finally:
            archive.unlink(missing_ok=True)
        image = inspect(tag)
        assert image.diff_ids == diff_ids, "podman changed the layers"
        return image

    @contextlib.contextmanager
    def loaded(self, tag, layers):
        """The image TAG loaded with LAYERS, removed at the end."""
        image = self.load(tag, layers)
        try:
            yield image
        finally:
            podman("rmi", "--force", image.id, check=False)

    def push(self, image, remote, authfile=None):
        extra = [f"--authfile={authfile}"] if authfile else []
        podman("push", "--quiet", *extra, image.name, f"docker://{remote}")

    @contextlib.contextmanager
    def nbdkit(self, args, ready=True, env=None, **popen):
        """nbdkit ARGS in the background, stopped at the end; yields the
        Nbdkit once it is ready (at once if READY is false)."""
        server = Nbdkit(args, self.workdir, env, **popen)
        try:
            if ready:
                server.wait_ready()
            yield server
        finally:
            server.stop()


class Nbdkit:
    """nbdkit -f on a Unix socket, its stderr in a file.  It is ready once
    its -P pidfile holds its PID: nbdkit writes it once it listens.  (The
    socket file is no sign: it appears before nbdkit listens, and connecting
    then fails with ECONNREFUSED, as seen with nbdkit 1.44.)"""

    def __init__(self, args, parent, env=None, **popen):
        self.directory = Path(tempfile.mkdtemp(prefix="nbdkit-", dir=parent))
        self.socket = str(self.directory / "sock")
        self.pidfile = self.directory / "pid"
        self.log_path = self.directory / "stderr"
        self.final_log = None
        command = [NBDKIT, "-f", "--exit-with-parent", "-U", self.socket,
                   "-P", str(self.pidfile), *args]
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log,
                                            env=env, **popen)
        self.pid = self.process.pid

    def is_ready(self):
        with contextlib.suppress(FileNotFoundError):
            return self.pidfile.read_text().endswith("\n")
        return False

    def wait_ready(self, timeout=300):
        """Seconds from start until ready; AssertionError if nbdkit exits first."""
        wait_for(lambda: self.is_ready() or self.process.poll() is not None, timeout,
                 lambda: f"nbdkit not ready after {timeout} s: {self.log()}", interval=0.001)
        seconds = time.monotonic() - self.started
        assert self.process.poll() is None, \
            f"nbdkit exited with status {self.process.returncode}: {self.log()}"
        return seconds

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.socket}"

    def connect(self, export=""):
        handle = nbd.NBD()
        handle.set_export_name(export)
        handle.connect_unix(self.socket)
        return handle

    def log(self):
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def stop(self):
        stop_process(self.process)
        self.final_log = self.log()
        shutil.rmtree(self.directory, ignore_errors=True)


def check_passed(log, index):
    """Whether cdi.py's log (nbdkit -v) says layer INDEX passed its digest
    check, just now or remembered from an earlier start."""
    return (f"verified layer {index} in " in log
            or f"layer {index} passed its check before" in log)


# ------------------------------------------------------------ processes

def podman(*args, check=True):
    """podman ARGS; its stdout.  With CHECK, AssertionError if it fails."""
    result = subprocess.run(["podman", *args], check=False, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit status {result.returncode}: "
                             f"{result.stderr}")
    return result.stdout


@dataclass
class Image:
    name: str               # the local tag
    id: str
    diff_ids: list = field(default_factory=list)


def inspect(reference):
    record = json.loads(podman("image", "inspect", reference))[0]
    return Image(reference, record["Id"], record["RootFS"]["Layers"])


@functools.cache
def tool_version(program):
    """PROGRAM's version, as --version prints it ("4.3.1")."""
    output = subprocess.run([program, "--version"], check=True, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True).stdout
    return re.search(r"[0-9]+(\.[0-9]+)+", output).group(0)


def words_of(program, by_version):
    """What this PROGRAM says, from BY_VERSION, {version: words}: the words
    of the longest version that PROGRAM's version starts with ("5" covers
    5.4.2, "1.18" covers 1.18.0).  A version not in the table fails the
    test, which must then learn that version's words."""
    version = tool_version(program)
    known = [key for key in by_version if f"{version}.".startswith(f"{key}.")]
    assert known, f"no words known for {program} {version}: add them to the test"
    return by_version[max(known, key=len)]


def versions():
    """What this machine runs, in the words of each program, for the report."""
    def first_line(*argv):
        try:
            result = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True)
        except OSError:
            return "not installed"
        return (result.stdout or result.stderr).strip().splitlines()[0]

    with open("/etc/debian_version") as release:
        debian = release.read().strip()
    return {"Debian": debian,
            "nbdkit": first_line(NBDKIT, "--version").split()[-1],
            "libnbd": nbd.NBD().get_version(),
            "podman": tool_version("podman"),
            "skopeo": tool_version("skopeo"),
            "Python": ".".join(map(str, sys.version_info[:3])),
            "qemu": first_line("qemu-img", "--version").split()[2],
            "Distribution": first_line("docker-registry", "--version").split()[-1]}


# What only some releases have, each with a test of whether this one has it.
FEATURES = {
    "qcow2dec": ("nbdkit's qcow2dec filter (nbdkit >= 1.36)",
                 lambda: subprocess.run([NBDKIT, "--filter=qcow2dec", "null", "--dump-plugin"],
                                        check=False, capture_output=True).returncode == 0),
    "podman-artifact": ("podman's artifact store (podman >= 5.4)",
                        lambda: subprocess.run(["podman", "artifact", "ls"], check=False,
                                               capture_output=True).returncode == 0),
    "cosign": ("cosign (Debian >= 13)", lambda: shutil.which("cosign") is not None),
    # Debian 12's skopeo 1.9 has sigstore disabled ("Debian-local change").
    "sigstore": ("a skopeo that verifies sigstore signatures (skopeo >= 1.10)",
                 lambda: tuple(map(int, tool_version("skopeo").split(".")[:2])) >= (1, 10)),
    "skopeo-artifacts": ("a podman without an artifact store (podman < 5.4), whose "
                         "artifacts skopeo copies into the cache",
                         lambda: not has("podman-artifact")),
    # containerd runs as root: a test's own needs no rootlesskit.
    "estargz": ("containerd and stargz-snapshotter's ctr-remote, run as root",
                lambda: bool(shutil.which("containerd") and shutil.which("ctr-remote"))
                and os.geteuid() == 0),
}


@functools.cache
def has(feature):
    """Whether this machine has FEATURE, a key of FEATURES."""
    return FEATURES[feature][1]()


def stored_artifacts():
    """The names in podman's artifact store; none where podman has none."""
    if not has("podman-artifact"):
        return set()
    return set(podman("artifact", "ls", "--noheading", "--format",
                      "{{.Repository}}:{{.Tag}}").split())


def remove_artifacts(names):
    for name in names:
        podman("artifact", "rm", name, check=False)


def wait_for(condition, timeout, message, interval=0.01):
    """Poll CONDITION until it returns something true, and return that.
    After TIMEOUT seconds, AssertionError(MESSAGE), a string or a function
    that makes one."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)
    return value


def processes_mentioning(*words):
    """PIDs of live processes (not this one) whose command line holds one
    of WORDS."""
    words = [word if isinstance(word, bytes) else word.encode() for word in words]
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            command_line = (entry / "cmdline").read_bytes()
            if any(word in command_line for word in words):
                found.add(int(entry.name))
    return found


def stop_process(process, patience=30):
    """SIGTERM, then SIGKILL if PROCESS is still there after PATIENCE seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Copy:
    """What a reader of a whole export did: its exit status, the digest
    and size of what it wrote (what the server served), what it said."""
    returncode: int
    digest: str             # "sha256:..."
    size: int
    stderr: str
    info: dict = None       # nbdinfo's record, where nbdinfo ran first


def copy_out(command, timeout=300, env=None):
    """Run COMMAND, which writes an export to its stdout, hashing what it
    writes as it comes (no shell pipeline to lose its exit status); its
    Copy.  Killed after TIMEOUT seconds."""
    digest, size, killed = hashlib.sha256(), 0, []
    with tempfile.TemporaryFile() as errors:
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=errors, env=env) as process:
            timer = threading.Timer(timeout, lambda: (killed.append(True), process.kill()))
            timer.start()
            try:
                for block in iter(lambda: process.stdout.read(4 * MIB), b""):
                    digest.update(block)
                    size += len(block)
            finally:
                timer.cancel()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if killed:
        stderr += f"\n(killed after {timeout} s)"
    return Copy(process.returncode, "sha256:" + digest.hexdigest(), size, stderr)


def export_digest(uri):
    """The "sha256:" digest of every byte of the NBD export at URI, read
    with nbdcopy; AssertionError, with nbdcopy's words, if it fails."""
    copy = copy_out(["nbdcopy", uri, "-"])
    assert copy.returncode == 0, f"nbdcopy {uri}: exit status {copy.returncode}: {copy.stderr}"
    return copy.digest


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------- podman's world

@dataclass
class Registry:
    address: str            # host:port
    process: subprocess.Popen


@contextlib.contextmanager
def registry(workdir, name, auth=False, token=None, tls=None, *, proxy_of=None):
    """A Distribution registry on 127.0.0.1 with its data in WORKDIR/NAME,
    requiring REGISTRY_USER's password with AUTH, or tokens from TOKEN (an
    httplab.TokenIssuer); speaking HTTPS with TLS, (certificate, key)
    files; a pull-through cache of the registry at PROXY_OF (host:port,
    plain HTTP) if given; yields a Registry."""
    address = f"127.0.0.1:{free_port()}"
    root = Path(workdir) / name
    root.mkdir()
    config = ["version: 0.1", "log: {level: error}",
              f"storage: {{filesystem: {{rootdirectory: {root}/data}}}}",
              f"http: {{addr: '{address}'"
              + (f", tls: {{certificate: '{tls[0]}', key: '{tls[1]}'}}" if tls else "") + "}"]
    if auth:
        (root / "htpasswd").write_text(f"{REGISTRY_USER}:{REGISTRY_PASSWORD_HASH}\n")
        config.append(f"auth: {{htpasswd: {{realm: cdi-test, path: {root}/htpasswd}}}}")
    if token:
        config.append(token.registry_config())
    if proxy_of:
        config.append(f"proxy: {{remoteurl: 'http://{proxy_of}'}}")
    (root / "config.yml").write_text("\n".join(config) + "\n")
    with open(root / "log", "wb") as log:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, "docker-registry", "serve", str(root / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for(lambda: answers(address, https=bool(tls)) or process.poll() is not None, 30,
                 "docker-registry did not answer within 30 s")
        assert process.poll() is None, \
            f"docker-registry exited at start: {(root / 'log').read_text()}"
        yield Registry(address, process)
    finally:
        stop_process(process)


def answers(address, https=False):
    """Whether the registry at ADDRESS answers its API (401: with a password)."""
    host, port = address.rsplit(":", 1)
    connection = (http.client.HTTPSConnection(host, int(port), timeout=1,
                                              context=ssl._create_unverified_context())
                  if https else http.client.HTTPConnection(host, int(port), timeout=1))
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status in (200, 401)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def podman_environment(workdir, registries):
    """Write podman's configuration for WORKDIR, the REGISTRIES (host:port)
    allowed without TLS; return the environment variables that select it."""
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


# ------------------------------------------------------- crafted images

def write_docker_archive(path, tag, layers):
    """A docker-archive (what podman save writes) at PATH of image TAG made
    of LAYERS, base first; returns their diffIDs.  The config comes after
    the layers, so that each layer is hashed while it is written."""
    def member(archive, name, size):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = size, MTIME
        archive.write(info.tobuf(tarfile.PAX_FORMAT))

    layer_names = [f"{index}/layer.tar" for index in range(len(layers))]
    with open(path, "wb") as archive:
        diff_ids = []
        for name, layer in zip(layer_names, layers):
            member(archive, name, layer.size)
            diff_ids.append(layer.write_to(archive))
            archive.write(bytes(-layer.size % tarfile.BLOCKSIZE))
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            # A nonce: the image ID is unique to this session.
            "config": {"Labels": {"cdi-test-nonce": os.urandom(8).hex()}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "lab.py"}] * len(layers),
        }).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": [tag],
                                "Layers": layer_names}]).encode()
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            member(archive, name, len(data))
            archive.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
        archive.write(bytes(2 * tarfile.BLOCKSIZE))
    return diff_ids


# ------------------------------------------------------- OCI artifacts

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"


@dataclass
class Blob:
    """One layer of an artifact: DATA (bytes, or a Path to a file) as the
    registry holds it."""
    media_type: str
    data: object
    title: str = None


def write_oci_layout(path, tag, blobs, *, config_type=EMPTY_CONFIG, config=b"{}",
                     artifact_type=None):
    """An OCI image layout at PATH holding, as TAG, an artifact of BLOBS."""
    def store(data):
        if isinstance(data, Path):
            with open(data, "rb") as file:
                digest = hashlib.sha256()
                for chunk in iter(lambda: file.read(4 * MIB), b""):
                    digest.update(chunk)
            digest = digest.hexdigest()
            shutil.copyfile(data, Path(path) / "blobs" / "sha256" / digest)
            return {"digest": f"sha256:{digest}", "size": data.stat().st_size}
        digest = hashlib.sha256(data).hexdigest()
        (Path(path) / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    (Path(path) / "blobs" / "sha256").mkdir(parents=True)
    layers = []
    for blob in blobs:
        descriptor = {"mediaType": blob.media_type, **store(blob.data)}
        if blob.title is not None:
            descriptor["annotations"] = {TITLE: blob.title}
        layers.append(descriptor)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": config_type, **store(config)}, "layers": layers}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], **store(json.dumps(manifest).encode()),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (Path(path) / "index.json").write_text(json.dumps(index))
    (Path(path) / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def push_raw_disk(lab, what, size):
    """(name in LAB's open registry, its bytes): an ORAS artifact of one
    raw disk of SIZE random bytes, its repository named for WHAT."""
    data = os.urandom(size)
    path = Path(lab.workdir, f"{what}.img")
    path.write_bytes(data)
    name = f"cdi-test/{what}-{os.urandom(4).hex()}:1"
    try:
        push_artifact(lab.workdir, f"{lab.registry}/{name}",
                      [Blob("application/vnd.oci.image.layer.v1.tar", path, "disk.img")])
    finally:
        path.unlink()
    return name, data


def push_artifact(workdir, remote, blobs, authfile=None, **manifest):
    """Push an artifact of BLOBS (see write_oci_layout) to REMOTE."""
    layout = Path(tempfile.mkdtemp(prefix="layout-", dir=workdir))
    extra = [f"--dest-authfile={authfile}"] if authfile else []
    try:
        write_oci_layout(layout, "latest", blobs, **manifest)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra,
                        f"oci:{layout}:latest",
                        f"docker://{remote}"], check=True, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(layout)


# ------------------------------------------------------- seekable layers

def push_zstd_chunked(lab, what, files):
    """(name in LAB's open registry, its Image): an image of one layer of
    FILES (as for Lab.build), pushed as zstd:chunked by this release's
    podman, its repository named for WHAT.  A nonce file makes the layer
    new: podman would otherwise reuse a blob it pushed before, in another
    compression, and write no TOC annotations."""
    nonce = os.urandom(8).hex()
    name = f"cdi-test/{what}-{nonce}:1"
    image = lab.build(f"localhost/{name}", [{**files, "etc/cdi-test-nonce": nonce.encode()}])
    podman("push", "--quiet", "--tls-verify=false", "--compression-format=zstd:chunked",
           image.name, f"docker://{lab.registry}/{name}")
    return name, image


@contextlib.contextmanager
def containerd(workdir):
    """A containerd of the caller's own, its root, state and sockets in a
    directory of WORKDIR: yields the address of its socket; stopped, and
    the directory removed, at the end."""
    directory = Path(tempfile.mkdtemp(prefix="containerd-", dir=workdir))
    address = directory / "containerd.sock"
    (directory / "config.toml").write_text(
        "version = 2\n"
        f'root = "{directory}/root"\n'
        f'state = "{directory}/state"\n'
        # Only the content store and the image service are used: no CRI,
        # and nothing is unpacked, so nothing is mounted.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\naddress = "{address}"\n'
        f'[ttrpc]\naddress = "{address}.ttrpc"\n'
        '[metrics]\naddress = ""\n')
    with open(directory / "log", "wb") as log:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, "containerd", "--config", str(directory / "config.toml")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for(lambda: ctr_remote(address, "version", check=False).returncode == 0
                 or process.poll() is not None, 30, "containerd did not answer within 30 s")
        assert process.poll() is None, \
            f"containerd exited at start: {(directory / 'log').read_text()}"
        yield address
    finally:
        stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)


def ctr_remote(address, *args, check=True):
    """ctr-remote ARGS against the containerd at ADDRESS: the CompletedProcess;
    with CHECK, AssertionError if it fails."""
    result = subprocess.run(["ctr-remote", "--address", str(address), *args], check=False,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"ctr-remote {' '.join(args)}: exit status {result.returncode}: "
                             f"{result.stderr}")
    return result


def push_estargz(lab, source, destination):
    """Copy image SOURCE of LAB's open registry to DESTINATION there as
    eStargz, converted by a containerd and ctr-remote of this call's own.
    From a zstd source layer, the converter writes gzip bytes under a
    tar+zstd media type."""
    source, destination = f"{lab.registry}/{source}", f"{lab.registry}/{destination}"
    with containerd(lab.workdir) as address:
        ctr_remote(address, "content", "fetch", "--plain-http", source)
        ctr_remote(address, "image", "convert", "--estargz", "--oci", source, destination)
        ctr_remote(address, "images", "push", "--plain-http", destination)
