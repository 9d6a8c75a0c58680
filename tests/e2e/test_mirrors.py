"""registries.conf's mirrors, blocked registries and credential helpers in
cdi.py's own reads: an artifact read lazily and a gzip containerdisk
streamed through a pull-through cache (the real Distribution in proxy
mode) with the primary unreachable, the mirror down and the primary up,
pull-from-mirror, a blocked registry, credentials from a helper (an auth
file's, and registries.conf's credential-helpers), and a
mirror killed mid-blob with the rest read from the primary; and a cold
pull-through cache, which answers ranges with the whole blob, read from
once, and a registry that ignores Range, read lazily all the same.

Each test writes a registries.conf of its own and passes it to the plugin
in CONTAINERS_REGISTRIES_CONF; the primary named "unreachable" is a port
nothing listens on, so the mirror is the only way.
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import copy_export, nbdkit_error, run_nbdkit
from httplab import Proxy
from lab import (
    MIB,
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    Blob,
    free_port,
    podman,
    push_artifact,
    push_raw_disk,
    registry,
    sha256,
    wait_for,
)

ORAS_LAYER = "application/vnd.oci.image.layer.v1.tar"
SIZE = 8 * MIB

@pytest.fixture(scope="module")
def pull_through(lab):
    """The address of a Distribution in proxy mode: a pull-through cache
    of the lab's open registry."""
    with registry(lab.workdir, f"pull-through-{os.urandom(3).hex()}",
                  proxy_of=lab.registry) as running:
        yield running.address


@pytest.fixture(scope="module")
def artifact(lab):
    """(repository:tag in the open registry, the disk's bytes): an ORAS
    artifact of one raw disk."""
    return push_raw_disk(lab, "mirrored", SIZE)


@pytest.fixture(scope="module")
def containerdisk(lab):
    """(repository:tag in the open registry, the disk's bytes): a
    containerdisk of one gzip layer, disk/disk.img, gone from podman's
    storage."""
    data = os.urandom(SIZE // 2) + bytes(SIZE // 2)
    image = lab.build(f"localhost/cdi-test/mirrored-cd-{os.urandom(4).hex()}:1",
                      [{"disk/disk.img": data}])
    name = f"cdi-test/mirrored-cd-{os.urandom(4).hex()}:1"
    lab.push(image, f"{lab.registry}/{name}")
    podman("rmi", "--force", image.id)
    return name, data


@pytest.fixture
def unreachable():
    """host:port of a registry that is not there."""
    return f"127.0.0.1:{free_port()}"


def conf(tmp_path, text):
    """The environment of a plugin reading registries.conf TEXT."""
    path = tmp_path / "registries.conf"
    path.write_text("unqualified-search-registries = []\n" + text)
    return dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(path))


def mirrored(primary, *mirrors, primary_insecure=False, how=""):
    """registries.conf's entry for PRIMARY with MIRRORS (plain HTTP)."""
    text = f'[[registry]]\nlocation = "{primary}"\ninsecure = {str(primary_insecure).lower()}\n'
    for mirror in mirrors:
        text += f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
        text += f'pull-from-mirror = "{how}"\n' if how else ""
    return text


def disk_digest(name, cache, env, *more):
    """(the hex digest of NAME's disk export, read whole, the server's log)."""
    copy = copy_export(f"name={name}", f"cache={cache}", "layer=disk", *more, env=env,
                       verbose=True)
    return copy.digest[len("sha256:"):], copy.stderr


# --------------------------------------------------- air-gapped: the mirror alone

def test_an_artifact_is_read_lazily_through_a_pull_through_cache(
        artifact, pull_through, unreachable, cache, tmp_path):
    name, data = artifact
    env = conf(tmp_path, mirrored(unreachable, pull_through))
    digest, log = disk_digest(f"{unreachable}/{name}", cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert f"from {unreachable} as it is read" in log, log
    assert "skopeo" not in log and "podman pull" not in log


def test_a_containerdisk_streams_through_a_pull_through_cache(
        containerdisk, pull_through, unreachable, cache, tmp_path):
    name, data = containerdisk
    env = conf(tmp_path, mirrored(unreachable, pull_through))
    digest, log = disk_digest(f"{unreachable}/{name}", cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert f"streamed from {unreachable} into the cache" in log, log
    assert "podman pull" not in log


def test_a_cold_pull_through_cache_is_read_once(lab, unreachable, cache, tmp_path):
    name, data = push_raw_disk(lab, "cold", SIZE)
    # Proxies count what the cache fetches from its upstream, the lab's
    # registry, and what the node fetches from the cache.
    with Proxy(lab.registry) as upstream, \
            registry(lab.workdir, f"cold-pull-through-{os.urandom(3).hex()}",
                     proxy_of=upstream.address) as pull_through, \
            Proxy(pull_through.address) as node:
        # A second to fill the cache: the node's first ranges find it cold
        # (on a fast machine it may otherwise hold the blob by then).
        upstream.rate = SIZE
        env = conf(tmp_path, mirrored(unreachable, node.address))
        offset = 5 * MIB + 12345
        copied = tmp_path / "disk.img"
        result = run_nbdkit(
            f"name={unreachable}/{name}", f"cache={cache}", "layer=disk", env=env,
            verbose=True,
            run=f'{sys.executable} -m nbd -u "$uri" -c "print(h.pread(4096, {offset}).hex())" '
                f'&& nbdcopy "$uri" {copied}')
        assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == data[offset:offset + 4096].hex()
    assert sha256(copied.read_bytes()) == sha256(data)
    assert "sends the whole of " in result.stderr, result.stderr
    # One answer brought the whole disk; a second fetch of it would double
    # this.  The range probe's own whole answer is closed unread: what was
    # in flight (1.008 times the blob in all, seen here, on both releases).
    assert node.blob_bytes < 1.25 * SIZE, \
        f"the node fetched {node.blob_bytes} bytes of a {SIZE}-byte blob"
    # Distribution 2.8 fetches a blob it does not hold twice for each
    # request that misses (once to store it, once for the answer), the
    # probe's too: 2.2 to 3 times the blob seen here, never once.  What
    # cdi.py controls is how many requests it sends while the cache is
    # cold: at most two of them whole upstream each.
    assert upstream.blob_bytes <= 2 * node.blob_requests * SIZE, \
        (f"the upstream sent {upstream.blob_bytes} bytes of a {SIZE}-byte blob for "
         f"{node.blob_requests} requests")


def test_a_registry_that_ignores_range_is_read_lazily_all_the_same(lab, artifact, cache,
                                                                   tmp_path):
    name, data = artifact
    with Proxy(lab.registry) as never_ranges:
        never_ranges.ignore_range = True
        never_ranges.rate = 4 * SIZE  # what the probe's answer carries before it is closed
        env = conf(tmp_path, mirrored(never_ranges.address, primary_insecure=True))
        digest, log = disk_digest(f"{never_ranges.address}/{name}", cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert "answers a range with the whole blob" in log, log
    assert f"from {never_ranges.address} as it is read" in log, log
    assert "sends the whole of " in log and "skopeo" not in log, log
    # The probe's answer is closed unread; one answer brings the disk
    # (1.008 times the blob in all, seen here).
    assert never_ranges.blob_bytes < 1.25 * SIZE, \
        f"{never_ranges.blob_bytes} bytes fetched of a {SIZE}-byte blob"


# ---------------------------------------------------------- order, and failures

def test_the_mirror_down_the_primary_answers(lab, artifact, unreachable, cache, tmp_path):
    name, data = artifact
    env = conf(tmp_path, mirrored(lab.registry, unreachable, primary_insecure=True))
    digest, log = disk_digest(f"{lab.registry}/{name}", cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert f"{unreachable}/{name} failed: " in log, log


def test_every_source_failing_names_each(lab, artifact, cache, tmp_path):
    name = artifact[0]
    mirror, primary = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = conf(tmp_path, mirrored(primary, mirror))
    message = nbdkit_error(f"name={primary}/{name}", f"cache={cache}", env=env)
    tag = name.split(":")[1]
    assert f"error: {primary}/{name}: manifest {tag}: every source failed: " \
           f"[{mirror}/{name}: " in message, message
    assert f"]; [{primary}/{name}: " in message, message
    assert "podman" not in message


def test_a_blocked_registry_is_refused_as_podman_refuses_it(lab, artifact, unreachable, cache,
                                                            tmp_path):
    name = artifact[0]
    env = conf(tmp_path, f'[[registry]]\nlocation = "{unreachable}"\nblocked = true\n')
    message = nbdkit_error(f"name={unreachable}/{name}", f"cache={cache}", env=env)
    drop_ins = os.path.expanduser("~/.config/containers/registries.conf.d")
    assert f"error: {unreachable}/{name}: manifest 1: registry {unreachable} is blocked in " \
           f"{tmp_path}/registries.conf or {drop_ins}\n" in message, message


def test_a_name_spelled_around_a_blocked_prefix_is_refused(lab, artifact, cache, tmp_path):
    # Matched on the raw name, "open/../cdi-test/..." misses the blocked
    # prefix, and requests resolves its URL's ".." to the blocked
    # repository.  pull=always: podman's lookup in local storage would
    # refuse the name first.
    name = artifact[0]
    env = conf(tmp_path, f'[[registry]]\nlocation = "{lab.registry}/cdi-test"\n'
                         "blocked = true\n")
    spelled = f"{lab.registry}/open/../{name}"
    message = nbdkit_error(f"name={spelled}", f"cache={cache}", "pull=always", env=env)
    assert f"error: {spelled}: invalid reference format (a registry, a repository of " \
           "lower-case names, and a tag or a digest)\n" in message, message


@pytest.mark.parametrize("by_digest", [False, True])
def test_a_digest_only_mirror_serves_digests_alone(lab, artifact, cache, tmp_path, by_digest):
    name, data = artifact
    reference = name
    if by_digest:
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{lab.registry}/{name}"],
                             check=True, capture_output=True).stdout
        reference = f"{name.split(':')[0]}@{sha256(raw)}"
    with Proxy(lab.registry) as mirror:
        env = conf(tmp_path, mirrored(lab.registry, mirror.address, primary_insecure=True,
                                      how="digest-only"))
        digest, _ = disk_digest(f"{lab.registry}/{reference}", cache, env)
        assert digest == sha256(data)[len("sha256:"):]
        assert (mirror.blob_requests > 0) is by_digest


def test_a_mirror_killed_mid_blob_the_rest_comes_from_the_primary(lab, containerdisk, cache,
                                                                  tmp_path):
    name, data = containerdisk
    with Proxy(lab.registry) as mirror:
        mirror.rate = 2 * MIB
        env = conf(tmp_path, mirrored(lab.registry, mirror.address, primary_insecure=True))

        def kill_mirror():
            wait_for(lambda: mirror.blob_bytes > 1 * MIB, 60, "the blob never began")
            mirror.stop()
        killer = threading.Thread(target=kill_mirror)
        killer.start()
        try:
            digest, log = disk_digest(f"{lab.registry}/{name}", cache, env)
        finally:
            killer.join()
    assert digest == sha256(data)[len("sha256:"):]
    assert f"continuing from {lab.registry}/{name}: every byte is checked" in log, log


# ------------------------------------------------------------ credential helpers

def private_artifact(lab, tmp_path):
    """(name in the password registry, its bytes): an ORAS artifact of one
    raw disk of a MiB."""
    data = os.urandom(MIB)
    path = tmp_path / "private.img"
    path.write_bytes(data)
    name = f"{lab.auth_registry}/cdi-test/helped-{os.urandom(4).hex()}:1"
    push_artifact(lab.workdir, name, [Blob(ORAS_LAYER, path, "disk.img")],
                  authfile=lab.authfile)
    path.unlink()
    return name, data


def helpers_on_path(lab, tmp_path):
    """The environment's PATH with docker-credential-cditest first, which
    gives the password registry's credentials when asked for its host,
    and docker-credential-empty, which holds none."""
    helpers = tmp_path / "bin"
    helpers.mkdir()
    answer = json.dumps({"ServerURL": lab.auth_registry, "Username": REGISTRY_USER,
                         "Secret": REGISTRY_PASSWORD})
    for name, script in (
            ("cditest", f'[ "$1" = get ] && [ "$(cat)" = "{lab.auth_registry}" ] '
                        f"|| {{ echo 'asked for something else' >&2; exit 1; }}\n"
                        f"echo '{answer}'\n"),
            ("empty", "echo 'credentials not found in native keychain'; exit 1\n")):
        helper = helpers / f"docker-credential-{name}"
        helper.write_text(f"#!/bin/sh\n{script}")
        helper.chmod(0o755)
    return f"{helpers}:{os.environ['PATH']}"


def test_credentials_come_from_a_credential_helper(lab, cache, tmp_path):
    name, data = private_artifact(lab, tmp_path)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"credHelpers": {lab.auth_registry: "cditest"}}))
    env = dict(os.environ, PATH=helpers_on_path(lab, tmp_path), REGISTRY_AUTH_FILE=str(auth))
    digest, log = disk_digest(name, cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert "credentials for " + lab.auth_registry + " from docker-credential-cditest" in log
    assert "as it is read" in log


def test_credentials_come_from_registries_confs_credential_helpers(lab, cache, tmp_path):
    # No auth file is read: the list names none (containers-auth.json).
    name, data = private_artifact(lab, tmp_path)
    env = dict(conf(tmp_path, 'credential-helpers = ["empty", "cditest"]\n'
                    + mirrored(lab.auth_registry, primary_insecure=True)),
               PATH=helpers_on_path(lab, tmp_path), REGISTRY_AUTH_FILE=lab.authfile)
    digest, log = disk_digest(name, cache, env)
    assert digest == sha256(data)[len("sha256:"):]
    assert f"docker-credential-empty holds no credentials for {lab.auth_registry}" in log, log
    assert "credentials for " + lab.auth_registry + " from docker-credential-cditest" in log
    assert "as it is read" in log
