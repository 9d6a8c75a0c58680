"""Rootless podman, as a real unprivileged user with subordinate ids and
storage of its own, once with vfs (Debian's default for such a user) and
once with overlay: files the user cannot open (mode 0000, or 0600 owned by
another uid of the image, as ADD --chown=107:107 makes) are served from
storage through podman's user namespace, byte for byte, with nothing
written to TMPDIR and no helper left afterwards.

The tests run as root (as CI does) and create the user; where podman
cannot run rootless at all, they skip and say why."""

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import CDI, NBDKIT
from lab import Blob, copy_out, push_artifact, sha256, wait_for, write_docker_archive
from tars import directory, regular, tar_layer

USER = "cdi-rootless-test"


def as_user(home, command, check=True, **run):
    """COMMAND run by USER with HOME, its own runtime directory and podman
    configuration; its CompletedProcess."""
    result = subprocess.run(user_command(home, command), check=False,
                            stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, **run)
    if check:
        assert result.returncode == 0, f"{command}: {result.stderr}"
    return result


def user_command(home, command):
    """The argv that runs COMMAND as USER with HOME (see as_user)."""
    env = {"HOME": str(home), "PATH": f"{Path(NBDKIT).parent}:/usr/bin:/bin",
           "XDG_RUNTIME_DIR": str(home / "run"), "TMPDIR": str(home / "tmp"),
           "XDG_CACHE_HOME": str(home / "cache"),
           "CONTAINERS_STORAGE_CONF": str(home / "storage.conf")}
    return ["runuser", "-u", USER, "--", "env", "-i",
            *[f"{key}={value}" for key, value in env.items()], *command]


def user_processes():
    result = subprocess.run(["pgrep", "-a", "-u", USER], check=False,
                            capture_output=True, text=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def rootless_user():
    """USER, made for these tests with subordinate ids, and removed with
    every process and file of it afterwards."""
    if shutil.which("newuidmap") is None:
        pytest.skip("newuidmap is not installed (package uidmap): no rootless podman")
    subprocess.run(["userdel", "--remove", USER], check=False, capture_output=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    try:
        for path in (Path("/etc/subuid"), Path("/etc/subgid")):
            path.touch(exist_ok=True)  # a fresh machine may have neither yet
        if f"{USER}:" not in Path("/etc/subuid").read_text():
            subprocess.run(["usermod", "--add-subuids", "300000-365535",
                            "--add-subgids", "300000-365535", USER], check=True)
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
        wait_for(lambda: not user_processes(), 30,
                 lambda: f"processes of {USER} left: {user_processes()}")
        subprocess.run(["userdel", USER], check=True)


@pytest.fixture(params=["vfs", "overlay"])
def home(request, rootless_user):
    """The user's home, with podman storage of DRIVER in it."""
    path = Path(tempfile.mkdtemp(prefix="cdi-rootless-"))
    try:
        for name in ("run", "tmp", "cache"):
            (path / name).mkdir(mode=0o700)
        (path / "storage.conf").write_text(
            f'[storage]\ndriver = "{request.param}"\n'
            f'graphroot = "{path}/graph"\nrunroot = "{path}/run/containers"\n')
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(path)], check=True)
        path.chmod(0o755)
        info = as_user(path, ["podman", "info", "--format", "{{.Store.GraphDriverName}}"],
                       check=False)
        if info.returncode != 0:
            pytest.skip(f"rootless podman does not run here: {info.stderr.strip()}")
        assert info.stdout.strip() == request.param
        yield path
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
        wait_for(lambda: not user_processes(), 30,
                 lambda: f"processes of {USER} left: {user_processes()}")
        shutil.rmtree(path)


def owned(entry, uid, mode):
    info, data = entry
    info.uid = info.gid = uid
    info.mode = mode
    return info, data


def load_as_user(home, tag, layers):
    """Load an image crafted from LAYERS into the user's storage; its diffIDs."""
    archive = home / "image.tar"
    diff_ids = write_docker_archive(archive, tag, layers)
    os.chmod(archive, 0o644)
    as_user(home, ["podman", "pull", "--quiet", f"docker-archive:{archive}"])
    archive.unlink()
    return diff_ids


# Each export's sha256, then what TMPDIR holds while serving.  No pipeline
# (dash has no pipefail): each step's failure ends the script, and nbdkit
# exits with its status.
HASH_EXPORTS = """
set -e
nbdinfo --list --json "$uri" >"$XDG_RUNTIME_DIR/exports.json"
for name in $(sed -n 's/.*"export-name": "\\(.*\\)".*/\\1/p' "$XDG_RUNTIME_DIR/exports.json"); do
    nbdcopy "nbd+unix:///$name?socket=$unixsocket" "$XDG_RUNTIME_DIR/copy"
    digest=$(sha256sum "$XDG_RUNTIME_DIR/copy")
    rm "$XDG_RUNTIME_DIR/copy"
    echo "${digest%% *} $name"
done
rm "$XDG_RUNTIME_DIR/exports.json"
echo "TMPDIR: $(ls -A "$TMPDIR")"
"""


def test_rootless_user_is_served_every_layer_in_place(home):
    disk = os.urandom(1 << 20)
    layers = [
        tar_layer([directory("etc"), owned(regular("etc/shadow", b"secret\n"), 0, 0o000),
                   owned(regular("etc/app.conf", b"only 1234 reads me\n"), 1234, 0o600)]),
        tar_layer([owned(directory("disk"), 107, 0o755),
                   owned(regular("disk/disk.img", disk), 107, 0o600)]),
    ]
    diff_ids = load_as_user(home, "localhost/cdi-test/rootless:1", layers)
    result = as_user(home, [NBDKIT, "-v", "-U", str(home / "run/sock"), "python", CDI,
                            "name=localhost/cdi-test/rootless:1", "layer=-1",
                            "--run", HASH_EXPORTS], check=False)
    assert result.returncode == 0, result.stderr
    *digests, tmpdir = result.stdout.splitlines()
    assert digests == [f"{diff_id[7:]} {index}" for index, diff_id in enumerate(diff_ids)] \
        + [f"{hashlib.sha256(disk).hexdigest()} disk"]
    assert tmpdir == "TMPDIR: "
    assert "copying the layer with podman save" not in result.stderr
    assert "running: podman unshare" in result.stderr
    assert "cdipy.userns_helper" not in user_processes()


def test_rootless_user_is_served_an_artifact_from_a_cache_of_its_own(home, lab):
    disk = os.urandom(2 << 20)
    name = f"{lab.registry}/cdi-test/rootless-oras:1"
    push_artifact(lab.workdir, name,
                  [Blob("application/vnd.oci.image.layer.v1.tar", disk, "disk.img")])
    for start in ("cold", "warm"):
        copy = copy_out(user_command(home, [
            NBDKIT, "-U", str(home / f"run/{start}.sock"), "python", CDI, f"name={name}",
            "tls-verify=false", "layer=disk", "--run", 'nbdcopy "$uri" -']))
        assert copy.returncode == 0, f"{start}: {copy.stderr}"
        assert copy.digest == sha256(disk), start
    cache = home / "cache" / "cdi-py"
    assert cache.stat().st_uid == pwd.getpwnam(USER).pw_uid
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    assert os.listdir(home / "tmp") == []
