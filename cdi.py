# cdi.py: an nbdkit plugin that exports the layers of a container image.
#
# It pulls IMAGE with podman (unless it is already in local storage) and
# serves each of its layers, an uncompressed tar archive, read-only over NBD:
# in place from podman's storage when it can, from a copy made with
# "podman save" when it must.  Layer N (0 = base, negative counts from the
# top, auto = the one holding the VM disk) is the default export.  KubeVirt
# "containerdisk" images keep a VM disk at disk/... inside a layer; stack
# the tar filter on top to reach it:
#
#   nbdkit python ./cdi.py name=quay.io/kubevirt/cirros-container-disk-demo \
#          layer=auto --filter=tar tar-entry=disk/downloaded
#
# name= must be spelled out: Python plugins have no magic config key.  Run
# "nbdkit python ./cdi.py --dump-plugin" for every parameter.

import base64
import bisect
import builtins
import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

import nbdkit

API_VERSION = 2

# What each parameter means, for --dump-plugin and for error messages.
PARAMETERS = {
    "name": "IMAGE (required) the image, anything podman pull accepts",
    "layer": "N|auto default export: 0 = base (default), negative counts from "
             "the top, auto = the layer holding the VM disk (disk/...)",
    "pull": "missing|always|never when to contact the registry (default missing)",
    "tls-verify": "true|false passed to podman pull",
    "authfile": "PATH registry credentials, passed to podman pull",
    "cert-dir": "PATH TLS certificates, passed to podman pull",
    "platform": "OS/ARCH[/VARIANT] image to take from a multi-arch manifest list",
    "verify": "true|before|false check each layer hashes to its diffID "
              "(default true: while copying, or in the background)",
    "copy": "true|false copy the layer to TMPDIR instead of serving it from "
            "podman's storage (default false)",
}
PULL_POLICIES = ("missing", "always", "never")
# Image transports podman understands; other "word:" prefixes are registry ports.
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "dir",
              "containers-storage", "docker-daemon")
# How often to report progress of a long import with nbdkit -v.
PROGRESS_INTERVAL = 2.0
COPY_CHUNK = 1 << 20
# Zero blocks of this size are left as holes in a copy.
SPARSE_BLOCK = 64 << 10
ZERO_BLOCK = bytes(SPARSE_BLOCK)
# Tar headers of one layer kept in memory on the storage fast path, at most.
MAX_HEADER_BYTES = 16 << 20

settings = {"layer": 0, "pull": "missing", "verify": "true", "copy": False}
diff_ids = []          # every layer of the image, base first
layers = {}            # index -> Layer: the exports ready to serve
unopened = {}          # index -> where in storage: exports built on first use
unavailable = {}       # index -> why that layer could not be opened
layers_lock = threading.Lock()
default_index = 0      # the export chosen with layer=
verify_lock = threading.Lock()
verifying = set()      # indexes of the layers whose digest check has started


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
    if value == "auto":
        return value
    if not re.fullmatch(r"-?[0-9]+", value):
        raise CdiError(f"layer={value!r}: expected an integer "
                       "(0 = base layer, -1 = top layer) or auto")
    if len(value) > 20:
        raise CdiError(f"layer={value[:20]}...: too many digits for a layer number")
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
        "verify": parse_verify,
        "copy": lambda v: parse_bool("copy", v),
    }
    if key not in parsers:
        raise CdiError(f"unknown parameter {key!r}: this plugin takes "
                       + ", ".join(f"{k}=" for k in PARAMETERS))
    settings[key] = parsers[key](value)


def parse_verify(value):
    if value == "before":
        return value
    try:
        return str(parse_bool("verify", value)).lower()
    except CdiError:
        raise CdiError(f"verify={value!r}: expected true, before or false") from None


def parse_choice(key, value, choices):
    if value not in choices:
        raise CdiError(f"{key}={value!r}: expected one of " + ", ".join(choices))
    return value


def config_complete():
    if "name" not in settings:
        raise CdiError("you must supply name=IMAGE after the script name, "
                       "for example: nbdkit python cdi.py name=quay.io/org/image")
    if "authfile" in settings and not os.path.isfile(settings["authfile"]):
        raise CdiError(f"authfile={settings['authfile']!r}: no such file")
    if "cert-dir" in settings and not os.path.isdir(settings["cert-dir"]):
        raise CdiError(f"cert-dir={settings['cert-dir']!r}: no such directory")
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
    if size < 1024:
        return f"{size} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


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
    (r"happened during read: unexpected EOF|connection reset by peer",
     "the connection to {registry} was cut during the download"),
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
            raise interrupted_error(signum)

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
            raise interrupted_error(self.signal_received)

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


def interrupted_error(signum):
    return CdiError(f"{settings['name']}: import interrupted by "
                    f"{signal.Signals(signum).name}")


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
    # connection) except the pipe.
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


# ----------------------------------------------------------------- image

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


def layer_index(layer, count):
    """The index of LAYER (an int, negative from the top) among COUNT."""
    if not -count <= layer < count:
        allowed = f"0..{count - 1} or -{count}..-1" if count else "none"
        raise CdiError(f"{settings['name']}: layer={layer} is out of range: the "
                       f"image has {count} layer{'s' if count != 1 else ''} "
                       f"(allowed: {allowed})")
    return layer % count


# ----------------------------------------------------------------- layers

class Member:
    """One entry of a layer's tar archive."""

    def __init__(self, name, kind, size, offset):
        self.name = name          # str, without a leading "./"
        self.kind = kind          # "file", "directory", "link", "whiteout", "other"
        self.size = size
        self.offset = offset      # where its data starts in the layer

    def is_disk(self):
        return self.kind == "file" and self.name.startswith("disk/")


# Tar type flags, by what they mean to us.
TAR_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"5": "directory",
             b"1": "link", b"2": "link"}


def member_kind(name, typeflag):
    if name.rstrip("/").rsplit("/", 1)[-1].startswith(".wh."):
        return "whiteout"
    if name.endswith("/"):
        return "directory"  # old tars mark directories by name alone
    return TAR_KINDS.get(typeflag, "other")


def parse_member(header, name, size, offset):
    """The Member for entry NAME, whose own tar header block is HEADER."""
    # Only the type flag is needed: parsing whole headers with tarfile
    # took 40% of the time to ready of a layer with thousands of files.
    typeflag = bytes(header[156:157]) if len(header) == tarfile.BLOCKSIZE else b""
    return Member(name, member_kind(name, typeflag), size, offset)


def clean_name(name):
    text = os.fsdecode(name)
    while text.startswith("./"):
        text = text[2:]
    return text


class Layer:
    """The bytes of one layer: a list of segments, each either bytes in
    memory or a range of an open file, and the tar members they hold."""

    def __init__(self, index, diff_id):
        self.index = index
        self.diff_id = diff_id
        self.starts = []      # offset in the layer of each segment
        self.sources = []     # bytes, or (fd, length) read from offset 0
        self.size = 0
        self.members = []
        self.how = ""         # "storage" or "copy", for messages
        self.failure = None   # set when verification fails: reads then fail
        self.description = None  # made once: every client handshake asks

    def add_bytes(self, data):
        if data:
            self.starts.append(self.size)
            self.sources.append(bytes(data))
            self.size += len(data)

    def add_file(self, fd, length):
        self.starts.append(self.size)
        self.sources.append((fd, length))
        self.size += length

    def segments(self, offset, count):
        """Yield (source, offset within it, length) covering the range."""
        index = bisect.bisect_right(self.starts, offset) - 1
        end = offset + count
        while offset < end:
            source = self.sources[index]
            within = offset - self.starts[index]
            length = len(source) if isinstance(source, bytes) else source[1]
            piece = min(length - within, end - offset)
            yield source, within, piece
            offset += piece
            index += 1

    def read(self, view, offset):
        # The common case, a read inside one file, costs one bisect and one
        # preadv: Python's per-request cost is what limits throughput.
        index = bisect.bisect_right(self.starts, offset) - 1
        source = self.sources[index]
        within = offset - self.starts[index]
        if type(source) is tuple and within + len(view) <= source[1]:
            read_exactly(source[0], view, within)
            return
        for source, within, piece in self.segments(offset, len(view)):
            if isinstance(source, bytes):
                view[:piece] = source[within:within + piece]
            else:
                read_exactly(source[0], view[:piece], within)
            view = view[piece:]

    def extents(self, offset, count):
        """(offset, length, is_hole) runs covering the range."""
        runs = []
        position = offset
        for source, within, piece in self.segments(offset, count):
            if isinstance(source, bytes):
                runs.append((position, piece, False))
            else:
                for start, length, hole in file_extents(source[0], within, piece):
                    runs.append((position + start - within, length, hole))
            position += piece
        return runs

    def close(self):
        for source in self.sources:
            if not isinstance(source, bytes):
                os.close(source[0])
        self.sources = []

    def disks(self):
        return [member for member in self.members if member.is_disk()]

    def describe(self):
        if self.description is None:
            self.description = (f"layer {self.index} of {len(diff_ids)}: {self.diff_id}, "
                                f"{describe_size(self.size)}: {self.describe_contents()}")
        return self.description

    def describe_contents(self):
        disks = self.disks()
        if disks:
            return ", ".join(f"{disk.name} ({self.describe_disk(disk)})" for disk in disks)
        counts = {}
        for member in self.members:
            counts[member.kind] = counts.get(member.kind, 0) + 1
        names = {"file": ("file", "files"), "directory": ("directory", "directories"),
                 "link": ("link", "links"), "whiteout": ("whiteout", "whiteouts"),
                 "other": ("other entry", "other entries")}
        parts = [f"{number} {names[kind][number != 1]}"
                 for kind, number in sorted(counts.items())]
        return ", ".join(parts) or "empty"

    def describe_disk(self, member):
        head = bytearray(32)
        if member.size >= len(head):
            self.read(memoryview(head), member.offset)
            if head[:4] == b"QFI\xfb":
                virtual = int.from_bytes(head[24:32], "big")
                return f"qcow2, {describe_size(virtual)} virtual"
        return describe_size(member.size)


def read_exactly(fd, view, offset):
    count = os.preadv(fd, [view], offset)
    while count < len(view):
        if count == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        view = view[count:]
        offset += count
        count = os.preadv(fd, [view], offset)


def file_extents(fd, offset, count):
    """(offset, length, is_hole) runs of FD's range, from SEEK_DATA/HOLE."""
    runs = []
    end = offset + count
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: only a hole follows
                return [(offset, end - offset, False)]
            data = end
        data = min(data, end)
        if data > offset:
            runs.append((offset, data - offset, True))
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole - data, False))
        offset = hole
    return runs


# ------------------------------------------------- fast path: podman's storage

class FastPathUnavailable(Exception):
    """Why a layer cannot be served from storage; the save path takes over."""


def storage_layers(image):
    """(diff directory, tar-split file, diff-size) of each layer of IMAGE,
    base first, from podman's overlay storage."""
    driver = image.get("GraphDriver") or {}
    if driver.get("Name") != "overlay":
        raise FastPathUnavailable(f"storage driver {driver.get('Name')!r} is not overlay")
    upper = (driver.get("Data") or {}).get("UpperDir", "")
    layer_dir = os.path.dirname(upper)
    overlay_dir = os.path.dirname(layer_dir)
    if os.path.basename(upper) != "diff" or os.path.basename(overlay_dir) != "overlay":
        raise FastPathUnavailable(f"unexpected layer directory {upper!r}")
    layers_dir = os.path.join(os.path.dirname(overlay_dir), "overlay-layers")
    try:
        with builtins.open(os.path.join(layers_dir, "layers.json"), "rb") as file:
            records = {record["id"]: record for record in json.load(file)}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FastPathUnavailable(f"cannot read layers.json: {error}") from None
    chain = []
    layer_id = os.path.basename(layer_dir)
    while layer_id:
        record = records.get(layer_id)
        if record is None or record in chain:
            raise FastPathUnavailable(f"layer {layer_id} is not in layers.json")
        chain.append(record)
        layer_id = record.get("parent")
    chain.reverse()
    if [record.get("diff-digest") for record in chain] != image["RootFS"]["Layers"]:
        raise FastPathUnavailable("storage layers do not match the image's diffIDs")
    return [(os.path.join(overlay_dir, record["id"], "diff"),
             os.path.join(layers_dir, record["id"] + ".tar-split.gz"),
             record.get("diff-size"))
            for record in chain]


def tar_split_entries(path):
    """Yield (bytes, None, 0) for raw tar data and (None, name, size) for a
    file's content, from a containers-storage tar-split file."""
    try:
        with gzip.open(path, "rb") as stream:
            for line in stream:
                entry = json.loads(line)
                if entry["type"] == 2:
                    yield base64.b64decode(entry.get("payload") or ""), None, 0
                elif entry["type"] == 1:
                    raw = entry.get("name_raw")
                    name = base64.b64decode(raw) if raw else os.fsencode(entry["name"])
                    yield None, name, entry.get("size") or 0
                else:
                    raise FastPathUnavailable(f"tar-split entry of type {entry['type']}")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise FastPathUnavailable(f"unreadable tar-split {path}: {error}") from None


class DirectoryTree:
    """Opens files beneath one directory, following no symlink and no
    '..', and opening each directory on the way once."""

    def __init__(self, path):
        try:
            self.directories = {(): os.open(path, os.O_RDONLY | os.O_DIRECTORY)}
        except OSError as error:
            raise FastPathUnavailable(f"cannot open {path}: {error.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for fd in self.directories.values():
            os.close(fd)

    def open_file(self, name):
        parts = tuple(part for part in name.split(b"/") if part not in (b"", b"."))
        if not parts or b".." in parts:
            raise FastPathUnavailable(f"unsafe name {name!r} in the tar-split")
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW,
                           dir_fd=self.directory(parts[:-1]))
        except OSError as error:
            raise FastPathUnavailable(f"cannot open {name!r}: {error.strerror}") from None

    def directory(self, parts):
        fd = self.directories.get(parts)
        if fd is None:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY,
                         dir_fd=self.directory(parts[:-1]))
            self.directories[parts] = fd
        return fd


def storage_layer(index, diff_id, diff_dir, tar_split, diff_size):
    """Layer INDEX read in place: headers from the tar-split, file contents
    from the files in DIFF_DIR, each held open so that removing the image
    cannot change what we serve."""
    layer = Layer(index, diff_id)
    layer.how = "storage"
    pending = bytearray()
    header_bytes = 0
    try:
        with DirectoryTree(diff_dir) as tree:
            for data, name, size in tar_split_entries(tar_split):
                if data is not None:
                    pending += data
                    header_bytes += len(data)
                    if header_bytes > MAX_HEADER_BYTES:
                        raise FastPathUnavailable("too many headers to keep in memory")
                    continue
                offset = layer.size + len(pending)
                layer.members.append(parse_member(pending[-tarfile.BLOCKSIZE:],
                                                  clean_name(name), size, offset))
                if size:
                    fd = tree.open_file(name)
                    layer.add_bytes(pending)
                    pending = bytearray()
                    layer.add_file(fd, size)
                    status = os.fstat(fd)
                    if not stat.S_ISREG(status.st_mode) or status.st_size != size:
                        raise FastPathUnavailable(f"{name!r} in storage is not the "
                                                  f"{size}-byte file the tar-split says")
            layer.add_bytes(pending)
    except BaseException:
        layer.close()
        raise
    if diff_size is not None and layer.size != diff_size:
        layer.close()
        raise FastPathUnavailable(f"rebuilt {layer.size} bytes, storage says {diff_size}")
    return layer


# ------------------------------------------------ save path: a copy in TMPDIR

class Progress:
    """Debug lines with bytes and percent at most every PROGRESS_INTERVAL."""

    def __init__(self, what, total):
        self.what = what
        self.total = total
        self.done = 0
        self.last = time.monotonic()

    def add(self, count):
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            nbdkit.debug(f"{self.what} {describe_size(self.done)} of "
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


def copy_sparse(workspace, source, size, out_fd):
    """Copy SIZE bytes from SOURCE to OUT_FD, leaving holes where blocks are
    all zero; return their sha256 (None with verify=false).  No free-space
    check up front: a mostly empty disk needs far less than SIZE."""
    digest = hashlib.sha256() if settings["verify"] != "false" else None
    progress = Progress("copied", size)
    copied = 0
    while copied < size:
        chunk = source.read(min(COPY_CHUNK, size - copied))
        if not chunk:
            raise CdiError(f"{settings['name']}: save: podman's output ended "
                           f"after {copied} of {size} bytes of the layer")
        try:
            for start in range(0, len(chunk), SPARSE_BLOCK):
                block = chunk[start:start + SPARSE_BLOCK]
                if block != ZERO_BLOCK[:len(block)]:
                    write_exactly(out_fd, block, copied + start)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(workspace, size) from None
            raise
        if digest:
            digest.update(chunk)
        copied += len(chunk)
        progress.add(len(chunk))
    os.ftruncate(out_fd, size)
    return "sha256:" + digest.hexdigest() if digest else None


def write_exactly(fd, data, offset):
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count


def scan_members(fd):
    """The tar members of the layer copy in FD."""
    with os.fdopen(os.dup(fd), "rb") as file, \
            tarfile.open(fileobj=file, mode="r:", encoding="utf-8",
                         errors="surrogateescape") as archive:
        members = [Member(clean_name(info.name),
                          member_kind(info.name, info.type), info.size, info.offset_data)
                   for info in archive]
    return members


def copied_layer(workspace, source, size, index, diff_id):
    """Layer INDEX copied from SOURCE into a nameless file, and verified."""
    fd = open_nameless_file(workspace.path)
    try:
        digest = copy_sparse(workspace, source, size, fd)
        if digest is not None and digest != diff_id:
            raise CdiError(f"{settings['name']}: verify: the layer's content hashes "
                           f"to {digest} but the image says {diff_id}; refusing "
                           "to serve it (verify=false skips this check)")
        layer = Layer(index, diff_id)
        layer.how = "copy"
        layer.add_file(fd, size)
        layer.members = scan_members(fd)
    except BaseException:
        os.close(fd)
        raise
    return layer


def save_layer(workspace, image, selected):
    """Stream "podman save" and copy the layer SELECTED (an index, or None
    for the first layer holding a VM disk).  Returns the Layer."""
    # docker-archive holds uncompressed layers named by their diffID, in
    # manifest order: copy what we need and stop reading there.
    diff_ids = image["RootFS"]["Layers"]
    wanted = {}
    for index, diff_id in enumerate(diff_ids):
        if selected is None or index == selected:
            wanted.setdefault(diff_id.split(":", 1)[-1] + ".tar", index)
    process = workspace.start(["save", "--quiet", "--format", "docker-archive",
                               "--", image["Id"]])
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|",
                          bufsize=COPY_CHUNK) as archive:
            for member in archive:
                index = wanted.get(member.name)
                if index is None or not member.isfile():
                    continue
                layer = copied_layer(workspace, archive.extractfile(member),
                                     member.size, index, diff_ids[index])
                if selected is not None or layer.disks():
                    return layer
                nbdkit.debug(f"layer {index} holds no disk/ file")
                layer.close()
        if selected is None:
            raise no_disk_error(len(diff_ids))
        raise CdiError(f"{settings['name']}: save: podman's archive has no layer "
                       f"{diff_ids[selected]}")
    except (tarfile.TarError, CdiError):
        if workspace.signal_received is not None:
            raise  # interrupted: podman is stopped on the way out
        # Podman's own failure, if it failed, explains a broken stream
        # best.  A podman still writing has not failed: don't wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            if process.wait(timeout=5) != 0:
                raise workspace.failure(process, "save") from None
        raise


# ----------------------------------------------------------- choosing layers

def no_disk_error(count):
    return CdiError(f"{settings['name']}: layer=auto: no layer holds a VM disk "
                    f"(a regular file under disk/); looked at {count} layers")


def check_one_disk(layer):
    disks = layer.disks()
    if len(disks) > 1:
        raise CdiError(f"{settings['name']}: layer=auto: layer {layer.index} holds "
                       f"{len(disks)} disks ({', '.join(d.name for d in disks)}): "
                       "pick one with layer=N and the tar filter's tar-entry=")
    return layer


def layers_from_storage(image):
    """Serve IMAGE in place: return ({index: Layer} built now, the selected
    index, {index: storage plan} of the layers built on first use).
    Raises FastPathUnavailable when the selected layer cannot be."""
    plan = storage_layers(image)
    # Only the default layer (and, for layer=auto, the layers searched for
    # the disk) is opened now, so the time to ready is that layer's alone;
    # after_fork opens the others.
    if settings["layer"] == "auto":
        order, selected = range(len(plan)), None
    else:
        selected = layer_index(settings["layer"], len(plan))
        order = [selected]
    built = {}
    try:
        for index in order:
            built[index] = storage_layer(index, diff_ids[index], *plan[index])
            if built[index].disks():
                selected = index if selected is None else selected
                break
    except BaseException:
        for layer in built.values():
            layer.close()
        raise
    if selected is None:
        raise no_disk_error(len(diff_ids))
    check_one_disk(built[selected])
    later = {index: plan[index] for index in range(len(plan)) if index not in built}
    return built, selected, later


def import_layers(workspace, image):
    """Fill layers (and unopened); return the default export's index."""
    if settings["copy"]:
        nbdkit.debug("copy=true: copying the layer with podman save")
    else:
        try:
            built, selected, later = layers_from_storage(image)
            layers.update(built)
            unopened.update(later)
            return selected
        except FastPathUnavailable as reason:
            nbdkit.debug(f"cannot serve from podman's storage ({reason}): "
                         "copying the layer with podman save")
    selected = None if settings["layer"] == "auto" else \
        layer_index(settings["layer"], len(diff_ids))
    layer = check_one_disk(save_layer(workspace, image, selected))
    layers[layer.index] = layer
    return layer.index


def raise_open_file_limit():
    """Serving in place holds every file of a layer open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def get_ready():
    global default_index
    started = time.monotonic()
    raise_open_file_limit()
    with Workspace() as workspace:
        nbdkit.debug(f"workspace {workspace.path}")
        image = find_image(workspace)
        diff_ids.extend(image["RootFS"]["Layers"])
        workspace.space_needed = 2 * image.get("Size", 0)
        nbdkit.debug(f"found image {image['Id']} ({len(diff_ids)} layers) in "
                     f"{time.monotonic() - started:.2f} s")
        default_index = import_layers(workspace, image)
    for index in sorted(layers):
        nbdkit.debug(f"export {index}: {layers[index].how}: {layers[index].describe()}")
    nbdkit.debug(f"ready in {time.monotonic() - started:.2f} s")
    if settings["verify"] == "before" and layers[default_index].how == "storage":
        check_digest(layers[default_index])


# The other layers are opened right after: a client asking for one waits
# for it, and once opened, removing the image cannot change it.
def after_fork():
    if unopened:
        threading.Thread(target=open_other_layers, name="open-layers",
                         daemon=True).start()


def open_other_layers():
    for index in export_indexes():
        exported(index)


# --------------------------------------------------------------- verifying

def check_digest(layer):
    """Read LAYER whole and compare its sha256 with its diffID.  After a
    mismatch every read of the layer fails."""
    started = time.monotonic()
    digest = hashlib.sha256()
    buffer = bytearray(COPY_CHUNK)
    progress = Progress(f"verified layer {layer.index}:", layer.size)
    for offset in range(0, layer.size, COPY_CHUNK):
        view = memoryview(buffer)[:min(COPY_CHUNK, layer.size - offset)]
        layer.read(view, offset)
        digest.update(view)
        progress.add(len(view))
    actual = "sha256:" + digest.hexdigest()
    if actual != layer.diff_id:
        layer.failure = (f"{settings['name']}: verify: layer {layer.index} hashes to "
                         f"{actual} but the image says {layer.diff_id}; refusing to "
                         "serve it (verify=false skips this check)")
        raise CdiError(layer.failure)
    nbdkit.debug(f"verified layer {layer.index} in {time.monotonic() - started:.2f} s")


def verify_in_background(layer):
    """Start checking LAYER's digest once, the first time it is opened.
    Reads are served meanwhile: they come from podman's storage, which
    podman checked when it stored the layer."""
    with verify_lock:
        if layer.index in verifying or settings["verify"] == "false":
            return
        verifying.add(layer.index)
    if layer.how == "copy":
        return  # checked while copying

    def run():
        try:
            check_digest(layer)
        except CdiError:
            pass  # layer.failure is set: every read fails from now on
        except OSError as error:
            # Unchecked data must not be served as if it had been checked.
            layer.failure = (f"{settings['name']}: verify: cannot read layer "
                             f"{layer.index} ({error.strerror}); refusing to serve it")

    threading.Thread(target=run, name=f"verify-{layer.index}", daemon=True).start()


# ------------------------------------------------------------------ serving

def exported(index):
    """The Layer of export INDEX, built from storage on first use; None if
    there is no such export."""
    with layers_lock:
        if index in unopened:
            try:
                layers[index] = storage_layer(index, diff_ids[index], *unopened.pop(index))
                nbdkit.debug(f"export {index}: storage: {layers[index].describe()}")
            except FastPathUnavailable as reason:
                nbdkit.debug(f"layer {index} is not exported: {reason}")
                unavailable[index] = str(reason)
        return layers.get(index)


def export_indexes():
    with layers_lock:
        return sorted(set(layers) | set(unopened))


def list_exports(readonly, is_tls):
    exports = [(index, exported(index)) for index in export_indexes()]
    return [(str(index), layer.describe()) for index, layer in exports if layer]


def default_export(readonly, is_tls):
    return str(default_index)


def find_export(name):
    """The Layer for export NAME: "", an index (negative from the top), or
    a diffID."""
    count = len(diff_ids)
    if name == "":
        return exported(default_index)
    if re.fullmatch(r"-?[0-9]{1,20}", name) and -count <= int(name) < count:
        return exported(int(name) % count)
    return next((exported(index) for index in export_indexes()
                 if diff_ids[index] == name), None)


def open(readonly):
    name = nbdkit.export_name()
    layer = find_export(name)
    if layer is None and name in {str(index) for index in unavailable}:
        nbdkit.set_error(errno.EIO)
        raise CdiError(f"export {name!r}: layer {name} could not be opened in "
                       f"podman's storage: {unavailable[int(name)]}")
    if layer is None:
        nbdkit.set_error(errno.ENOENT)
        raise CdiError(f"no export {name!r}: the exports are "
                       + ", ".join(str(index) for index in export_indexes())
                       + " (or -1, -2, ... or a layer's diffID)")
    verify_in_background(layer)
    return layer


def export_description(layer):
    return layer.describe()


def get_size(layer):
    return layer.size


def is_rotational(layer):
    return False


def can_multi_conn(layer):
    return True


def can_write(layer):
    return False


def can_extents(layer):
    return True


def can_cache(layer):
    return nbdkit.CACHE_NATIVE


def pread(layer, buf, offset, flags):
    if layer.failure:
        nbdkit.set_error(errno.EIO)
        raise CdiError(layer.failure)
    try:
        layer.read(buf, offset)
    except OSError as error:
        nbdkit.set_error(error.errno)
        raise CdiError(f"reading layer {layer.index} at offset {offset}: "
                       f"{error.strerror}") from None


def extents(layer, count, offset, flags):
    runs = []
    for start, length, hole in layer.extents(offset, count):
        kind = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if hole else 0
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
        else:
            runs.append((start, length, kind))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return runs


# The files behind a layer are regular files: let the kernel prefetch.
def cache(layer, count, offset, flags):
    for source, within, piece in layer.segments(offset, count):
        if not isinstance(source, bytes):
            os.posix_fadvise(source[0], within, piece, os.POSIX_FADV_WILLNEED)


def cleanup():
    # The thread opening the other layers may still be adding to layers.
    with layers_lock:
        unopened.clear()
        for layer in layers.values():
            layer.close()
