"""Every error a user can meet, caused for real, and the line nbdkit prints."""

import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import CDI, free_port, nbdkit_error, podman, read_export, run_nbdkit, sha256
from lab import words_of


@pytest.fixture
def scratch(lab):
    """A directory for the test's own files, removed when it ends."""
    path = tempfile.mkdtemp(dir=lab.workdir, prefix="errors-")
    yield path
    shutil.rmtree(path)


def user_error(*params, env=None):
    """The one line nbdkit prints for a user error; no Python traceback."""
    stderr = nbdkit_error(*params, env=env)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ------------------------------------------------------------- parameters


def test_user_error_is_one_plain_line():
    stderr = nbdkit_error("name=localhost/x", "layer=abc")
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [
        f"nbdkit: error: {CDI}: config: error: layer='abc': expected an integer "
        "(0 = base layer, -1 = top layer), auto or disk"
    ]


def test_layer_must_be_an_integer():
    assert "layer='abc': expected an integer" in user_error("name=localhost/x", "layer=abc")


def test_layer_minus_zero_is_ambiguous():
    message = user_error("name=localhost/x", "layer=-0")
    assert "layer='-0' is ambiguous: use 0 for the base layer or -1 for the top layer" in message


def test_empty_layer_is_refused():
    assert "layer='': expected an integer" in user_error("name=localhost/x", "layer=")


def test_pull_policy_lists_the_choices():
    message = user_error("name=localhost/x", "pull=sometimes")
    assert "pull='sometimes': expected one of missing, always, never" in message


@pytest.mark.parametrize("key, value", [("tls-verify", "maybe"), ("copy", "perhaps")])
def test_boolean_parameter_expects_true_or_false(key, value):
    message = user_error("name=localhost/x", f"{key}={value}")
    assert f"{key}='{value}': expected true or false" in message


def test_verify_lists_its_choices():
    message = user_error("name=localhost/x", "verify=perhaps")
    assert "verify='perhaps': expected true, before or false" in message


def test_platform_must_be_os_slash_arch():
    message = user_error("name=localhost/x", "platform=linux")
    assert "platform='linux': expected OS/ARCH[/VARIANT]" in message


def test_empty_name_is_refused():
    assert "name= is empty: expected an image such as" in user_error("name=")


def test_name_starting_with_dash_never_reaches_podman(fake_podman):
    directory, record = fake_podman
    record.unlink(missing_ok=True)
    path = f"{directory}:{os.environ['PATH']}"
    result = run_nbdkit("name=--version", env=dict(os.environ, PATH=path))
    assert result.returncode != 0
    assert "name='--version': an image name cannot start with '-'" in result.stderr
    assert not record.exists(), f"podman was run: {record.read_text()}"


@pytest.mark.parametrize("name", ["quay.io/a\nb", "quay.io/a b"], ids=["newline", "space"])
def test_name_with_space_or_control_character_is_refused(name):
    message = user_error(f"name={name}")
    assert f"name={name!r}: an image name cannot contain spaces or control characters" in message


def test_unknown_parameter_lists_the_known_ones():
    message = user_error("name=localhost/x", "colour=blue")
    assert (
        "unknown parameter 'colour': this plugin takes name=, layer=, pull=, "
        "tls-verify=, authfile=, cert-dir=, platform=, verify="
    ) in message
    assert message.endswith("; see nbdkit-cdipy-plugin(1)")


def test_missing_authfile_is_named():
    message = user_error("name=localhost/x", "authfile=/nonexistent")
    assert "authfile='/nonexistent': no such file" in message


def test_missing_cert_dir_is_named():
    message = user_error("name=localhost/x", "cert-dir=/nonexistent")
    assert "cert-dir='/nonexistent': no such directory" in message


def test_missing_name_says_how_to_pass_it():
    message = user_error("layer=1")
    assert "config_complete: error: you must supply name=IMAGE after the script name" in message
    assert message.endswith("; see nbdkit-cdipy-plugin(1)")


def test_pull_never_refuses_a_file_transport():
    message = user_error("name=oci-archive:/nonexistent.tar", "pull=never")
    assert (
        "pull=never cannot be used with oci-archive:/nonexistent.tar: "
        "that transport is always read anew"
    ) in message


# ----------------------------------------------------------------- podman


def test_missing_podman_says_install_podman(scratch):
    empty = os.path.join(scratch, "empty")
    os.mkdir(empty)
    result = run_nbdkit("name=localhost/cdi-test/three:1", env=dict(os.environ, PATH=empty))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "podman: command not found (install podman)" in result.stderr


def test_image_missing_from_registry_quotes_podman(lab):
    name = f"{lab.registry}/cdi-test/nope:1"
    message = user_error(f"name={name}")
    assert f"{name}: pull: image not found (podman exit status" in message
    assert "Error:" in message
    assert "manifest unknown" in message


def test_closed_port_says_registry_unreachable():
    port = free_port()
    message = user_error(f"name=127.0.0.1:{port}/cdi-test/three:1", "tls-verify=false")
    assert message.endswith(f"127.0.0.1:{port}/cdi-test/three:1: not in the cache "
                            f"{os.environ['XDG_CACHE_HOME']}/cdi-py, and its registry "
                            f"127.0.0.1:{port} is unreachable: Connection refused"), message


def test_closed_port_pulled_by_podman_says_registry_unreachable():
    port = free_port()
    message = user_error(f"name=127.0.0.1:{port}/cdi-test/three:1", "tls-verify=false",
                         "pull-into=podman")
    assert f"pull: registry 127.0.0.1:{port} unreachable" in message


def test_plain_http_registry_suggests_tls_verify_false(lab, three):
    # "localhost:PORT" is the lab's registry, but not among those that
    # registries.conf allows without TLS.
    port = lab.registry.rsplit(":", 1)[1]
    message = user_error(f"name=localhost:{port}/cdi-test/three:1")
    assert (f"pull: registry localhost:{port} speaks plain HTTP, not HTTPS: pass "
            "tls-verify=false if you trust it (podman exit status 125: Error: ") in message
    assert "server gave HTTP response to HTTPS client" in message


@pytest.fixture
def auth_image(lab, three):
    """THREE in the registry that wants a password; the name to pull."""
    name = f"{lab.auth_registry}/cdi-test/three:1"
    lab.push(three, name, authfile=lab.authfile)
    yield name
    # The pulled image is THREE's, which the session keeps: drop only the tag.
    podman("untag", three.id, name, check=False)


def test_registry_wanting_a_password_says_authentication_required(lab, auth_image):
    message = user_error(f"name={auth_image}")
    assert (
        f"pull: authentication required by {lab.auth_registry}: "
        "run podman login or pass authfile=PATH"
    ) in message


def test_authfile_lets_the_pull_through(lab, three, auth_image):
    data = read_export(f"name={auth_image}", f"authfile={lab.authfile}", "pull=always")
    assert sha256(data) == three.diff_ids[0]


def test_short_name_needs_search_registries():
    message = user_error("name=nosuchshortname")
    assert "pull: short name with no search registries configured" in message


@pytest.mark.parametrize("layer", ["3", "-4"])
def test_layer_out_of_range_says_how_many_layers(three, layer):
    message = user_error(f"name={three.name}", f"layer={layer}")
    assert (
        f"layer={layer} is out of range: the image has 3 layers (allowed: 0..2 or -3..-1)"
    ) in message


# ---------------------------------------------------------------- TMPDIR


def test_missing_tmpdir_is_named(three, scratch):
    missing = os.path.join(scratch, "missing")
    message = user_error(f"name={three.name}", env=dict(os.environ, TMPDIR=missing))
    assert (
        f"TMPDIR={missing} is not usable for temporary files: No such file or directory"
    ) in message


def test_full_tmpdir_says_no_space_left(lab, scratch):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    image = lab.build("localhost/cdi-test/big:1", [{"big.bin": os.urandom(3 << 20)}])
    small = os.path.join(scratch, "small")
    os.mkdir(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], check=True)
    try:
        message = user_error(f"name={image.name}", "copy=true",
                             env=dict(os.environ, TMPDIR=small))
        assert f"no space left on device in TMPDIR={small}" in message
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", small], check=True)
        podman("rmi", "--force", image.name, check=False)


# ---------------------------------------------------------------- verify

# podman, except that "save" changes "known" to "KNOWN" in what it outputs:
# a podman whose layer does not hash to its diffID.  Corrupting podman's
# storage cannot show this: podman checks the layer itself and fails.
LYING_PODMAN = """#!/usr/bin/python3
import io, os, subprocess, sys, tarfile
REAL = {real!r}
if sys.argv[1:2] != ["save"]:
    os.execv(REAL, [REAL] + sys.argv[1:])
save = subprocess.Popen([REAL] + sys.argv[1:], stdout=subprocess.PIPE)
with tarfile.open(fileobj=save.stdout, mode="r|") as source, \\
        tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as target:
    for member in source:
        data = None
        if member.isfile():
            data = io.BytesIO(source.extractfile(member).read().replace(b"known", b"KNOWN"))
        target.addfile(member, data)
sys.exit(save.wait())
"""


@pytest.fixture
def known_image(lab):
    """A one-layer image holding a file of known content."""
    image = lab.build("localhost/cdi-test/known:1", [{"data/known.bin": b"known content\n" * 1000}])
    yield image
    podman("rmi", "--force", image.name, check=False)


@pytest.fixture
def lying_podman(scratch, monkeypatch):
    """LYING_PODMAN first in PATH, for nbdkit and the plugin."""
    path = os.path.join(scratch, "podman")
    with open(path, "w") as script:
        script.write(LYING_PODMAN.format(real=shutil.which("podman")))
    os.chmod(path, 0o755)
    monkeypatch.setenv("PATH", f"{scratch}:{os.environ['PATH']}")


def test_layer_corrupted_in_storage_is_refused_by_podman(known_image):
    diff_dir = podman(
        "image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", known_image.name
    ).strip()
    with open(os.path.join(diff_dir, "data/known.bin"), "r+b") as stored:
        stored.write(b"KNOWN")
    message = user_error(f"name={known_image.name}", "copy=true")
    assert f"{known_image.name}: save: the layer in local storage does not match its digest" \
        in message
    assert 'file integrity checksum failed for "data/known.bin"' in message


def test_layer_not_matching_its_diff_id_is_refused(known_image, lying_podman):
    message = user_error(f"name={known_image.name}", "copy=true")
    assert f"{known_image.name}: verify: the layer's content hashes to sha256:" in message
    assert (
        f"but the image says {known_image.diff_ids[0]}; refusing to serve it "
        "(verify=false skips this check)"
    ) in message


def test_verify_false_serves_a_layer_not_matching_its_diff_id(known_image, lying_podman):
    data = read_export(f"name={known_image.name}", "copy=true", "verify=false")
    assert sha256(data) != known_image.diff_ids[0]
    assert b"KNOWN content\n" * 1000 in data


def test_a_docker_daemon_name_goes_to_podman_and_fails_in_one_line():
    # No docker daemon here: podman's own error, never a traceback.
    message = nbdkit_error("name=docker-daemon:cdi-test/absent:1")
    assert "Traceback" not in message
    assert message.startswith(f"nbdkit: error: {CDI}: get_ready: error: "
                              "docker-daemon:cdi-test/absent:1: pull: "), message


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_a_missing_archive_is_one_line_and_leaves_nothing_in_var_tmp(transport):
    # skopeo 1.9 unpacks an oci-archive in /var/tmp, not TMPDIR, and left an
    # empty directory there when the archive could not be read.
    before = set(os.listdir("/var/tmp"))
    message = nbdkit_error(f"name={transport}:/nonexistent-cdi-test.tar")
    assert message.startswith(f"nbdkit: error: {CDI}: get_ready: error: {transport}:"
                              "/nonexistent-cdi-test.tar: copy with skopeo: file not found "
                              "(skopeo exit status 1: "), message
    if transport == "oci-archive":
        assert message.endswith(words_of("skopeo", {
            "1.9": ": creating temp directory: open /nonexistent-cdi-test.tar: "
                   "no such file or directory)\n",
            "1.18": ': creating temp directory: archive file not found: '
                    '"/nonexistent-cdi-test.tar")\n'})), message
    else:
        assert message.endswith("open /nonexistent-cdi-test.tar: no such file or directory)\n")
    assert set(os.listdir("/var/tmp")) - before == set()
