"""Seekable layers as this release's own tools write them: a containerdisk
pushed as zstd:chunked by podman (podman 4.3 writes the io.containers.
annotations, later ones io.github.containers.), and made eStargz by a
containerd and ctr-remote of the test's own; their TOCs read from the
registry with ranges by cdipy.oci.toc, and every chunk of the disk checked
and put together byte-exact.  Then served: the disk read as the VM reads
it, fetching little more than what it reads; whole in the cache behind
the reads; served again with the registry gone; and a TOC or a chunk that
lies refused, through the test's proxy (httplab.Proxy), which flips a
byte as a registry cannot be made to."""

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import nbd
import pytest
import requests

from cdipy.oci.blobs import compression_of
from cdipy.oci.toc import (
    ESTARGZ,
    ZSTD_CHUNKED,
    find_disk,
    read_toc,
    seekable_kind,
    unpack_chunk_pieces,
)
from conftest import copy_export, nbdkit_error, params, read, serve, sha256
from httplab import Proxy
from lab import (
    MIB,
    export_digest,
    podman,
    push_estargz,
    push_zstd_chunked,
    registry,
    tool_version,
    wait_for,
)
from vm import boot, make_boot_disk, token_line

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json,"
                  "application/vnd.docker.distribution.manifest.v2+json")


def zstd_chunked_prefix():
    """The annotations' prefix this release's podman writes."""
    version = tuple(int(part) for part in tool_version("podman").split(".")[:2])
    return ("io.containers.zstd-chunked." if version < (4, 4)
            else "io.github.containers.zstd-chunked.")


def only_layer(lab, name):
    """The one layer descriptor of image NAME in LAB's open registry."""
    repository, tag = name.rsplit(":", 1)
    response = requests.get(f"http://{lab.registry}/v2/{repository}/manifests/{tag}",
                            headers={"Accept": MANIFEST_TYPES}, timeout=30)
    response.raise_for_status()
    (layer,) = response.json()["layers"]
    return layer


def range_reader(lab, name, layer, log):
    """read_range over the registry's blob of LAYER, a Range request each."""
    repository = name.rsplit(":", 1)[0]

    def read_range(start, end):
        log.append((start, end))
        response = requests.get(
            f"http://{lab.registry}/v2/{repository}/blobs/{layer['digest']}",
            headers={"Range": f"bytes={start}-{end - 1}"}, timeout=30)
        assert response.status_code == 206, response.status_code
        return response.content
    return read_range


def assert_disk_reads_back(lab, name, layer, expected, kind):
    """The TOC of LAYER of NAME read with ranges, of KIND; the disk found
    by it, each of its chunks fetched alone and checked: EXPECTED."""
    log = []
    read_range = range_reader(lab, name, layer, log)
    toc = read_toc(layer, read_range, name)
    assert toc.kind == kind
    assert len(log) == (1 if kind == ZSTD_CHUNKED else 2), log
    choice, file = find_disk([(0, toc)], name)
    assert (choice.member.name, file.size) == ("disk/disk.img", len(expected))
    assert file.digest == "sha256:" + hashlib.sha256(expected).hexdigest()
    whole = bytearray()
    for chunk in file.chunks:
        data = None if chunk.zeros else read_range(chunk.blob_offset, chunk.blob_end)
        for piece in unpack_chunk_pieces(toc, file, chunk, data):
            whole += piece
    assert whole == expected
    return toc


@pytest.fixture(scope="module")
def zstd_chunked(lab, disk):
    """(name, layer descriptor) of the qcow2 containerdisk pushed as zstd:chunked."""
    name, _ = push_zstd_chunked(lab, "zstd-chunked", {"disk/disk.img": disk[1]})
    return name, only_layer(lab, name)


def test_podman_pushes_zstd_chunked_with_its_releases_annotations(lab, disk, zstd_chunked):
    name, layer = zstd_chunked
    prefix = zstd_chunked_prefix()
    assert {prefix + "manifest-position", prefix + "manifest-checksum"} \
        <= set(layer["annotations"])
    assert layer["mediaType"].endswith("tar+zstd")
    toc = assert_disk_reads_back(lab, name, layer, disk[1], ZSTD_CHUNKED)
    # Only podman >= 4.4 writes a tar-split.
    assert (toc.tar_split is not None) == prefix.startswith("io.github.")


@pytest.mark.requires("estargz")
def test_ctr_remote_makes_estargz_of_a_zstd_chunked_layer(lab, disk, zstd_chunked):
    name, _ = zstd_chunked
    converted = name.replace(":1", ":estargz")
    push_estargz(lab, name, converted)
    layer = only_layer(lab, converted)
    assert "containerd.io/snapshot/stargz/toc.digest" in layer["annotations"]
    # gzip bytes under the zstd source's media type: the bytes tell.
    assert layer["mediaType"].endswith("tar+zstd")
    assert compression_of(range_reader(lab, converted, layer, [])(0, 4)) == "gzip"
    assert_disk_reads_back(lab, converted, layer, disk[1], ESTARGZ)


# ------------------------------------------------------- served as it is read

SIZE = 24 * MIB
KEPT = "is whole in the cache"  # every layer, then the manifest


def varied_disk():
    """A disk of SIZE bytes: random (chunks of about 64 KiB), then zeros
    (one zeros chunk), then random again."""
    return os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4)


@pytest.fixture(scope="module")
def chunked(lab):
    """(name, disk bytes, layer descriptor, diffID) of a containerdisk of
    varied_disk pushed as zstd:chunked."""
    data = varied_disk()
    name, image = push_zstd_chunked(lab, "served-chunked", {"disk/disk.img": data})
    return name, data, only_layer(lab, name), image.diff_ids[0]


@pytest.fixture(scope="module")
def estargz(lab, chunked):
    """The same, made eStargz."""
    name, data, _, diff_id = chunked
    converted = name.replace(":1", ":served-estargz")
    push_estargz(lab, name, converted)
    return converted, data, only_layer(lab, converted), None


def assert_lazy_then_whole(lab, image, cache, upstream=None):
    """A cold start fetches the TOC and what is read, not the layer; a
    whole copy is byte-exact; the image is whole in the cache behind it;
    with the registry (UPSTREAM, default the lab's) gone, a start serves
    it again."""
    name, data, layer, _ = image
    with Proxy(upstream or lab.registry) as proxy:
        with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
            ready = proxy.blob_bytes
            # The chunks of 2 MiB holding the TOC and its footer (three at most
            # here), and the disk's head.
            assert ready <= 4 * 2 * MIB, "more than the TOC and the disk's head before ready"
            offset = 3 * SIZE // 4 + 12345  # in the random data after the zeros
            assert read(server, offset, 4096) == data[offset:offset + 4096]
            assert proxy.blob_bytes - ready <= 2 * 2 * MIB, "a 4 KiB read cost more than a chunk"
            assert read(server, SIZE // 2 + 4096, 4096) == bytes(4096), "the zeros"
            assert export_digest(server.uri("disk")) == sha256(data)
            wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
            log = server.log()
        address = proxy.address
    assert proxy.blob_bytes <= layer["size"] * 1.1 + 4 * MIB, "fetched twice"
    assert "read as it is asked for" in log
    result = copy_export(f"name={address}/{name}", f"cache={cache}", "tls-verify=false",
                         "layer=disk", verbose=True)
    assert result.digest == sha256(data), result.stderr


def test_a_zstd_chunked_containerdisk_is_served_as_it_is_read(lab, chunked, cache):
    assert_lazy_then_whole(lab, chunked, cache)


@pytest.mark.requires("estargz")
def test_an_estargz_containerdisk_is_served_as_it_is_read(lab, estargz, cache):
    assert_lazy_then_whole(lab, estargz, cache)


def test_a_containerdisk_skopeo_converted_to_zstd_chunked_is_served_as_it_is_read(lab, cache):
    data = varied_disk()
    tag = f"localhost/cdi-test/skopeo-chunked-{os.urandom(6).hex()}:1"
    lab.build(tag, [{"disk/disk.img": data}])
    gzip_name = tag.removeprefix("localhost/")
    podman("push", "--quiet", "--tls-verify=false", tag, f"docker://{lab.registry}/{gzip_name}")
    # Into another registry: into the same one, skopeo pushes the gzip blob
    # it finds there, as it is.
    with registry(lab.workdir, f"converted-{os.urandom(3).hex()}") as other:
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        "--dest-tls-verify=false", "--dest-compress-format=zstd:chunked",
                        f"docker://{lab.registry}/{gzip_name}",
                        f"docker://{other.address}/cdi-test/converted:1"],
                       check=True, stdin=subprocess.DEVNULL, capture_output=True)
        response = requests.get(f"http://{other.address}/v2/cdi-test/converted/manifests/1",
                                headers={"Accept": MANIFEST_TYPES}, timeout=30)
        (layer,) = response.json()["layers"]
        assert seekable_kind(layer) == ZSTD_CHUNKED, layer
        assert_lazy_then_whole(lab, ("cdi-test/converted:1", data, layer, None), cache,
                               upstream=other.address)


@pytest.mark.parametrize("shape", ["zstd:chunked", pytest.param(
    "eStargz", marks=pytest.mark.requires("estargz"))])
def test_a_vm_boots_from_a_cold_seekable_containerdisk(lab, proxy, cache, shape):
    token = os.urandom(8).hex()
    raw, qcow2 = Path(lab.workdir, "seekable-boot.raw"), Path(lab.workdir, "seekable-boot.qcow2")
    try:
        # The boot files behind 16 MiB of random data: a stream would pass it all.
        make_boot_disk(raw, token, behind=16 * MIB)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                        str(qcow2)], check=True)
        name, _ = push_zstd_chunked(lab, "seekable-boot", {"disk/disk.qcow2": qcow2.read_bytes()})
        if shape == "eStargz":
            push_estargz(lab, name, name.replace(":1", ":estargz"))
            name = name.replace(":1", ":estargz")
        with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
            # Ready with the TOC and the disk's head: the boot reads the rest
            # as it goes (what it costs cold, over a slow link: bench-shaped).
            assert proxy.blob_bytes <= 4 * 2 * MIB
            console = boot(server.uri(), "qcow2")
    finally:
        raw.unlink(missing_ok=True)
        qcow2.unlink(missing_ok=True)
    assert token_line(token) in console


def test_the_layer_export_of_a_seekable_layer_reads_through_its_blob(lab, chunked, proxy,
                                                                      cache):
    name, data, layer, diff_id = chunked
    with serve(lab, *params(proxy, name, cache), verbose=True) as server:
        assert read(server, SIZE - 4096, 4096) == data[-4096:]
        assert export_digest(server.uri("0")) == diff_id
        wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
    assert proxy.blob_bytes <= layer["size"] * 1.1 + 4 * MIB, "the layer was fetched twice"


def test_sigkill_mid_fill_leaves_what_arrived_for_the_next_start(lab, chunked, proxy, cache):
    name, data, layer, _ = chunked
    with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
        for offset in range(0, SIZE // 2, 2 * MIB):
            assert read(server, offset, 4096) == data[offset:offset + 4096]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    assert cached_blob_paths(cache) == [], "a blob named whole after SIGKILL"
    assert proxy.blob_bytes >= SIZE // 3
    # What the record says was kept (chunks fetched but in flight at the
    # kill were not, and are fetched again, rightly).
    (record,) = Path(cache, "partial").glob("*.chunks")
    kept = sum(min(2 * MIB, layer["size"] - number * 2 * MIB)
               for number, held in enumerate(record.read_bytes()) if held)
    assert kept >= SIZE // 3
    before = proxy.blob_bytes
    result = copy_export(*params(proxy, name, cache, "layer=disk"))
    assert result.digest == sha256(data)
    assert proxy.blob_bytes - before <= layer["size"] - kept + 1024, \
        "what was kept before the kill was fetched again"


def test_a_toc_that_does_not_match_its_annotation_is_refused(lab, chunked, proxy, cache):
    name, _, layer, _ = chunked
    repository = name.rsplit(":", 1)[0]
    manifest = manifest_of(lab, name)
    (key,) = [key for key in manifest["layers"][0]["annotations"]
              if key.endswith("zstd-chunked.manifest-checksum")]
    manifest["layers"][0]["annotations"][key] = "sha256:" + "0" * 64
    lying = f"{repository}:lying-toc"
    put_manifest(lab, lying, manifest)
    stderr = nbdkit_error(*params(proxy, lying, cache, "layer=disk"))
    assert (f"error: {proxy.address}/{lying}: layer {layer['digest']}: zstd:chunked TOC: "
            f"checksum mismatch: the TOC hashes to sha256:") in stderr
    assert f"its annotation {key} says sha256:{'0' * 64}\n" in stderr
    assert not any(cached_blob_paths(cache)), "something of the layer was named whole"


def test_a_chunk_the_registry_changed_fails_its_reads(lab, chunked, proxy, cache):
    name, data, layer, _ = chunked
    with serve(lab, *params(proxy, name, cache, "layer=disk")):
        pass  # the TOC and the disk's head are in the cache: no range asked at start
    toc = read_toc(layer, range_reader(lab, name, layer, []), name)
    # Every blob range from now on has its middle byte flipped: the range
    # of 2 MiB from 4 MiB, the chunk across 5 MiB.
    chunk = next(chunk for chunk in toc.files["disk/disk.img"].chunks
                 if chunk.blob_offset <= 5 * MIB < chunk.blob_end)
    proxy.aim, proxy.flip = layer["digest"], "every"
    with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
        assert read(server, 0, 4096) == data[:4096], "the head, checked before, is served"
        with pytest.raises(nbd.Error, match="Input/output error"):
            read(server, chunk.file_offset, 4096)
        with pytest.raises(nbd.Error, match="Input/output error"):
            read(server, 0, 4096)  # the file cannot be right: every read fails
        log = server.log()
    assert (f"{proxy.address}/{name}: layer {layer['digest']}: zstd:chunked TOC: file "
            f"disk/disk.img: chunk at byte {chunk.file_offset}: ") in log
    assert "refusing to serve it" in log
    assert not cached_blob_paths(cache), "a blob that failed its check was kept"


def manifest_of(lab, name):
    repository, tag = name.rsplit(":", 1)
    response = requests.get(f"http://{lab.registry}/v2/{repository}/manifests/{tag}",
                            headers={"Accept": MANIFEST_TYPES}, timeout=30)
    response.raise_for_status()
    return response.json()


def put_manifest(lab, name, manifest):
    repository, tag = name.rsplit(":", 1)
    response = requests.put(f"http://{lab.registry}/v2/{repository}/manifests/{tag}",
                            data=json.dumps(manifest).encode(),
                            headers={"Content-Type": manifest["mediaType"]}, timeout=30)
    response.raise_for_status()


def cached_blob_paths(cache):
    directory = os.path.join(cache, "oci", "blobs", "sha256")
    return os.listdir(directory) if os.path.isdir(directory) else []
