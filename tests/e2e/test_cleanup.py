"""The plugin leaves nothing behind: not in TMPDIR, not as a process.

After a normal exit, a failure, or SIGTERM/SIGINT/SIGHUP/SIGKILL of nbdkit
in the middle of an import, TMPDIR is empty within PATIENCE seconds and no
podman or guardian process remains.  If the whole process group is killed,
the guardian dies too; then the next start with the same TMPDIR removes the
stale workspace, and only workspaces whose owner is dead and unlocked.

The autouse plugin_tmpdir fixture also checks that TMPDIR ends up empty.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import run_nbdkit, serve
from lab import podman, processes_mentioning, wait_for

PATIENCE = 30  # seconds the plugin is promised to clean up in
STAGED = 1 << 20  # bytes of podman's staged layer that show an import under way


@pytest.fixture(scope="module")
def big(lab):
    """An image with one 256 MiB layer, so that its import takes seconds.
    A random tag keeps its name unique among test sessions running at once:
    the tests find nbdkit and its guardian by that name in /proc."""
    tag = f"localhost/cdi-test/cleanup-{os.urandom(4).hex()}:1"
    image = lab.build(tag, [{"big.bin": os.urandom(1 << 20) * 256}])
    yield image
    podman("rmi", "--force", image.id, check=False)


def import_processes(image):
    """PIDs of live processes whose command line names IMAGE: nbdkit and its
    guardian (a fork, so the same command line) by name, podman by ID."""
    return processes_mentioning(image.name, image.id)


def kill_processes(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tmpdir_entries(tmpdir):
    """Every path under TMPDIR, relative to it."""
    return sorted(os.path.relpath(os.path.join(root, name), tmpdir)
                  for root, directories, files in os.walk(tmpdir)
                  for name in directories + files)


def podman_bytes(tmpdir):
    """Bytes podman has staged in our workspaces, which every podman does
    while it saves a layer: the files there that podman holds open (podman
    5 unlinks its file at once) or that have a name (podman 4 keeps it;
    the plugin's own copy has none)."""
    workspaces = [str(path) + "/" for path in Path(tmpdir).glob("cdi-py-*")]
    files = {}
    for pid in podman_pids():
        with contextlib.suppress(OSError):  # podman may exit meanwhile
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(tuple(workspaces)):
                        status = fd.stat()  # of the open file, named or not
                        files[status.st_dev, status.st_ino] = status.st_size
    with contextlib.suppress(OSError):  # a workspace may vanish meanwhile
        for workspace in workspaces:
            for path in Path(workspace).iterdir():
                if path.is_file():
                    status = path.stat()
                    files[status.st_dev, status.st_ino] = status.st_size
    return sum(files.values())


def podman_pids():
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "podman":
                pids.append(entry.name)
    return pids


@contextlib.contextmanager
def importing(lab, image):
    """nbdkit in the background, in a process group of its own, caught while
    podman is staging IMAGE in the workspace.  Yields the lab.Nbdkit.
    Whatever is left at the end is killed; if the test failed, what it left
    in TMPDIR is removed too, so that the failure is reported once, by the test."""
    tmpdir = os.environ["TMPDIR"]
    failed = False
    # copy=true: served in place from storage, the import writes nothing.
    with serve(lab, f"name={image.name}", "copy=true", ready=False,
               start_new_session=True) as nbdkit:
        try:
            # A MiB: podman's copy of the layer, not a small file podman
            # writes and removes before it (seen: a kill then found nothing).
            wait_for(lambda: podman_bytes(tmpdir) >= STAGED or nbdkit.process.poll() is not None,
                     120, "the import did not start")
            assert nbdkit.process.poll() is None, \
                f"nbdkit exited before the import was seen: {nbdkit.log()}"
            assert not nbdkit.is_ready(), "the import ended too soon to test"
            yield nbdkit
        except BaseException:
            failed = True
            raise
        finally:
            if nbdkit.process.poll() is None:
                os.killpg(nbdkit.pid, signal.SIGKILL)
                nbdkit.process.wait()
            kill_processes(import_processes(image))
            wait_for(lambda: not import_processes(image), 10,
                     lambda: f"cannot kill {describe(import_processes(image))}")
            if failed:
                for entry in Path(tmpdir).iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()


def assert_cleaned_up(image, tmpdir, deadline):
    """TMPDIR empty and no process of the import left, by DEADLINE."""
    wait_for(lambda: not os.listdir(tmpdir), deadline - time.monotonic(),
             lambda: f"TMPDIR still holds {tmpdir_entries(tmpdir)}")
    wait_for(lambda: not import_processes(image), deadline - time.monotonic(),
             lambda: f"processes left: {describe(import_processes(image))}")


def describe(pids):
    lines = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            lines.append(f"{pid}: " + b" ".join(words).decode(errors="replace"))
    return "; ".join(lines)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_during_import_removes_everything(lab, big, plugin_tmpdir, signal_name):
    with importing(lab, big) as nbdkit:
        nbdkit.process.send_signal(getattr(signal, signal_name))
        deadline = time.monotonic() + PATIENCE
        try:
            status = nbdkit.process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"nbdkit still running {PATIENCE} s after "
                                 f"{signal_name}: {describe(import_processes(big))}"
                                 ) from None
        assert status != 0
        assert f"{big.name}: import interrupted by {signal_name}" in nbdkit.log()
        assert_cleaned_up(big, plugin_tmpdir, deadline)


def test_guardian_cleans_up_when_nbdkit_is_killed(lab, big, plugin_tmpdir):
    with importing(lab, big) as nbdkit:
        helpers = import_processes(big) - {nbdkit.pid}
        assert len(helpers) >= 2, f"expected a guardian and podman: {describe(helpers)}"
        nbdkit.process.kill()
        deadline = time.monotonic() + PATIENCE
        assert nbdkit.process.wait() == -signal.SIGKILL
        assert_cleaned_up(big, plugin_tmpdir, deadline)


def test_next_start_removes_workspace_of_killed_process_group(lab, big, three, plugin_tmpdir):
    with importing(lab, big) as nbdkit:
        os.killpg(nbdkit.pid, signal.SIGKILL)
        nbdkit.process.wait()
        wait_for(lambda: not import_processes(big), 10,
                 lambda: f"processes left: {describe(import_processes(big))}")
        stale = list(Path(plugin_tmpdir).glob(f"cdi-py-{nbdkit.pid}-*"))
        assert len(stale) == 1, tmpdir_entries(plugin_tmpdir)
        assert any(stale[0].iterdir()), "podman's staged files should be left too"
        result = run_nbdkit(f"name={three.name}")
        assert result.returncode == 0, result.stderr
        assert not stale[0].exists()


def make_workspace(tmpdir, pid, suffix):
    """A directory named as the plugin names its workspaces."""
    path = Path(tmpdir) / f"cdi-py-{pid}-{suffix}"
    path.mkdir(mode=0o700)
    (path / "staged").write_bytes(b"podman was here")
    return path


def exited_pid():
    """The PID of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_next_start_spares_workspace_of_live_process(three, plugin_tmpdir):
    live = make_workspace(plugin_tmpdir, os.getpid(), "live")
    stale = make_workspace(plugin_tmpdir, exited_pid(), "stale")
    try:
        result = run_nbdkit(f"name={three.name}")
        assert result.returncode == 0, result.stderr
        assert (live / "staged").exists()
        assert not stale.exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_next_start_spares_locked_workspace(three, plugin_tmpdir):
    pid = exited_pid()
    locked = make_workspace(plugin_tmpdir, pid, "locked")
    stale = make_workspace(plugin_tmpdir, pid, "stale")
    lock = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a live nbdkit holds it
        result = run_nbdkit(f"name={three.name}")
        assert result.returncode == 0, result.stderr
        assert (locked / "staged").exists()
        assert not stale.exists()
    finally:
        os.close(lock)
        shutil.rmtree(locked, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_next_start_does_not_follow_a_symlink(three, lab, plugin_tmpdir):
    target = Path(tempfile.mkdtemp(prefix="not-ours-", dir=lab.workdir))
    (target / "precious").write_bytes(b"someone else's data")
    link = Path(plugin_tmpdir) / f"cdi-py-{exited_pid()}-link"
    link.symlink_to(target)
    try:
        result = run_nbdkit(f"name={three.name}")
        assert result.returncode == 0, result.stderr
        assert (target / "precious").exists()
    finally:
        link.unlink()
        shutil.rmtree(target)


@pytest.mark.parametrize("copy", ["false", "true"])
def test_normal_run_leaves_nothing(three, plugin_tmpdir, copy):
    # While serving, TMPDIR is already empty: the layer copy has no name.
    result = run_nbdkit(f"name={three.name}", "layer=-1", f"copy={copy}",
                        run='nbdinfo --size "$uri" && ls -A "$TMPDIR"')
    assert result.returncode == 0, result.stderr
    size, *entries = result.stdout.split("\n")
    assert int(size) > 0
    assert entries == [""], "TMPDIR while serving: " + " ".join(entries)


# Failures in our own checks, in the pull policy and in podman itself.
@pytest.mark.parametrize("params, message", [
    (["name={three}", "layer=7"], "layer=7 is out of range: the image has 3 layers"),
    (["name=localhost/cdi-test/absent:1", "pull=never"],
     "image not found in local storage nor in the cache (pull=never)"),
    (["name=127.0.0.1:1/cdi-test/absent:1"],
     "and its registry 127.0.0.1:1 is unreachable: Connection refused"),
], ids=["layer-out-of-range", "not-in-local-storage", "pull-fails"])
def test_failed_run_leaves_nothing(three, plugin_tmpdir, params, message):
    result = run_nbdkit(*(param.format(three=three.name) for param in params))
    assert result.returncode == 1
    assert message in result.stderr
    assert os.listdir(plugin_tmpdir) == []

