"""OCI artifacts (ORAS disks, KubeVirt VM exports), and the disk export, for
every shape a VM disk ships in: pulled into podman's artifact store and
served in place from there where podman has one (podman >= 5.4), fetched
with skopeo into the cache where it has not."""

import concurrent.futures
import gzip
import json
import os
from pathlib import Path

import pytest

from conftest import (
    copy_export,
    make_disk,
    nbdkit_error,
    read_export,
    run_nbdkit,
    serve,
    sha256,
)
from lab import (
    Blob,
    podman,
    processes_mentioning,
    push_artifact,
    registry,
    stored_artifacts,
    wait_for,
)

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
VM = {"artifact_type": "application/vnd.kubevirt.virtualmachine.v1",
      "config_type": "application/vnd.kubevirt.virtualmachine.config.v1+json",
      "config": b'{"name": "vm"}'}
QCOW2 = "application/vnd.kubevirt.disk.qcow2"
RAW_GZIP = "application/vnd.kubevirt.disk.raw+gzip"
# The second disk of the two-disk VM export.
DATA_DISK = make_disk(4 << 20)[::-1]


@pytest.fixture(scope="module")
def artifacts(lab, disk):
    """{shape: (name in the registry, the disk file it holds)}."""
    raw, qcow2 = disk
    shapes = {
        "oras-qcow2": ([Blob(LAYER_TAR, qcow2, "disk.qcow2")], {}, qcow2),
        "oras-raw": ([Blob(LAYER_TAR, raw, "disk.img")], {}, raw),
        "vm-qcow2": ([Blob(QCOW2, qcow2, "rootdisk")], VM, qcow2),
        "vm-raw-gzip": ([Blob(RAW_GZIP, gzip.compress(raw, 1), "rootdisk")], VM, raw),
        "vm-two-disks": ([Blob(QCOW2, qcow2, "rootdisk"),
                          Blob(RAW_GZIP, gzip.compress(DATA_DISK, 1), "datadisk")], VM, None),
    }
    found = {}
    for shape, (blobs, manifest, disk_file) in shapes.items():
        remote = f"{lab.registry}/cdi-test/{shape}:1"
        push_artifact(lab.workdir, remote, blobs, **manifest)
        found[shape] = (remote, disk_file)
    return found


def listing(*params):
    result = run_nbdkit(*params, run='nbdinfo --list --json "$uri"')
    assert result.returncode == 0, result.stderr
    return {export["export-name"]: export for export in json.loads(result.stdout)["exports"]}


@pytest.mark.parametrize("shape", ["oras-qcow2", "oras-raw", "vm-qcow2", "vm-raw-gzip"])
def test_the_disk_export_is_the_disk_file(artifacts, cache, shape):
    name, disk_file = artifacts[shape]
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk_file


@pytest.mark.parametrize("shape", ["oras-qcow2", "vm-qcow2"])
def test_qemu_img_reads_the_qcow2_of_layer_disk(artifacts, cache, disk, shape):
    result = run_nbdkit(f"name={artifacts[shape][0]}", "layer=disk", f"cache={cache}",
                        run='qemu-img info --output=json "$uri"')
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", len(disk[0]))


@pytest.mark.parametrize("shape, title", [
    ("oras-qcow2", "disk.qcow2"), ("oras-raw", "disk.img"), ("vm-qcow2", "rootdisk"),
    ("vm-raw-gzip", "rootdisk")])
def test_list_names_each_blob_and_the_disk(artifacts, cache, shape, title):
    exports = listing(f"name={artifacts[shape][0]}", f"cache={cache}")
    assert sorted(exports) == ["0", "disk", title]
    assert exports["0"]["description"].startswith(f"blob 0 of 1: {title}, ")
    assert exports["disk"]["export-size"] == len(artifacts[shape][1])


def test_list_describes_a_blob_by_title_media_type_and_format(artifacts, cache, disk):
    exports = listing(f"name={artifacts['vm-qcow2'][0]}", f"cache={cache}")
    assert sorted(exports) == ["0", "disk", "rootdisk"]
    description = exports["rootdisk"]["description"]
    assert description.startswith(f"blob 0 of 1: rootdisk, {QCOW2}, sha256:")
    assert description.endswith(f": qcow2, {len(disk[0]) >> 20}.0 MiB virtual")
    assert exports["disk"]["description"] == description


def test_a_gzip_disk_is_unpacked_sparse_and_described(artifacts, cache, disk):
    exports = listing(f"name={artifacts['vm-raw-gzip'][0]}", f"cache={cache}")
    assert exports["disk"]["description"].endswith(
        ", gzip, unpacked in the cache to 8.0 MiB: raw, 8.0 MiB")
    unpacked = [path for path in Path(cache, "unpacked").iterdir()
                if not path.name.endswith(".json")]
    assert len(unpacked) == 1
    assert unpacked[0].stat().st_blocks * 512 < len(disk[0]) // 2, "zeros were written"
    assert oct(unpacked[0].stat().st_mode & 0o777) == "0o600"


def test_each_disk_of_a_two_disk_export_is_named_by_its_title(artifacts, cache, disk):
    name = artifacts["vm-two-disks"][0]
    exports = listing(f"name={name}", f"cache={cache}")
    assert sorted(exports) == ["0", "1", "datadisk", "rootdisk"]
    assert read_export(f"name={name}", f"cache={cache}", export_name="rootdisk") == disk[1]
    assert read_export(f"name={name}", f"cache={cache}", export_name="datadisk") == DATA_DISK


def test_disk_of_a_two_disk_export_is_ambiguous_and_lists_the_names(artifacts, cache):
    name = artifacts["vm-two-disks"][0]
    assert f"error: {name}: the artifact holds 2 disks: name one as the " \
           "export: rootdisk, datadisk" in nbdkit_error(f"name={name}", f"cache={cache}",
                                                        "layer=disk")


def test_a_warm_start_needs_neither_the_registry_nor_skopeo(lab, cache, disk):
    with registry(lab.workdir, "short-lived") as short_lived:
        name = f"{short_lived.address}/cdi-test/vm:1"
        push_artifact(lab.workdir, name, [Blob(RAW_GZIP, gzip.compress(disk[0], 1), "root")],
                      **VM)
        cold = run_nbdkit(f"name={name}", f"cache={cache}", "tls-verify=false", verbose=True)
        assert cold.returncode == 0, cold.stderr
    warm = copy_export(f"name={name}", f"cache={cache}", "layer=disk", verbose=True)
    assert warm.digest == sha256(disk[0])
    assert "running: skopeo" in cold.stderr
    assert "running: skopeo" not in warm.stderr
    assert "passed its check before, unchanged since" in warm.stderr


def test_two_cold_starts_at_once_both_serve_the_disk(artifacts, cache, disk):
    name = artifacts["vm-raw-gzip"][0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: copy_export(
            f"name={name}", f"cache={cache}", "layer=disk"), range(2)))
    for result in results:
            assert result.digest == sha256(disk[0])
    assert not [path for path in Path(cache).rglob("*")
                if path.name.startswith((".partial-", "oci-put-blob", ".new-"))]


def cached_blob(cache, size):
    """The path of the cached blob of SIZE bytes."""
    [path] = [path for path in Path(cache, "oci", "blobs", "sha256").iterdir()
              if path.stat().st_size == size]
    return path


def corrupt(path):
    with open(path, "r+b") as file:
        file.seek(4096)
        byte = file.read(1)
        file.seek(4096)
        file.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.requires("skopeo-artifacts")
@pytest.mark.parametrize("shape", ["vm-qcow2", "vm-raw-gzip"])
def test_a_corrupted_cached_blob_is_fetched_again(artifacts, cache, shape, disk):
    name, disk_file = artifacts[shape]
    blob_size = len(disk[1]) if shape == "vm-qcow2" else len(gzip.compress(disk[0], 1))
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk_file
    corrupt(cached_blob(cache, blob_size))
    if shape == "vm-raw-gzip":  # the unpacked copy too: both are checked
        [unpacked] = [path for path in Path(cache, "unpacked").iterdir()
                      if not path.name.endswith(".json")]
        corrupt(unpacked)
    message = nbdkit_error(f"name={name}", f"cache={cache}", "pull=never")
    assert "no longer matches its digest" in message
    assert message.rstrip().endswith("pull=never forbids fetching it again: pass pull=missing")
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk_file


def test_a_gzip_blob_cut_short_is_an_error_and_leaves_nothing(lab, cache, disk):
    name = f"{lab.registry}/cdi-test/cut-short:1"
    packed = gzip.compress(disk[0], 1)
    push_artifact(lab.workdir, name, [Blob(RAW_GZIP, packed[:len(packed) // 2], "root")], **VM)
    message = nbdkit_error(f"name={name}", f"cache={cache}")
    assert "the gzip stream ends early: the blob is cut short" in message
    assert os.listdir(Path(cache, "unpacked")) == []


def test_an_artifact_behind_a_password_needs_the_authfile(lab, cache, disk):
    name = f"{lab.auth_registry}/cdi-test/private-vm:1"
    push_artifact(lab.workdir, name, [Blob(QCOW2, disk[1], "rootdisk")],
                  authfile=lab.authfile, **VM)
    message = nbdkit_error(f"name={name}", f"cache={cache}")
    assert f"authentication required by {lab.auth_registry}" in message
    assert read_export(f"name={name}", f"cache={cache}", f"authfile={lab.authfile}",
                       export_name="disk") == disk[1]


def test_extents_of_the_disk_export_pass_through(artifacts, cache):
    result = run_nbdkit(f"name={artifacts['vm-raw-gzip'][0]}", f"cache={cache}", "layer=disk",
                        run='nbdinfo --map --json "$uri"')
    assert result.returncode == 0, result.stderr
    extents = json.loads(result.stdout)
    # make_disk writes 4 KiB at 0: the unpacked copy keeps its 64 KiB block.
    assert [(extent["offset"], extent["description"]) for extent in extents[:2]] == [
        (0, "data"), (64 << 10, "hole,zero")]
    holes = sum(extent["length"] for extent in extents if extent["description"] != "data")
    assert holes > 7 << 20


@pytest.mark.requires("skopeo-artifacts")
def test_a_fetch_killed_midway_leaves_nothing_and_the_next_start_serves(lab, cache):
    name = f"{lab.registry}/cdi-test/big-vm:1"
    disk = Path(lab.workdir, "big.img")
    with open(disk, "wb") as file:
        file.write(os.urandom(256 << 20))
    try:
        # A media type that says compressed: fetched whole (by skopeo), not
        # read from the registry as it is read.
        push_artifact(lab.workdir, name, [Blob(LAYER_TAR + "+gzip", disk, "big.img.gz")])
        expected = sha256(disk.read_bytes())
    finally:
        disk.unlink()
    partial = Path(cache, "oci")
    with serve(lab, f"name={name}", f"cache={cache}", ready=False) as server:
        wait_for(lambda: any(path.name.startswith("oci-put-blob")
                             for path in partial.glob("*")) or server.process.poll() is not None,
                 60, "skopeo did not start copying")
        assert not server.is_ready(), "the copy ended too soon to test"
        server.process.kill()  # SIGKILL: the guardian must stop skopeo
        server.process.wait()
        wait_for(lambda: not processes_mentioning(cache.encode()), 30,
                 lambda: f"left running: {processes_mentioning(cache.encode())}")
    assert any(path.name.startswith("oci-put-blob") for path in partial.glob("*"))
    result = copy_export(f"name={name}", f"cache={cache}", "layer=disk")
    assert result.digest == expected
    assert not [path for path in partial.glob("*") if path.name.startswith("oci-put-blob")]


@pytest.mark.requires("skopeo-artifacts")
def test_a_cached_blob_removed_is_fetched_again(artifacts, cache, disk):
    name, disk_file = artifacts["vm-qcow2"]
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk_file
    cached_blob(cache, len(disk[1])).unlink()
    assert "the cached blob sha256:" in nbdkit_error(f"name={name}", f"cache={cache}",
                                                     "pull=never")
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk_file


def test_a_layer_out_of_range_counts_the_blobs(artifacts, cache):
    name = artifacts["vm-two-disks"][0]
    assert nbdkit_error(f"name={name}", f"cache={cache}", "layer=2").rstrip().endswith(
        f"error: {name}: layer=2 is out of range: the artifact has 2 blobs "
        "(allowed: 0..1 or -2..-1)")


# ------------------------------------------- podman's artifact store (podman 5)

def store_blob(digest):
    """The path of blob DIGEST in podman's artifact store."""
    graph_root = podman("info", "--format", "{{.Store.GraphRoot}}").strip()
    return Path(graph_root, "artifacts", "blobs", "sha256", digest.split(":")[1])


def cached_blobs(cache):
    return list(Path(cache, "oci", "blobs").rglob("*")) if Path(cache, "oci").exists() else []


@pytest.mark.requires("podman-artifact")
def test_an_artifact_pulled_by_podman_is_served_in_place_and_checked(artifacts, cache, disk):
    name = artifacts["vm-qcow2"][0]
    podman("artifact", "pull", "--quiet", "--tls-verify=false", name)
    result = copy_export(f"name={name}", f"cache={cache}", "pull=never", "layer=disk",
                         verbose=True)
    assert result.digest == sha256(disk[1])
    assert f"using the artifact {name} from podman's artifact store" in result.stderr
    assert "checking the blob in podman's artifact store sha256:" in result.stderr
    assert "running: skopeo" not in result.stderr
    assert cached_blobs(cache) == [], "a second copy in the cache"


@pytest.mark.requires("podman-artifact")
def test_an_artifact_made_with_podman_artifact_add_is_served(lab, cache, disk):
    path = Path(lab.workdir, "added.qcow2")
    path.write_bytes(disk[1])
    name = f"localhost/cdi-test/added-{os.urandom(4).hex()}:1"
    try:
        podman("artifact", "add", name, str(path))
    finally:
        path.unlink()
    exports = listing(f"name={name}", f"cache={cache}")
    assert sorted(exports) == ["0", "added.qcow2", "disk"]
    assert read_export(f"name={name}", f"cache={cache}", export_name="disk") == disk[1]


@pytest.mark.requires("podman-artifact")
@pytest.mark.parametrize("pull", ["missing", "always"])
def test_a_cold_artifact_is_pulled_into_podmans_store(artifacts, cache, disk, pull):
    name, disk_file = artifacts["vm-raw-gzip"]
    result = copy_export(f"name={name}", f"cache={cache}", f"pull={pull}", "tls-verify=false",
                         "layer=disk", verbose=True)
    assert result.digest == sha256(disk_file)
    assert "pulling it with podman artifact pull" in result.stderr
    assert name in stored_artifacts()
    assert cached_blobs(cache) == [], "a second copy in the cache"
    warm = run_nbdkit(f"name={name}", f"cache={cache}", "pull=never", verbose=True)
    assert warm.returncode == 0, warm.stderr
    assert "passed its check before, unchanged since" in warm.stderr


@pytest.mark.requires("podman-artifact")
def test_a_damaged_blob_in_podmans_store_is_refused_with_advice(artifacts, cache, disk):
    name = artifacts["vm-qcow2"][0]
    podman("artifact", "pull", "--quiet", "--tls-verify=false", name)
    [layer] = json.loads(podman("artifact", "inspect", name))["Manifest"]["layers"]
    corrupt(store_blob(layer["digest"]))
    message = nbdkit_error(f"name={name}", f"cache={cache}")
    assert (f"error: {name}: the blob in podman's artifact store {layer['digest']} no longer "
            f"matches its digest ({name}: verify: layer 0 hashes to sha256:") in message
    assert message.rstrip().endswith(
        f"; remove it with podman artifact rm {name} and pull it again")
