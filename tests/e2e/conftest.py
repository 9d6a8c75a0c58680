"""Fixtures: the session's lab (lab.py: a private podman and two registries
on 127.0.0.1, one open, one that requires a password), its images, and the
ways the tests run the plugin.  Every test's TMPDIR must be empty when it
ends; the user's own podman storage and /etc are never touched.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbd
import pytest

from httplab import Proxy
from lab import (
    CDI,
    FEATURES,
    NBDKIT,
    Lab,
    copy_out,
    free_port,
    has,
    inspect,
    podman,
    remove_artifacts,
    sha256,
    stored_artifacts,
    versions,
    wait_for,
)

# Test files import these from here too.
__all__ = ["CDI", "NBDKIT", "free_port", "inspect", "podman", "sha256"]


def pytest_report_header(config):
    """What this run tried: "Versions tried" in tests/README.md comes from here."""
    return "versions: " + ", ".join(f"{name} {version}" for name, version in versions().items())


LEFT_OUT = pytest.StashKey()


def pytest_collection_modifyitems(config, items):
    """Leave out the tests marked requires(FEATURE) where FEATURE is missing
    (deselected, not skipped: this release cannot run them), and list them
    at the end of the run."""
    left_out, kept = {}, []
    for item in items:
        missing = [feature for marker in item.iter_markers("requires")
                   for feature in marker.args if not has(feature)]
        if missing:
            left_out.setdefault(missing[0], []).append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=[item for group in left_out.values()
                                             for item in group])
        items[:] = kept
    config.stash[LEFT_OUT] = left_out


def pytest_terminal_summary(terminalreporter, config):
    for feature, items in config.stash.get(LEFT_OUT, {}).items():
        terminalreporter.write_line(
            f"left out, for want of {FEATURES[feature][0]}: {len(items)} tests: "
            + ", ".join(item.nodeid.split("::", 1)[-1] for item in items))


@pytest.fixture(scope="session")
def lab():
    with Lab("cdi-tests-", auth_registry=True) as session:
        yield session


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
    """The TMPDIR of every test, which must be empty when the test ends;
    the images and artifacts it leaves in podman's storage are removed."""
    path = tempfile.mkdtemp(dir=lab.workdir, prefix="plugin-tmp-")
    monkeypatch.setenv("TMPDIR", path)
    before = set(podman("images", "--all", "--quiet", "--no-trunc").split())
    artifacts_before = stored_artifacts()
    yield path
    for image_id in set(podman("images", "--all", "--quiet", "--no-trunc").split()) - before:
        podman("rmi", "--force", image_id, check=False)
    remove_artifacts(stored_artifacts() - artifacts_before)
    try:
        wait_for(lambda: not os.listdir(path), 30,
                 lambda: f"TMPDIR not empty after the test: {os.listdir(path)}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plugin_args(*params, filters=(), verbose=False):
    # -v without a line per request: the plugin's own messages.
    return ((["-v", "-D", "nbdkit.backend.datapath=0"] if verbose else [])
            + [f"--filter={name}" for name in filters] + ["python", CDI, *params])


def nbdkit_command(*params, options=(), filters=()):
    return [NBDKIT, *options, "--exit-with-parent", *plugin_args(*params, filters=filters)]


def run_nbdkit(*params, run="true", env=None, timeout=120, verbose=False, filters=()):
    """nbdkit in captive mode: runs RUN with $uri set, then exits."""
    directory = tempfile.mkdtemp(prefix="cdi-sock-")
    try:
        return subprocess.run(captive_command(directory, params, run, verbose, filters),
                              check=False, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def captive_command(directory, params, run, verbose, filters):
    """nbdkit serving PARAMS on a socket in DIRECTORY while RUN runs."""
    # Not "-U -": nbdkit 1.32 leaves that socket's directory in /tmp
    # whenever a plugin fails to start.
    command = [NBDKIT, "-U", os.path.join(directory, "sock")]
    command += (["-v"] if verbose else []) + [f"--filter={name}" for name in filters]
    return command + ["python", CDI, *params, "--run", run]


def copy_export(*params, export="", info=None, may_fail=False, verbose=False, env=None,
                filters=(), timeout=300):
    """nbdkit in captive mode serving PARAMS, the whole of EXPORT (the
    default one if empty) read by nbdcopy: a lab.Copy, whose returncode is
    nbdkit's, so nbdcopy's, and whose stderr holds both's.  Unless
    MAY_FAIL, AssertionError with that stderr if the copy fails.  With
    INFO (nbdinfo's options, as ["--list"]), nbdinfo --json runs first,
    on the same server, and copy.info is its record."""
    directory = tempfile.mkdtemp(prefix="cdi-sock-")
    info_path = os.path.join(directory, "info.json")
    uri = f'"nbd+unix:///{export}?socket=$unixsocket"' if export else '"$uri"'
    run = f"nbdcopy {uri} -"
    if info is not None:
        run = f'nbdinfo --json {" ".join(info)} "$uri" >{shlex.quote(info_path)} && {run}'
    try:
        copy = copy_out(captive_command(directory, params, run, verbose, filters),
                        timeout=timeout, env=env)
        if info is not None and os.path.exists(info_path):
            with open(info_path) as record:
                copy.info = json.load(record)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert may_fail or copy.returncode == 0, \
        f"the copy failed (exit status {copy.returncode}): {copy.stderr}"
    return copy


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


def serve(lab, *params, filters=(), verbose=False, ready=True, **popen):
    """nbdkit serving PARAMS in the background: a context manager yielding
    the lab.Nbdkit, ready (when READY) and stopped at the end."""
    return lab.nbdkit(plugin_args(*params, filters=filters, verbose=verbose),
                      ready=ready, **popen)


# ------------------------------------------------ a podman that records

# What the fake says: "no" to "image exists", and fails every other
# command at once.
FAKE_PODMAN = """#!/usr/bin/python3 -IS
import json, os, sys
with open({record!r}, "a") as record:
    with open(f"/proc/{{os.getppid()}}/comm") as comm:
        parent = comm.read().strip()
    record.write(json.dumps({{
        "program": os.path.basename(sys.argv[0]),
        "argv": [os.fsencode(word).hex() for word in sys.argv[1:]],
        "parent": parent,
        "tmpdir": os.environ.get("TMPDIR", ""),
    }}) + "\\n")
if sys.argv[1:3] == ["image", "exists"]:
    sys.exit(1)
if os.path.basename(sys.argv[0]) == "skopeo":
    sys.stderr.write('time="0" level=fatal msg="fake skopeo: nothing to see here"\\n')
    sys.exit(1)
sys.stderr.write("Error: fake podman: nothing to see here\\n")
sys.exit(125)
"""
FAKE_ERROR = "(podman exit status 125: Error: fake podman: nothing to see here)"
FAKE_SKOPEO_ERROR = "(skopeo exit status 1: Error: fake skopeo: nothing to see here)"


@pytest.fixture(scope="module")
def fake_podman(lab):
    """(DIRECTORY, RECORD): DIRECTORY holds a podman and a skopeo
    (FAKE_PODMAN) that write each call to the file RECORD, a line of JSON
    each; put it first in PATH."""
    directory = Path(tempfile.mkdtemp(prefix="fake-podman-", dir=lab.workdir))
    record = directory / "calls"
    script = directory / "podman"
    script.write_text(FAKE_PODMAN.format(record=str(record)))
    script.chmod(0o755)
    (directory / "skopeo").symlink_to(script)
    yield directory, record
    shutil.rmtree(directory)


# -------------------------------------------- the registry behind a proxy

@pytest.fixture
def cache(lab):
    """An empty cache= directory of the test's own."""
    path = tempfile.mkdtemp(prefix="cache-", dir=lab.workdir)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def proxy(lab):
    """The open registry behind an httplab.Proxy."""
    with Proxy(lab.registry) as running:
        yield running


def params(proxy, name, cache, *more):
    """cdi.py's parameters for NAME in the registry behind PROXY, cached in CACHE."""
    return (f"name={proxy.address}/{name}", f"cache={cache}", "tls-verify=false", *more)


def read(server, offset, length, export="disk"):
    """LENGTH bytes at OFFSET of EXPORT of SERVER (a lab.Nbdkit), on a connection of their own."""
    handle = server.connect(export)
    try:
        return handle.pread(length, offset)
    finally:
        handle.shutdown()


def assert_every_read_fails(server, size, step, export="disk"):
    """Every read of EXPORT of SERVER (a lab.Nbdkit), SIZE bytes, fails
    with EIO: a 4 KiB read every STEP bytes, and a whole copy, which must
    write not a byte (a reader whose failure a pipeline hid, or bytes
    served in spite of a failed check, would show here)."""
    handle = server.connect(export)
    try:
        for offset in range(0, size, step):
            with pytest.raises(nbd.Error, match="Input/output error"):
                handle.pread(4096, offset)
    finally:
        handle.shutdown()
    copy = copy_out(["nbdcopy", server.uri(export), "-"])
    assert copy.returncode != 0, "nbdcopy read the whole of a refused export"
    assert copy.size == 0, f"nbdcopy was served {copy.size} bytes of a refused export"
    assert "Input/output error" in copy.stderr, copy.stderr
