"""Seekable layers as this release's own tools write them: a containerdisk
pushed as zstd:chunked by podman (podman 4.3 writes the io.containers.
annotations, later ones io.github.containers.), and made eStargz by a
containerd and ctr-remote of the test's own; their TOCs read from the
registry with ranges by cdipy.oci.toc, and every chunk of the disk checked
and put together byte-exact.  What serves them lazily comes with the
engine (issue 23); these prove the images it will be tested on."""

import hashlib

import pytest
import requests

from cdipy.oci.blobs import compression_of
from cdipy.oci.toc import ESTARGZ, ZSTD_CHUNKED, find_disk, read_toc, unpack_chunk_pieces
from lab import push_estargz, push_zstd_chunked, tool_version

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
