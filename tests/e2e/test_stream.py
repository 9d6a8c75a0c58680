"""A containerdisk served while its gzip layer streams in from the
registry: the disk export ready once the disk's header has arrived, the
layer decompressed into the cache as it comes, checked against the blob's
digest and the layer's diffID once whole, then served warm; podman's
storage untouched.

The registry is the real Distribution, the images pushed to it by podman
(gzip layers).  Between it and the plugin a proxy (httplab.Proxy) counts
the blob bytes sent and, where a test says, sends them slowly, flips a
byte or cuts a response short: faults a real registry cannot be made to
show.
"""

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (
    assert_every_read_fails,
    copy_export,
    nbdkit_error,
    params,
    read,
    run_nbdkit,
    serve,
    sha256,
)
from httplab import Proxy
from lab import MIB, export_digest, podman, wait_for

SIZE = 24 * MIB
KEPT = "is whole in the cache"


def random_disk(size):
    """SIZE bytes that gzip cannot shrink, with a recognisable start."""
    return b"DISK" + os.urandom(size - 4)


@pytest.fixture(scope="module")
def containerdisk(lab):
    """(name in the open registry, the disk's bytes, the layer's diffID, the
    layer's blob digest): a containerdisk FROM scratch, disk/disk.img its
    only file, pushed by podman (one gzip layer) and gone from podman's
    storage."""
    data = random_disk(SIZE)
    name, diff_ids = push(lab, "stream", [{"disk/disk.img": data}])
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{lab.registry}/{name}"],
        check=True, capture_output=True, text=True).stdout)
    layer = manifest["layers"][0]
    assert layer["mediaType"].endswith("gzip"), layer
    return name, data, diff_ids[0], layer["digest"]


def push(lab, what, layers):
    """(the name in the open registry, the diffIDs) of an image of LAYERS
    (as lab.build takes them), pushed by podman, gone from its storage."""
    image = lab.build(f"localhost/cdi-test/{what}-{os.urandom(4).hex()}:1", layers)
    name = f"cdi-test/{what}-{os.urandom(4).hex()}:1"
    lab.push(image, f"{lab.registry}/{name}")
    podman("rmi", "--force", image.id)
    return name, image.diff_ids


def stored_images():
    return podman("images", "--all", "--quiet", "--no-trunc").split()


def unpacked_files(cache):
    directory = Path(cache, "unpacked")
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------- cold

def test_a_cold_containerdisk_is_served_before_its_layer_arrives(lab, containerdisk, proxy,
                                                                 cache):
    name, data, _, _ = containerdisk
    before = stored_images()
    proxy.rate = 4 * MIB  # six seconds for the layer
    with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
        assert proxy.blob_bytes < SIZE // 2, "more than half the layer before ready"
        assert read(server, 0, 4096) == data[:4096]
        assert proxy.blob_bytes < SIZE // 2, "the layer arrived before the first read"
        assert export_digest(server.uri("disk")) == sha256(data)
        wait_for(lambda: KEPT in server.log(), 30, lambda: f"never whole: {server.log()}")
        log = server.log()
    assert "streamed from" in log and "matches its digests" in log
    assert stored_images() == before, "podman's storage changed"
    assert proxy.blob_bytes <= SIZE * 1.01 + 64 * 1024, "more than the layer once"
    assert [name for name in unpacked_files(cache) if name.startswith("sha256-")] != []
    assert not [name for name in unpacked_files(cache) if name.startswith(".partial-")]


def test_the_layer_export_is_the_layer_byte_exact(lab, containerdisk, proxy, cache):
    name, _, diff_id, _ = containerdisk
    result = copy_export(*params(proxy, name, cache, "layer=0"))
    assert result.digest == diff_id


def test_a_warm_start_needs_no_registry(lab, containerdisk, cache):
    name, data, _, _ = containerdisk
    with Proxy(lab.registry) as proxy:
        with serve(lab, *params(proxy, name, cache), verbose=True) as server:
            assert read(server, 0, 4096) == data[:4096]
            wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
        address = proxy.address
    # The proxy is gone: the registry at ADDRESS answers no more.
    result = copy_export(f"name={address}/{name}", f"cache={cache}", "tls-verify=false",
                         "layer=disk", verbose=True)
    assert result.digest == sha256(data)
    assert f"using the artifact {address}/{name} from the cache" in result.stderr
    assert "passed its check before, unchanged since" in result.stderr


def test_pull_into_podman_pulls_it_into_podmans_storage(lab, containerdisk, cache):
    name, data, _, _ = containerdisk
    remote = f"{lab.registry}/{name}"
    try:
        result = copy_export(f"name={remote}", f"cache={cache}", "tls-verify=false",
                             "pull-into=podman", "layer=disk")
        assert result.digest == sha256(data)
        podman("image", "exists", remote)  # fails unless podman pulled it
    finally:
        podman("rmi", "--force", remote, check=False)
    assert unpacked_files(cache) == []


def test_pull_into_takes_cache_or_podman():
    stderr = nbdkit_error("name=localhost/x", "pull-into=storage")
    assert "pull-into='storage': expected one of cache, podman" in stderr


# ----------------------------------------------------------------- faults

def test_a_response_cut_short_is_resumed_where_it_broke_off(lab, containerdisk, proxy, cache):
    name, data, _, layer = containerdisk
    proxy.cut, proxy.aim = True, layer
    result = copy_export(*params(proxy, name, cache, "layer=disk"), verbose=True)
    assert result.digest == sha256(data)
    assert "trying again in" in result.stderr
    assert proxy.blob_bytes <= SIZE * 1.01 + 64 * 1024, "fetched from the start again"


def test_a_flipped_byte_fails_every_read_once_whole_and_the_next_start_streams_anew(
        lab, containerdisk, proxy, cache):
    name, data, _, layer = containerdisk
    # A byte in the middle of the layer, which the stream takes in with no
    # client reading.  (What a client reads before the check is served as
    # it arrived: README, verify=.)
    proxy.flip, proxy.aim = True, layer
    refused = ("is not a valid gzip stream", "refusing to serve it")
    with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
        wait_for(lambda: any(words in server.log() for words in refused), 60, server.log)
        assert_every_read_fails(server, SIZE, MIB)
    assert not [name for name in unpacked_files(cache) if name.startswith("sha256-")], \
        "a layer that failed its check was kept"
    result = copy_export(*params(proxy, name, cache, "layer=disk"))
    assert result.digest == sha256(data)


def test_the_registry_gone_mid_stream_keeps_serving_what_arrived(lab, containerdisk, cache):
    name, data, _, _ = containerdisk
    with Proxy(lab.registry) as proxy:
        proxy.rate = 4 * MIB
        with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
            assert read(server, 0, 4096) == data[:4096]
            proxy.stop()
            assert read(server, 100, 4096) == data[100:4196]  # it has arrived
            started = time.monotonic()
            handle = server.connect("disk")
            try:
                with pytest.raises(Exception, match="Input/output error"):
                    handle.pread(4096, SIZE - 4096)
            finally:
                handle.shutdown()
            assert time.monotonic() - started < 90
            log = server.log()
    assert "trying again in" in log
    assert not [name for name in unpacked_files(cache) if name.startswith("sha256-")]


def test_sigkill_leaves_nothing_named_whole_and_the_next_start_serves(lab, containerdisk,
                                                                     proxy, cache):
    name, data, _, _ = containerdisk
    proxy.rate = 4 * MIB
    with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
        assert read(server, 0, 4096) == data[:4096]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    assert not [name for name in unpacked_files(cache)
                if name.startswith(("sha256-", ".partial-"))], \
        "a layer named whole, or a partial file left, after SIGKILL"
    proxy.rate = None
    result = copy_export(*params(proxy, name, cache, "layer=disk"))
    assert result.digest == sha256(data)


def test_a_full_cache_is_a_clear_error(lab, containerdisk, proxy):
    name, _, _, _ = containerdisk
    cache = Path(tempfile.mkdtemp(prefix="full-cache-", dir=lab.workdir))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        result = run_nbdkit(*params(proxy, name, str(cache), "layer=disk"),
                            run='nbdcopy "$uri" - >/dev/null')
    finally:
        subprocess.run(["umount", str(cache)], check=True)
        cache.rmdir()
    assert result.returncode != 0
    assert "cannot keep layer 0 (sha256:" in result.stderr
    assert "in the cache: No space left on device" in result.stderr


def test_a_zstd_containerdisk_streams_too(lab, proxy, cache):
    data = random_disk(4 * MIB)
    image = lab.build(f"localhost/cdi-test/zstd-{os.urandom(4).hex()}:1",
                      [{"disk/disk.img": data}])
    name = f"cdi-test/zstd-{os.urandom(4).hex()}:1"
    podman("push", "--quiet", "--compression-format=zstd", image.name,
           f"docker://{lab.registry}/{name}")
    podman("rmi", "--force", image.id)
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{lab.registry}/{name}"],
        check=True, capture_output=True, text=True).stdout)
    assert manifest["layers"][0]["mediaType"].endswith("+zstd"), manifest
    result = copy_export(*params(proxy, name, cache, "layer=disk"), verbose=True)
    assert result.digest == sha256(data)
    assert "streamed from" in result.stderr


# ---------------------------------------------------------- which disk

def test_a_derived_containerdisk_serves_its_own_disk(lab, containerdisk, proxy, cache):
    name, _, _, _ = containerdisk
    data = random_disk(4 * MIB)
    derived, _ = push(lab, "derived", [{"disk/disk.img": random_disk(MIB)},
                                    {"disk/disk.img": data}, {"etc/motd": b"hello\n"}])
    result = copy_export(*params(proxy, derived, cache, "layer=disk"), verbose=True)
    assert result.digest == sha256(data)
    assert "disk/disk.img of layer 1" in result.stderr


def test_a_second_disk_after_the_one_served_fails_it(lab, proxy, cache):
    two, _ = push(lab, "two", [{"disk/a.img": random_disk(4 * MIB),
                             "disk/b.img": random_disk(4 * MIB)}])
    ambiguous = "2 candidate VM disks: disk/a.img (layer 0), disk/b.img (layer 0)"
    with serve(lab, *params(proxy, two, cache, "layer=disk"), verbose=True) as server:
        wait_for(lambda: ambiguous in server.log(), 60, server.log)
        handle = server.connect("disk")
        try:
            with pytest.raises(Exception, match="Input/output error"):
                handle.pread(4096, 0)
        finally:
            handle.shutdown()
    assert "learnt after disk/a.img was served" in server.log()
    assert ambiguous in nbdkit_error(*params(proxy, two, cache, "layer=disk"))
