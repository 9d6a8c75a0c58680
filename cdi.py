# cdi.py: an nbdkit plugin that exports one layer of a container image.
#
# It pulls IMAGE with podman (unless it is already in local storage), takes
# layer N (0 = base, negative counts from the top) and serves that layer, an
# uncompressed tar archive, read-only over NBD.  KubeVirt "containerdisk"
# images keep a VM disk at disk/... inside a layer; stack the tar filter on
# top to reach it:
#
#   nbdkit python ./cdi.py name=quay.io/kubevirt/cirros-container-disk-demo \
#          --filter=tar tar-entry=disk/downloaded
#
# name= must be spelled out: Python plugins have no magic config key.  Run
# "nbdkit python ./cdi.py --dump-plugin" for every parameter.

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

import nbdkit

API_VERSION = 2

# What each parameter means, for --dump-plugin and for error messages.
PARAMETERS = {
    "name": "IMAGE (required) the image, anything podman pull accepts",
    "layer": "N layer to export: 0 = base (default), negative counts from the top",
    "pull": "missing|always|never when to contact the registry (default missing)",
    "tls-verify": "true|false passed to podman pull",
    "authfile": "PATH registry credentials, passed to podman pull",
    "cert-dir": "PATH TLS certificates, passed to podman pull",
    "platform": "OS/ARCH[/VARIANT] image to take from a multi-arch manifest list",
    "verify": "true|false check the layer hashes to its diffID (default true)",
}
PULL_POLICIES = ("missing", "always", "never")
# Image transports podman understands; other "word:" prefixes are registry ports.
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "dir",
              "containers-storage", "docker-daemon")
# How often to report progress of a long import with nbdkit -v.
PROGRESS_INTERVAL = 2.0
COPY_CHUNK = 1 << 20

settings = {"layer": 0, "pull": "missing", "verify": True}  # parsed parameters
layer_fd = -1          # the layer copy: no name on disk, held open until exit
layer_size = 0         # its size in bytes
layer_description = ""  # what export_description says


class CdiError(Exception):
    """A failure the user can act on (bad parameter, podman said no, full
    disk).  nbdkit shows it as one line; any other exception is a bug and
    keeps its traceback."""


# nbdkit-python-plugin formats every exception raised by a callback with
# traceback.format_exception.  For a CdiError the traceback only hides the
# message, so give nbdkit the message alone.
_format_exception = traceback.format_exception


def _format_exception_for_nbdkit(exc, *args, **kwargs):
    value = args[0] if args else exc
    if isinstance(value, CdiError):
        return [str(value)]
    return _format_exception(exc, *args, **kwargs)


traceback.format_exception = _format_exception_for_nbdkit


# ---------------------------------------------------------------- parameters

def parse_bool(key, value):
    words = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    try:
        return words[value.lower()]
    except KeyError:
        raise CdiError(f"{key}={value!r}: expected true or false") from None


def parse_layer(value):
    if not re.fullmatch(r"-?[0-9]+", value):
        raise CdiError(f"layer={value!r}: expected an integer "
                       "(0 = base layer, -1 = top layer)")
    if value.startswith("-") and int(value) == 0:
        raise CdiError(f"layer={value!r} is ambiguous: "
                       "use 0 for the base layer or -1 for the top layer")
    return int(value)


def parse_image_name(value):
    if value == "":
        raise CdiError("name= is empty: expected an image such as "
                       "quay.io/kubevirt/fedora-cloud-container-disk-demo")
    if value.startswith("-"):
        raise CdiError(f"name={value!r}: an image name cannot start with '-'")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise CdiError(f"name={value!r}: an image name cannot contain "
                       "spaces or control characters")
    return value


def parse_platform(value):
    if not re.fullmatch(r"[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_.]+)?", value):
        raise CdiError(f"platform={value!r}: expected OS/ARCH[/VARIANT], "
                       "for example linux/arm64/v8")
    return value


def parse_path(key, value):
    if value == "":
        raise CdiError(f"{key}= is empty: expected a path")
    return os.path.abspath(value)


def dump_plugin():
    print("cdi_usage=nbdkit python cdi.py name=IMAGE [layer=N] [key=value ...]")
    for key, text in PARAMETERS.items():
        print(f"cdi_param_{key.replace('-', '_')}={key}={text}")
    print("cdi_env_TMPDIR=where temporary data goes (default /var/tmp)")
    # nbdkit exits without flushing Python's stdout.
    sys.stdout.flush()


def config(key, value):
    parsers = {
        "name": parse_image_name,
        "layer": parse_layer,
        "pull": lambda v: parse_choice("pull", v, PULL_POLICIES),
        "tls-verify": lambda v: parse_bool("tls-verify", v),
        "authfile": lambda v: parse_path("authfile", v),
        "cert-dir": lambda v: parse_path("cert-dir", v),
        "platform": parse_platform,
        "verify": lambda v: parse_bool("verify", v),
    }
    if key not in parsers:
        raise CdiError(f"unknown parameter {key!r}: this plugin takes "
                       + ", ".join(f"{k}=" for k in PARAMETERS))
    settings[key] = parsers[key](value)


def parse_choice(key, value, choices):
    if value not in choices:
        raise CdiError(f"{key}={value!r}: expected one of " + ", ".join(choices))
    return value


def config_complete():
    if "name" not in settings:
        raise CdiError("you must supply name=IMAGE after the script name, "
                       "for example: nbdkit python cdi.py name=quay.io/org/image")
    if "authfile" in settings and not os.path.isfile(settings["authfile"]):
        raise CdiError(f"authfile={settings['authfile']}: no such file")
    if "cert-dir" in settings and not os.path.isdir(settings["cert-dir"]):
        raise CdiError(f"cert-dir={settings['cert-dir']}: no such directory")
    if settings["pull"] == "never" and local_reference(settings["name"]) is None:
        raise CdiError(f"pull=never cannot be used with {settings['name']}: "
                       "that transport always imports the image")


# Reads on one connection are serialized; connections run in parallel.
# Measured here: os.preadv under SERIALIZE_REQUESTS reads at ~1.0x of
# "nbdkit file", under PARALLEL at ~0.75x (the GIL on 2 cores).
def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


# ------------------------------------------------------------------ podman

def describe_size(size):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # unreachable, keeps linters quiet


def split_transport(name):
    """Return (transport, rest); transport is "" for a plain registry name."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in TRANSPORTS:
        return prefix, rest
    return "", name


def local_reference(name):
    """The name to look up in local storage, or None for file transports,
    which podman must always import."""
    transport, rest = split_transport(name)
    if transport == "":
        return name
    if transport == "docker":
        return rest.lstrip("/")
    if transport == "containers-storage":
        return rest
    return None


def registry_of(name):
    """The registry host a name refers to, as podman would contact it."""
    reference = local_reference(name) or name
    first, sep, _ = reference.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "the default search registries"


def podman_summary(stderr_text):
    """podman's own last words: its "Error:" line, else its last lines."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    chosen = errors[-1:] or lines[-3:]
    return " / ".join(chosen) or "(no message)"


# podman's message patterns, and what they mean to the user.
PODMAN_DIAGNOSES = [
    (r"no space left on device",
     "no space left on device in TMPDIR={tmpdir}"),
    (r"short-name .* did not resolve|unqualified-search",
     "short name with no search registries configured: use a fully "
     "qualified name such as quay.io/ORG/IMAGE"),
    (r"unauthorized|authentication required",
     "authentication required by {registry}: run podman login or pass "
     "authfile=PATH"),
    (r"manifest unknown|name unknown|image not known|no such image",
     "image not found"),
    (r"file integrity checksum failed|digest did not match",
     "the layer in local storage does not match its digest: remove the image "
     "(podman rmi) and pull it again"),
    (r"no such file or directory", "file not found"),
    (r"pinging container registry|connection refused|no such host|"
     r"i/o timeout|network is unreachable|server gave HTTP response",
     "registry {registry} unreachable"),
]


def diagnose(stderr_text, tmpdir):
    for pattern, meaning in PODMAN_DIAGNOSES:
        if re.search(pattern, stderr_text, re.IGNORECASE):
            match = re.search(r"pinging container registry ([^:\s]+(:[0-9]+)?)",
                              stderr_text)
            registry = match.group(1) if match else registry_of(settings["name"])
            return meaning.format(registry=registry, tmpdir=tmpdir)
    return "podman failed"


def space_hint(space_needed):
    if space_needed is None:
        return ""
    return (f"; the import needs up to {describe_size(space_needed)} free "
            "(podman stages its own copy of the layer)")


class Workspace:
    """Everything an import leaves on disk, and the means to remove it.

    A private 0700 directory in TMPDIR holds our copy of the layer (as a file
    with no name) and podman's own temporary files (podman gets TMPDIR set to
    it).  It is removed when the import ends, however it ends: by us on
    success, failure, SIGINT, SIGTERM or SIGHUP; by a guardian process if
    nbdkit is killed outright; and, if the guardian was killed too, by the
    next start, which removes directories whose owner is dead.
    """

    PREFIX = "cdi-py-"

    def __init__(self):
        self.tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
        self.children = []
        self.signal_received = None
        self.cleaning_up = False
        self.space_needed = None  # bytes, once the image is known
        self.saved_handlers = {}

    def __enter__(self):
        remove_stale_workspaces(self.tmpdir)
        try:
            self.path = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-",
                                         dir=self.tmpdir)
        except OSError as error:
            raise CdiError(f"TMPDIR={self.tmpdir} is not usable for temporary "
                           f"files: {error.strerror}") from None
        try:
            # The lock marks the directory as live for remove_stale_workspaces.
            self.lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            self.guardian_pid, self.guardian_fd = start_guardian(self.path)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.saved_handlers[signum] = signal.signal(signum, self.on_signal)
        return self

    def on_signal(self, signum, frame):
        self.signal_received = signum
        if not self.cleaning_up:
            raise CdiError(f"{settings['name']}: import interrupted by "
                           f"{signal.Signals(signum).name}")

    def __exit__(self, exc_type, exc, tb):
        self.cleaning_up = True
        for child in self.children:
            stop_process(child)
        shutil.rmtree(self.path, ignore_errors=True)
        os.write(self.guardian_fd, b"done\n")
        os.close(self.guardian_fd)
        os.waitpid(self.guardian_pid, 0)
        os.close(self.lock_fd)
        for signum, handler in self.saved_handlers.items():
            signal.signal(signum, handler)
        nbdkit.debug(f"removed {self.path}")
        if exc is None and self.signal_received is not None:
            raise CdiError(f"{settings['name']}: import interrupted by "
                           f"{signal.Signals(self.signal_received).name}")

    def start(self, args, stdout=subprocess.PIPE):
        """Start podman with ARGS; its stderr goes to a nameless file."""
        argv = ["podman"] + args
        nbdkit.debug("running: " + " ".join(argv))
        stderr = memory_file("podman-stderr")
        env = dict(os.environ, TMPDIR=self.path)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=stdout, stderr=stderr, env=env)
        except FileNotFoundError:
            stderr.close()
            raise CdiError("podman: command not found (install podman)") from None
        process.stderr_file = stderr
        self.children.append(process)
        os.write(self.guardian_fd, f"pid {process.pid}\n".encode())
        return process

    def failure(self, process, step):
        """The CdiError for a podman command that failed at STEP."""
        process.stderr_file.seek(0)
        text = process.stderr_file.read().decode(errors="replace")
        status = (f"killed by signal {-process.returncode}"
                  if process.returncode < 0 else f"exit status {process.returncode}")
        meaning = diagnose(text, self.tmpdir)
        if meaning.startswith("no space left"):
            meaning += space_hint(self.space_needed)
        return CdiError(f"{settings['name']}: {step}: {meaning}"
                        f" (podman {status}: {podman_summary(text)})")

    def run(self, args, step, ok_statuses=(0,)):
        """Run podman to completion; return (exit status, stdout text)."""
        with memory_file("podman-stdout") as output:
            process = self.start(args, stdout=output)
            started = time.monotonic()
            while True:
                try:
                    process.wait(timeout=PROGRESS_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    nbdkit.debug(f"podman {args[0]} still running after "
                                 f"{time.monotonic() - started:.0f} s")
            if process.returncode not in ok_statuses:
                raise self.failure(process, step)
            output.seek(0)
            return process.returncode, output.read().decode(errors="replace")


def memory_file(name):
    """A file in memory for podman's output: TMPDIR may be full, and then
    podman's message saying so must still reach the user."""
    return os.fdopen(os.memfd_create(name, os.MFD_CLOEXEC), "w+b")


def stop_process(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()
    process.stderr_file.close()


def remove_stale_workspaces(tmpdir):
    """Remove workspaces left by an nbdkit killed with its whole process
    group: only those whose owner process is dead and whose lock is free."""
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(re.escape(Workspace.PREFIX) + r"([0-9]+)-\w+", name)
        if not match or process_exists(int(match.group(1))):
            continue
        path = os.path.join(tmpdir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_uid == os.geteuid():
                nbdkit.debug(f"removing stale {path}")
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_guardian(path):
    """Fork a process that removes PATH, and stops the podman processes we
    name to it, if nbdkit dies before saying "done".  Returns (pid, fd)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_fd)
            guard(read_fd, path)
        finally:
            os._exit(0)
    os.close(read_fd)
    return pid, write_fd


def guard(read_fd, path):
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Hold no descriptor of nbdkit's open (under nbdkit -s stdout is the NBD
    # connection) except the pipe and the workspace lock.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, read_fd)
    os.closerange(read_fd + 1, os.sysconf("SC_OPEN_MAX"))
    messages = b""
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        messages += chunk
    lines = messages.splitlines()
    if b"done" in lines:
        return
    pids = [int(line.split()[1]) for line in lines if line.startswith(b"pid ")]
    try:
        stop_orphans(pids)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_orphans(pids):
    """SIGTERM, then SIGKILL, the podman processes among PIDS."""
    def alive_podman(pid):
        try:
            with builtins.open(f"/proc/{pid}/comm") as comm:
                return comm.read().strip() == "podman"
        except OSError:
            return False

    for signum, patience in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        survivors = [pid for pid in pids if alive_podman(pid)]
        for pid in survivors:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        deadline = time.monotonic() + patience
        while any(alive_podman(pid) for pid in survivors) and time.monotonic() < deadline:
            time.sleep(0.1)


# ----------------------------------------------------------------- import

def podman_options():
    """Registry options for podman pull, each a single argv element."""
    options = []
    if "tls-verify" in settings:
        options.append(f"--tls-verify={str(settings['tls-verify']).lower()}")
    for key in ("authfile", "cert-dir", "platform"):
        if key in settings:
            options.append(f"--{key}={settings[key]}")
    return options


def inspect_image(workspace, reference):
    _, output = workspace.run(["image", "inspect", "--", reference], "inspect")
    try:
        return json.loads(output)[0]
    except (ValueError, IndexError, KeyError):
        raise CdiError(f"{settings['name']}: inspect: podman printed "
                       f"unexpected output: {output[:200]!r}") from None


def platform_matches(image):
    if "platform" not in settings:
        return True
    wanted = settings["platform"].split("/")
    actual = [image.get("Os", ""), image.get("Architecture", ""),
              image.get("Variant", "")][:len(wanted)]
    return actual == wanted


def find_image(workspace):
    """Apply the pull policy; return the image's inspect record."""
    name = settings["name"]
    local = local_reference(name)
    local_only = (settings["pull"] == "never"
                  or split_transport(name)[0] == "containers-storage")
    if local is not None and (settings["pull"] != "always" or local_only):
        status, _ = workspace.run(["image", "exists", "--", local],
                                  "look up in local storage", ok_statuses=(0, 1))
        if status == 0:
            image = inspect_image(workspace, local)
            if platform_matches(image):
                nbdkit.debug(f"using {image['Id']} from local storage")
                return image
            nbdkit.debug(f"local {name} is not {settings['platform']}")
    if local_only:
        raise CdiError(f"{name}: image not found in local storage"
                       + (" (pull=never)" if settings["pull"] == "never" else ""))
    _, output = workspace.run(["pull", "--quiet"] + podman_options() + ["--", name],
                              "pull")
    # Refer to the pulled image by its ID: looking up a docker:// name
    # after pulling it fails (podman issue 20775).
    image_id = output.split()[-1] if output.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", image_id):
        raise CdiError(f"{name}: pull: podman printed no image ID: {output!r}")
    return inspect_image(workspace, image_id)


def select_layer(image, layer):
    """Return (index, diffID) of LAYER, which may count from the top."""
    layers = image.get("RootFS", {}).get("Layers") or []
    count = len(layers)
    if not -count <= layer < count:
        allowed = f"0..{count - 1} or -{count}..-1" if count else "none"
        raise CdiError(f"{settings['name']}: layer={layer} is out of range: the "
                       f"image has {count} layer{'s' if count != 1 else ''} "
                       f"(allowed: {allowed})")
    index = layer % count
    return index, layers[index]


class Progress:
    """Debug lines with bytes and percent at most every PROGRESS_INTERVAL."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.last = time.monotonic()

    def add(self, count):
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            nbdkit.debug(f"copied {describe_size(self.done)} of "
                         f"{describe_size(self.total)} "
                         f"({100 * self.done // max(self.total, 1)}%)")


def open_nameless_file(directory):
    """A 0600 file with no name: O_TMPFILE where the filesystem has it,
    otherwise created and unlinked at once."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return fd


def no_space_error(workspace, size):
    free = shutil.disk_usage(workspace.path).free
    return CdiError(f"{settings['name']}: save: no space left on device in "
                    f"TMPDIR={workspace.tmpdir}: the layer needs "
                    f"{describe_size(size)}, {describe_size(free)} free")


def copy_member(workspace, source, size, out_fd):
    """Copy SIZE bytes from SOURCE to OUT_FD; return their sha256 or None."""
    if shutil.disk_usage(workspace.path).free < size:
        raise no_space_error(workspace, size)
    digest = hashlib.sha256() if settings["verify"] else None
    progress = Progress(size)
    copied = 0
    while copied < size:
        chunk = source.read(min(COPY_CHUNK, size - copied))
        if not chunk:
            raise CdiError(f"{settings['name']}: save: podman's output ended "
                           f"after {copied} of {size} bytes of the layer")
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(out_fd, view):]
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(workspace, size) from None
            raise
        if digest:
            digest.update(chunk)
        copied += len(chunk)
        progress.add(len(chunk))
    return "sha256:" + digest.hexdigest() if digest else None


def extract_layer(workspace, image_id, diff_id):
    """Stream "podman save" and keep only the layer with DIFF_ID.  Returns
    the descriptor of its nameless copy."""
    # docker-archive holds uncompressed layers named by their diffID and
    # streams them in manifest order, so we stop reading once ours is done.
    process = workspace.start(["save", "--quiet", "--format", "docker-archive",
                               "--", image_id])
    wanted = diff_id.split(":", 1)[-1] + ".tar"
    out_fd = open_nameless_file(workspace.path)
    try:
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|",
                              bufsize=COPY_CHUNK) as archive:
                for member in archive:
                    if member.name == wanted and member.isfile():
                        source = archive.extractfile(member)
                        digest = copy_member(workspace, source, member.size, out_fd)
                        break
                else:
                    raise CdiError(f"{settings['name']}: save: podman's archive "
                                   f"has no layer {diff_id}")
        except (tarfile.TarError, CdiError):
            if workspace.signal_received is not None:
                raise  # interrupted: podman is stopped on the way out
            # Podman's own failure, if it failed, explains a broken stream
            # best.  A podman still writing has not failed: don't wait for it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                if process.wait(timeout=5) != 0:
                    raise workspace.failure(process, "save") from None
            raise
        if digest is not None and digest != diff_id:
            raise CdiError(f"{settings['name']}: verify: the layer's content hashes "
                           f"to {digest} but the image says {diff_id}; refusing "
                           "to serve it (verify=false skips this check)")
    except BaseException:
        os.close(out_fd)
        raise
    return out_fd


def get_ready():
    global layer_fd, layer_size, layer_description
    started = time.monotonic()
    with Workspace() as workspace:
        nbdkit.debug(f"workspace {workspace.path}")
        image = find_image(workspace)
        index, diff_id = select_layer(image, settings["layer"])
        count = len(image["RootFS"]["Layers"])
        workspace.space_needed = 2 * image.get("Size", 0)
        nbdkit.debug(f"found image {image['Id']} in {time.monotonic() - started:.2f} s;"
                     f" exporting layer {index} of {count}: {diff_id}")
        copy_started = time.monotonic()
        layer_fd = extract_layer(workspace, image["Id"], diff_id)
    layer_size = os.fstat(layer_fd).st_size
    nbdkit.debug(f"copied the layer ({describe_size(layer_size)}) in "
                 f"{time.monotonic() - copy_started:.2f} s; ready in "
                 f"{time.monotonic() - started:.2f} s")
    layer_description = (f"layer {index} of {count} of {settings['name']} "
                         f"({diff_id}, {layer_size} bytes)")


# ------------------------------------------------------------------ serving

def open(readonly):
    return {}


def export_description(h):
    return layer_description


def get_size(h):
    return layer_size


def is_rotational(h):
    return False


def can_multi_conn(h):
    return True


def can_write(h):
    return False


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def pread(h, buf, offset, flags):
    view = memoryview(buf)
    while view:
        try:
            count = os.preadv(layer_fd, [view], offset)
        except OSError as error:
            nbdkit.set_error(error.errno)
            raise CdiError(f"reading the layer at offset {offset}: "
                           f"{error.strerror}") from None
        if count == 0:
            nbdkit.set_error(errno.EIO)
            raise CdiError(f"reading the layer at offset {offset}: "
                           "unexpected end of file")
        view = view[count:]
        offset += count


# The layer copy is a regular file, so the kernel can prefetch it.
def cache(h, count, offset, flags):
    os.posix_fadvise(layer_fd, offset, count, os.POSIX_FADV_WILLNEED)


def cleanup():
    if layer_fd >= 0:
        os.close(layer_fd)
