"""Running podman and skopeo in a workspace, and what their errors mean
to the user."""

import logging
import os
import re
import subprocess
import time

from .errors import CdiError
from .parameters import registry_of
from .progress import PROGRESS_INTERVAL, describe_size
from .workspace import memory_file, stderr_text

log = logging.getLogger("cdipy")

# podman's message patterns, and what they mean to the user.
DIAGNOSES = [
    (r"no space left on device",
     "no space left on device in {space}"),
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
    (r"flate: corrupt input",
     "podman's copy of the layer in local storage is corrupt: remove the image "
     "(podman rmi) and pull it again"),
    # podman, skopeo 1.9: the first; skopeo 1.18, a missing archive: the second.
    (r"no such file or directory|archive file not found", "file not found"),
    (r"happened during read: unexpected EOF|connection reset by peer",
     "the connection to {registry} was cut during the download"),
    (r"server gave HTTP response to HTTPS client",
     "registry {registry} speaks plain HTTP, not HTTPS: pass tls-verify=false "
     "if you trust it"),
    (r"pinging container registry|connection refused|no such host|"
     r"i/o timeout|network is unreachable",
     "registry {registry} unreachable"),
]


class Tool:
    """The commands of PROGRAM for image IMAGE_NAME, run in WORKSPACE."""
    program = None

    def __init__(self, workspace, image_name):
        self.workspace = workspace
        self.image_name = image_name

    def start(self, args, stdout=subprocess.PIPE):
        return self.workspace.start([self.program, *args], stdout=stdout)

    def run(self, args, step, ok_statuses=(0,)):
        """Run the program to completion; return (exit status, stdout text)."""
        with memory_file(f"{self.program}-stdout") as output:
            process = self.start(args, stdout=output)
            started = time.monotonic()
            while True:
                try:
                    process.wait(timeout=PROGRESS_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    log.debug(f"{self.program} {args[0]} still running after "
                              f"{time.monotonic() - started:.0f} s")
            if process.returncode not in ok_statuses:
                raise self.failure(process, step)
            output.seek(0)
            return process.returncode, output.read().decode(errors="replace")

    def failure(self, process, step, space_needed=None):
        """The CdiError for a command that failed at STEP, which needs up to
        SPACE_NEEDED bytes in TMPDIR, if known."""
        text = stderr_text(process)
        meaning = diagnose(text, registry_of(self.image_name), self.workspace.tmpdir,
                           self.program)
        if meaning.startswith("no space left") and space_needed is not None:
            meaning += (f"; the import needs up to {describe_size(space_needed)} "
                        "free (podman stages its own copy of the layer)")
        return CdiError(f"{self.image_name}: {step}: {meaning}"
                        f" ({describe_status(process, self.program)}: {summary(text)})")


class Podman(Tool):
    program = "podman"

    def graph_root(self):
        """Where podman keeps its storage."""
        _, output = self.run(["info", "--format", "{{.Store.GraphRoot}}"], "info")
        return output.strip()


class Skopeo(Tool):
    """skopeo, for what podman cannot do: artifacts, and archives copied
    without touching podman's storage."""
    program = "skopeo"

    def start(self, args, stdout=subprocess.PIPE):
        # skopeo 1.9 unpacks an oci-archive into /var/tmp whatever TMPDIR
        # says, and leaves that directory when the copy fails.
        options = [f"--tmpdir={self.workspace.path}"]
        # podman reads CONTAINERS_REGISTRIES_CONF; skopeo 1.9 only the option.
        registries = os.environ.get("CONTAINERS_REGISTRIES_CONF")
        if registries:
            options.append(f"--registries-conf={registries}")
        return super().start([*options, *args], stdout=stdout)


# A line of logrus at a level below error (podman's and skopeo's logger):
# podman 5 warns on every command under cgroup v1, and podman retries with
# "Failed, retrying" warnings.  Neither is the error.
NOT_AN_ERROR = re.compile(r'^time="[^"]*" level=(warning|info|debug|trace) |'
                          r"^(WARN|INFO|DEBU|TRAC)\[[0-9]+\] ")


def diagnose(stderr_text, registry, tmpdir, program="podman"):
    """What podman's STDERR_TEXT means, in words the user can act on.
    REGISTRY is the one the name refers to, if podman names none."""
    stderr_text = "\n".join(error_lines(stderr_text))
    for pattern, meaning in DIAGNOSES:
        if re.search(pattern, stderr_text, re.IGNORECASE):
            match = re.search(r"pinging container registry (\[[^]\s]+\]|[^:\s]+)(:[0-9]+)?",
                              stderr_text)
            return meaning.format(registry=match.group(0).split()[-1] if match else registry,
                                  space=space_of(program, tmpdir))
    return f"{program} failed"


def space_of(program, tmpdir):
    """Where PROGRAM writes: skopeo copies into the cache."""
    if program == "skopeo":
        return f"the cache or TMPDIR={tmpdir}"
    return f"TMPDIR={tmpdir}"


def summary(stderr_text):
    """The tool's own last words: podman's "Error:" line, skopeo's fatal
    message, else its last lines."""
    lines = error_lines(stderr_text)
    errors = [line for line in lines if line.startswith("Error:")]
    for line in lines:
        fatal = re.search(r'level=fatal msg="((?:[^"\\]|\\.)*)"', line)
        if fatal:
            errors = ["Error: " + re.sub(r'\\(.)', r"\1", fatal.group(1))]
    chosen = errors[-1:] or lines[-3:]
    return " / ".join(chosen) or "(no message)"


def error_lines(stderr_text):
    """The lines of STDERR_TEXT, stripped, without blank lines and without
    the logger's warnings and notes."""
    return [line.strip() for line in stderr_text.splitlines()
            if line.strip() and not NOT_AN_ERROR.match(line.strip())]


def describe_status(process, program="podman"):
    if process.returncode < 0:
        return f"{program} killed by signal {-process.returncode}"
    return f"{program} exit status {process.returncode}"
