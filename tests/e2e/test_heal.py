"""The cache heals whole: whatever small file of it is damaged, truncated,
empty or missing (the layout's index.json, the manifest and config blobs,
the check records, the unpacked layers' records), the next start with the
registry up serves byte-exact and leaves the cache such that a start with
the registry stopped serves again.  Offline and not in the cache at all,
one line says so."""

import os
from pathlib import Path

import pytest

from conftest import nbdkit_error, params, run_nbdkit, serve, sha256
from lab import MIB, Blob, export_digest, podman, push_artifact, wait_for

KEPT = "is whole in the cache"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
SMALL = 64 << 10


@pytest.fixture(scope="module")
def data():
    return b"DISK" + os.urandom(4 * MIB - 4)


@pytest.fixture(scope="module")
def shapes(lab, data):
    """{shape: (its name in the open registry, its disk)}: an ORAS artifact,
    and a containerdisk (one gzip layer) that is streamed into the cache."""
    artifact = "cdi-test/heal-artifact:1"
    push_artifact(lab.workdir, f"{lab.registry}/{artifact}", [Blob(LAYER_TAR, data, "disk.img")])
    image = lab.build(f"localhost/cdi-test/heal-{os.urandom(4).hex()}:1",
                      [{"disk/disk.img": data}])
    containerdisk = "cdi-test/heal-containerdisk:1"
    lab.push(image, f"{lab.registry}/{containerdisk}")
    podman("rmi", "--force", image.id)
    return {"artifact": (artifact, data), "containerdisk": (containerdisk, data)}


def serve_whole(lab, proxy, name, cache, *, kept):
    """The digest of the disk export, read whole; with KEPT, wait until the
    image is whole in the cache."""
    with serve(lab, *params(proxy, name, cache), "layer=disk", verbose=True) as server:
        digest = export_digest(server.uri())
        if kept:
            wait_for(lambda: KEPT in server.log(), 60,
                     lambda: f"not kept whole in the cache:\n{server.log()}")
    return digest


def small_files(cache):
    return sorted(path for path in Path(cache).rglob("*")
                  if path.is_file() and path.stat().st_size < SMALL
                  and not path.name.endswith(".lock"))


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:  # garbage at its start
        content = path.read_bytes()
        path.write_bytes(b"\x00garbage{" + content[9:])


@pytest.mark.parametrize("case", [(shape, how) for shape in ("artifact", "containerdisk")
                                  for how in ("garbage", "truncated", "empty", "missing")],
                         ids="-".join)
def test_a_damaged_cache_heals_whole(lab, shapes, proxy, cache, case):
    shape, how = case
    name, data = shapes[shape]
    assert serve_whole(lab, proxy, name, cache, kept=True) == sha256(data)
    damaged = small_files(cache)
    names = {path.name for path in damaged}
    assert "index.json" in names, f"nothing to damage: {damaged}"
    for path in damaged:
        damage(path, how)
    assert serve_whole(lab, proxy, name, cache, kept=True) == sha256(data)
    proxy.stop()
    assert serve_whole(lab, proxy, name, cache, kept=False) == sha256(data)


def test_offline_and_not_in_the_cache_says_so(lab, shapes, proxy, cache):
    name, _ = shapes["artifact"]
    proxy.stop()
    error = nbdkit_error(*params(proxy, name, cache))
    assert (f"{proxy.address}/{name}: not in the cache {cache}, and its registry "
            f"{proxy.address} is unreachable: ") in error
    assert "podman" not in error


def test_a_whole_copy_then_exit_leaves_the_cache_warm(lab, data, proxy, cache, tmp_path):
    # The server stops as soon as the copy ends, before the rest of the
    # layer (a file after the disk) has arrived over the slowed link: it
    # takes in that little first.
    image = lab.build(f"localhost/cdi-test/heal-{os.urandom(4).hex()}:1",
                      [{"disk/disk.img": data, "zz/after": os.urandom(MIB)}])
    name = "cdi-test/heal-trailed:1"
    lab.push(image, f"{lab.registry}/{name}")
    podman("rmi", "--force", image.id)
    proxy.rate = 8 * MIB
    copied = tmp_path / "disk.img"
    result = run_nbdkit(*params(proxy, name, cache), "layer=disk", verbose=True,
                        run=f'nbdcopy "$uri" {copied}')
    assert result.returncode == 0, result.stderr
    assert "taken in to its end as the server stops" in result.stderr, \
        "the layer had arrived before the server stopped: nothing shown"
    assert sha256(copied.read_bytes()) == sha256(data)
    proxy.stop()
    assert serve_whole(lab, proxy, name, cache, kept=False) == sha256(data)
