"""Where the image comes from: registry, local storage, archive files,
multi-arch manifest lists, and the pull= policy."""

import os
import shutil
import tempfile

import pytest

from conftest import nbdkit_error, podman, read_export, sha256


def test_pull_from_registry(lab, three):
    remote = f"{lab.registry}/cdi-test/three:1"
    podman("rmi", "--force", remote, check=False)
    assert sha256(read_export(f"name={remote}", "layer=1")) == three.diff_ids[1]


def test_docker_transport_prefix(lab, three):
    remote = f"docker://{lab.registry}/cdi-test/three:1"
    assert sha256(read_export(f"name={remote}", "layer=-1")) == three.diff_ids[2]


def test_pull_by_digest(lab, three):
    remote = f"{lab.registry}/cdi-test/three:1"
    podman("pull", "--quiet", remote)
    digest = podman("image", "inspect", "--format", "{{.Digest}}", remote).strip()
    by_digest = f"{lab.registry}/cdi-test/three@{digest}"
    assert sha256(read_export(f"name={by_digest}", "layer=0")) == three.diff_ids[0]


def test_image_only_in_local_storage(lab):
    image = lab.build("localhost/cdi-test/local-only:1", [{"only-here.txt": b"local\n"}])
    try:
        assert sha256(read_export(f"name={image.name}")) == image.diff_ids[0]
    finally:
        podman("rmi", "--force", image.name)


@pytest.mark.parametrize("pull", ["missing", "always"])
def test_containers_storage_transport_never_pulls(three, pull):
    data = read_export(f"name=containers-storage:{three.name}", "layer=-1", f"pull={pull}")
    assert sha256(data) == three.diff_ids[2]


@pytest.mark.parametrize("transport, format_name", [
    ("oci-archive", "oci-archive"), ("docker-archive", "docker-archive")])
def test_archive_file(lab, three, transport, format_name):
    archive = os.path.join(lab.workdir, f"three.{format_name}.tar")
    podman("save", "--quiet", "--format", format_name, "-o", archive, three.name)
    try:
        data = read_export(f"name={transport}:{archive}", "layer=1")
        assert sha256(data) == three.diff_ids[1]
    finally:
        os.unlink(archive)


@pytest.fixture(scope="module")
def multi_arch(lab):
    """A manifest list in the registry with linux/amd64 and linux/arm64
    images whose single layers differ."""
    images = {
        platform: lab.build(f"localhost/cdi-test/multi-{platform.replace('/', '-')}:1",
                            [{"arch.txt": platform.encode()}], platform=platform)
        for platform in ("linux/amd64", "linux/arm64")}
    listing = "localhost/cdi-test/multi-list:1"
    podman("manifest", "create", listing)
    try:
        for image in images.values():
            podman("manifest", "add", listing, f"containers-storage:{image.name}")
        podman("manifest", "push", "--quiet", "--all", listing,
               f"docker://{lab.registry}/cdi-test/multi:1")
    finally:
        podman("manifest", "rm", listing)
        for image in images.values():
            podman("rmi", "--force", image.name)
    return images


@pytest.mark.parametrize("platform", ["linux/arm64", "linux/amd64"])
def test_platform_selects_from_manifest_list(lab, multi_arch, platform):
    data = read_export(f"name={lab.registry}/cdi-test/multi:1", f"platform={platform}")
    assert sha256(data) == multi_arch[platform].diff_ids[0]


def test_platform_repulls_a_local_image_of_another_platform(lab, multi_arch):
    name = f"{lab.registry}/cdi-test/multi:1"
    podman("pull", "--quiet", "--platform=linux/amd64", name)
    data = read_export(f"name={name}", "platform=linux/arm64")
    assert sha256(data) == multi_arch["linux/arm64"].diff_ids[0]


@pytest.fixture
def shadowed(lab):
    """A name whose local image differs from the registry's: the registry
    holds "remote", local storage "local"."""
    name = f"{lab.registry}/cdi-test/shadowed:1"
    remote = lab.build("localhost/cdi-test/shadow-remote:1", [{"who.txt": b"remote\n"}])
    lab.push(remote, name)
    podman("rmi", "--force", remote.name)
    local = lab.build(name, [{"who.txt": b"local\n"}])
    yield name, local, remote
    podman("rmi", "--force", name, check=False)


def test_pull_missing_uses_the_local_image(shadowed):
    name, local, _ = shadowed
    assert sha256(read_export(f"name={name}")) == local.diff_ids[0]


def test_pull_never_uses_the_local_image(shadowed):
    name, local, _ = shadowed
    assert sha256(read_export(f"name={name}", "pull=never")) == local.diff_ids[0]


def test_pull_always_contacts_the_registry(shadowed):
    name, _, remote = shadowed
    assert sha256(read_export(f"name={name}", "pull=always")) == remote.diff_ids[0]


@pytest.fixture
def empty_cache(lab):
    """cache= of a cache of its own: earlier tests streamed images into the lab's."""
    cache = tempfile.mkdtemp(prefix="cache-", dir=lab.workdir)
    yield f"cache={cache}"
    shutil.rmtree(cache)


def test_pull_missing_pulls_an_absent_image(lab, three, empty_cache):
    name = f"{lab.registry}/cdi-test/three:1"
    podman("rmi", "--force", name, check=False)
    assert sha256(read_export(f"name={name}", "pull=missing", "pull-into=podman",
                              empty_cache)) == three.diff_ids[0]
    podman("image", "exists", name)  # fails unless the pull stored it


def test_pull_missing_streams_an_absent_image_into_the_cache(lab, three, empty_cache):
    name = f"{lab.registry}/cdi-test/three:1"
    podman("rmi", "--force", name, check=False)
    for index in (0, -1):
        assert sha256(read_export(f"name={name}", "pull=missing", empty_cache,
                                  f"layer={index}")) == three.diff_ids[index]
    assert name not in podman("images", "--format", "{{.Repository}}:{{.Tag}}"), \
        "podman's storage holds it"


def test_pull_never_refuses_an_absent_image(lab, three, empty_cache):
    name = f"{lab.registry}/cdi-test/three:1"
    podman("rmi", "--force", name, check=False)
    stderr = nbdkit_error(f"name={name}", "pull=never", empty_cache)
    assert f"{name}: image not found in local storage nor in the cache (pull=never)" in stderr
