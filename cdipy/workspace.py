"""A private directory in TMPDIR for one import, the programs it runs, and
their removal however the import ends.

The directory (0700) holds our copy of a layer, as a file with no name, and
podman's own temporary files (podman runs with TMPDIR pointing into it).
It is removed when the import ends: by us on success, failure, SIGINT,
SIGTERM or SIGHUP; by a guardian process if nbdkit is killed outright
during start-up; and otherwise by the next start, which removes
directories whose owner is dead and whose lock is free.  Every program we
start gets SIGTERM if the thread that started it dies.
"""

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from .errors import CdiError

log = logging.getLogger("cdipy")

PREFIX = "cdi-py-"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Children die with the thread that started them, even if nbdkit is killed.
SETPRIV = shutil.which("setpriv")
PARENT_DEATH_SIGNAL = [SETPRIV, "--pdeathsig", "TERM"] if SETPRIV else []


def default_tmpdir():
    return os.environ.get("TMPDIR") or "/var/tmp"


class Workspace:
    """Use as a context manager.  GUARD (only in nbdkit's main thread,
    before it forks and starts threads): fork a guardian and turn SIGINT,
    SIGTERM and SIGHUP into a CdiError that interrupts the import."""

    def __init__(self, image_name, guard=False):
        self.image_name = image_name
        self.guard = guard
        self.tmpdir = default_tmpdir()
        self.path = None
        self.children = []
        self.signal_received = None
        self.deferring_signals = False
        self.cleaning_up = False
        self.saved_handlers = {}
        self.lock_fd = None
        self.guardian = None      # (pid, fd of the pipe to it)

    def __enter__(self):
        remove_stale_workspaces(self.tmpdir)
        try:
            self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.tmpdir)
        except OSError as error:
            raise CdiError(f"TMPDIR={self.tmpdir} is not usable for temporary "
                           f"files: {error.strerror}") from None
        try:
            # The lock marks the directory as live for remove_stale_workspaces.
            self.lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            if self.guard:
                self.guardian = start_guardian(self.path)
                for signum in HANDLED_SIGNALS:
                    self.saved_handlers[signum] = signal.signal(signum, self.on_signal)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        log.debug(f"workspace {self.path}")
        return self

    def on_signal(self, signum, frame):
        self.signal_received = signum
        if not self.cleaning_up and not self.deferring_signals:
            raise self.interrupted_error()

    def interrupted_error(self):
        return CdiError(f"{self.image_name}: import interrupted by "
                        f"{signal.Signals(self.signal_received).name}")

    def __exit__(self, exc_type, exc, tb):
        """Every step runs, whatever the one before it raised."""
        self.cleaning_up = True
        with contextlib.ExitStack() as steps:  # run last to first
            steps.callback(self.restore_signal_handlers)
            if self.lock_fd is not None:
                steps.callback(os.close, self.lock_fd)
            if self.guardian:
                steps.callback(stop_guardian, *self.guardian)
            if self.path:
                steps.callback(log.debug, f"removed {self.path}")
                steps.callback(shutil.rmtree, self.path, ignore_errors=True)
            for child in self.children:
                steps.callback(stop_process, child)
        if exc is None and self.signal_received is not None:
            raise self.interrupted_error()

    def restore_signal_handlers(self):
        for signum, handler in self.saved_handlers.items():
            signal.signal(signum, handler)

    def start(self, argv, stdout=subprocess.PIPE, pass_fds=()):
        """Start ARGV with TMPDIR in this workspace; its stderr goes to a file
        in memory (process.stderr_file)."""
        log.debug("running: " + " ".join(argv))
        program = shutil.which(argv[0])
        if program is None:
            raise CdiError(f"{argv[0]}: command not found (install {argv[0]})")
        stderr = memory_file(f"{argv[0]}-stderr")
        env = dict(os.environ, TMPDIR=self.path)
        # A signal arriving between starting the child and recording it
        # would orphan it: hold the interruption until it is recorded.
        self.deferring_signals = True
        try:
            process = subprocess.Popen([*PARENT_DEATH_SIGNAL, program, *argv[1:]],
                                       stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=stderr, env=env, pass_fds=pass_fds)
            process.stderr_file = stderr
            self.children.append(process)
            if self.guardian:
                os.write(self.guardian[1], f"pid {process.pid}\n".encode())
        except BaseException:
            stderr.close()
            raise
        finally:
            self.deferring_signals = False
        if self.signal_received is not None and not self.cleaning_up:
            raise self.interrupted_error()
        return process


def run_briefly(argv, text, timeout):
    """Run ARGV, a short helper that needs no workspace (a credential
    helper), with TEXT on its standard input; (exit status, stdout,
    stderr).  CdiError if it is not installed, or still runs after TIMEOUT
    seconds (then it is killed)."""
    log.debug("running: " + " ".join(argv))
    program = shutil.which(argv[0])
    if program is None:
        raise CdiError(f"{argv[0]}: command not found (install {argv[0]})")
    try:
        done = subprocess.run([*PARENT_DEATH_SIGNAL, program, *argv[1:]], input=text.encode(),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CdiError(f"{argv[0]}: no answer after {timeout} s") from None
    except OSError as error:
        raise CdiError(f"{argv[0]}: cannot run it: {error.strerror}") from None
    return (done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"))


def memory_file(name):
    """A file in memory for a child's output: TMPDIR may be full, and then
    the child's message saying so must still reach the user."""
    return os.fdopen(os.memfd_create(name, os.MFD_CLOEXEC), "w+b")


def stderr_text(process):
    process.stderr_file.seek(0)
    return process.stderr_file.read().decode(errors="replace")


def stop_process(process):
    with contextlib.ExitStack() as steps:
        steps.callback(process.stderr_file.close)
        if process.stdout:
            steps.callback(process.stdout.close)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def remove_stale_workspaces(tmpdir):
    """Remove workspaces left by an nbdkit killed with its whole process
    group: only those whose owner process is dead and whose lock is free."""
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(re.escape(PREFIX) + r"([0-9]+)-\w+", name)
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
                log.debug(f"removing stale {path}")
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
    """Fork a process that removes PATH, and stops the programs we name to
    it, if nbdkit dies before saying "done".  Returns (pid, fd)."""
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


def stop_guardian(pid, fd):
    with contextlib.ExitStack() as steps:
        steps.callback(os.waitpid, pid, 0)
        steps.callback(os.close, fd)
        with contextlib.suppress(OSError):
            os.write(fd, b"done\n")


def guard(read_fd, path):
    for signum in HANDLED_SIGNALS:
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
        try:
            chunk = os.read(read_fd, 4096)
        except OSError as error:
            if error.errno == errno.EINTR:
                continue
            break
        if not chunk:
            break
        messages += chunk
    orphans = orders(messages)
    if orphans is None:
        return
    try:
        stop_orphans(orphans)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def orders(messages):
    """What the guardian is to do, from MESSAGES, all nbdkit wrote to it
    before the pipe closed: None if nbdkit said "done" (the import ended,
    nbdkit cleaned up itself), else the PIDs of the programs to stop before
    removing the workspace."""
    lines = messages.splitlines()
    if b"done" in lines:
        return None
    return [int(fields[1]) for fields in (line.split() for line in lines)
            if len(fields) == 2 and fields[0] == b"pid" and fields[1].isdigit()]


def stop_orphans(pids):
    """SIGTERM, then SIGKILL, the podman and skopeo processes among PIDS."""
    def alive_podman(pid):
        try:
            with open(f"/proc/{pid}/comm") as comm:
                return comm.read().strip() in ("podman", "skopeo")
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
