"""Artifacts in the cache: telling them from images, naming them in the
layout, unpacking gzip blobs sparse and checked."""

import gzip
import hashlib
import io
import os

import pytest

from cdipy.cache import PrivateCache
from cdipy.errors import CdiError
from cdipy.oci.blobs import decompress_sparse
from cdipy.oci.layout import Layout, is_artifact, reference
from cdipy.podman import diagnose, summary
from cdipy.sources.layout_blobs import usable_name

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize("config_type, expected", [
    ("application/vnd.oci.image.config.v1+json", False),
    ("application/vnd.docker.container.image.v1+json", False),
    ("application/vnd.oci.empty.v1+json", True),
    ("application/vnd.kubevirt.virtualmachine.config.v1+json", True),
])
def test_an_artifact_is_told_by_its_config(config_type, expected):
    manifest = {"mediaType": OCI_MANIFEST, "config": {"mediaType": config_type}, "layers": []}
    assert is_artifact(manifest) is expected


def test_a_schema_1_image_is_no_artifact():
    assert not is_artifact({"schemaVersion": 1, "fsLayers": [], "history": []})


def test_an_index_is_an_artifact_only_if_its_entries_say_so():
    index = {"mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"digest": "sha256:" + "1" * 64}]}
    assert not is_artifact(index)
    index["manifests"][0]["artifactType"] = "application/vnd.kubevirt.virtualmachine.v1"
    assert is_artifact(index)


def test_the_reference_in_the_layout_is_a_digest_of_the_name():
    assert reference("quay.io/a/b:1") == reference("quay.io/a/b:1")
    assert reference("quay.io/a/b:1") != reference("quay.io/a/b:2")
    assert reference("docker://quay.io/a/b:1") == reference("quay.io/a/b:1")
    assert reference("oci-archive:/x y/\n.tar").startswith("cdi-py-")
    assert len(reference("x")) == len("cdi-py-") + 32


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha512:" + "0" * 128,
                                    "sha256:" + "0" * 63, None, 7])
def test_a_blob_named_by_anything_but_a_sha256_is_refused(tmp_path, digest):
    with pytest.raises(CdiError, match="which is not a sha256 digest"):
        Layout(str(tmp_path), "img").blob_path(digest)


def test_a_layout_needs_a_cache_directory():
    with pytest.raises(CdiError, match="no cache directory for the artifact: HOME is not set"):
        Layout(None, "img")


def test_a_cache_directory_others_may_write_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)
    locked = Layout(str(tmp_path), "img").locked()
    with pytest.raises(CdiError, match="is not a directory that only this user can write to"):
        locked.__enter__()


def test_the_lock_removes_the_blobs_a_killed_skopeo_left(tmp_path):
    layout = Layout(str(tmp_path), "img")
    os.makedirs(layout.path, mode=0o700)
    (tmp_path / "oci" / "oci-put-blob1234").write_bytes(b"half")
    with layout.locked():
        assert os.listdir(layout.path) == []


@pytest.mark.parametrize("title, usable", [
    ("rootdisk", True), ("disk.qcow2", True), ("disk", False), ("0", False), ("-1", False),
    ("sha256:" + "1" * 64, False), ("a\nb", False), ("", False)])
def test_a_title_names_an_export_unless_it_clashes(title, usable):
    assert usable_name(title) is usable


def gunzip(data, tmp_path):
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        source_hash, output_hash = hashlib.sha256(), hashlib.sha256()
        size = decompress_sparse(io.BytesIO(data), fd, source_hash, output_hash, what="blob")
        return size, os.fstat(fd).st_blocks * 512, source_hash, output_hash
    finally:
        os.close(fd)


def test_gunzip_leaves_zero_blocks_as_holes_and_hashes_both_sides(tmp_path):
    raw = b"x" * 100 + bytes(8 * MIB) + b"end"
    packed = gzip.compress(raw)
    size, allocated, source_hash, output_hash = gunzip(packed, tmp_path)
    assert (tmp_path / "out").read_bytes() == raw
    assert size == len(raw)
    assert allocated <= 256 << 10
    assert source_hash.digest() == hashlib.sha256(packed).digest()
    assert output_hash.digest() == hashlib.sha256(raw).digest()


def test_gunzip_reads_every_member_of_a_multi_member_stream(tmp_path):
    gunzip(gzip.compress(b"one ") + gzip.compress(b"two"), tmp_path)
    assert (tmp_path / "out").read_bytes() == b"one two"


def test_gunzip_of_a_stream_cut_short_says_so(tmp_path):
    packed = gzip.compress(os.urandom(MIB))
    with pytest.raises(CdiError) as error:
        gunzip(packed[:len(packed) // 2], tmp_path)
    assert str(error.value) == "blob: the gzip stream ends early: the blob is cut short"


def test_gunzip_of_something_else_says_it_is_not_gzip(tmp_path):
    with pytest.raises(CdiError, match=r"^blob is not a valid gzip stream \(Error -3"):
        gunzip(b"QFI\xfb" + bytes(100), tmp_path)


def test_summary_of_skopeo_is_its_fatal_message():
    stderr = ('time="2026-11-29T17:42:13Z" level=fatal msg="Error parsing image name '
              '\\"docker://h/a\\": manifest unknown"\n')
    assert summary(stderr) == 'Error: Error parsing image name "docker://h/a": manifest unknown'


def test_the_reference_of_another_platform_is_another():
    assert reference("quay.io/a/b:1", "linux/arm64") != reference("quay.io/a/b:1")


def test_a_cache_created_under_a_loose_umask_is_still_private(tmp_path):
    old = os.umask(0o002)
    try:
        PrivateCache(str(tmp_path / "cdi-py" / "checked")).write("entry", b"x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "cdi-py").stat().st_mode & 0o777) == "0o700"
    with Layout(str(tmp_path / "cdi-py"), "img").locked():
        pass


def test_skopeo_out_of_space_names_the_cache_too():
    assert diagnose("write /c/oci/oci-put-blob1: no space left on device", "h",
                    "/var/tmp", "skopeo") == (
        "no space left on device in the cache or TMPDIR=/var/tmp")
