"""The containerdisk pipeline: layer -> tar filter -> qcow2 -> raw disk;
and the disk export, the file the VM would boot, whatever it is called."""

import json
import os

import pytest

from conftest import nbdkit_error, podman, read_export, run_nbdkit, sha256
from tars import directory, regular, tar_layer, whiteout


def run_on_disk(image, command):
    """Run COMMAND against the qcow2 inside IMAGE's top layer."""
    result = run_nbdkit(f"name={image.name}", "layer=-1", "tar-entry=disk/downloaded",
                        run=command, filters=["tar"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tar_filter_exposes_the_qcow2(three, disk):
    output = run_on_disk(three, 'nbdinfo --json "$uri"')
    info = json.loads(output)["exports"][0]
    assert info["export-size"] == len(disk[1])
    assert f"QEMU QCOW Image (v3), {len(disk[0])} bytes" in info["content"]


def test_qemu_img_info_reads_the_qcow2_over_nbd(three, disk):
    output = run_on_disk(three, 'qemu-img info --output=json "$uri"')
    info = json.loads(output)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == len(disk[0])


def test_qemu_img_convert_gives_back_the_source_disk(three, disk, lab):
    target = os.path.join(lab.workdir, "converted.raw")
    try:
        run_on_disk(three, f'qemu-img convert -f qcow2 -O raw "$uri" {target}')
        with open(target, "rb") as converted:
            assert converted.read() == disk[0]
    finally:
        if os.path.exists(target):
            os.unlink(target)


# ------------------------------------------------ the disk export of images

@pytest.mark.parametrize("copy", ["false", "true"])
def test_disk_export_is_the_disk_file_on_both_paths(three, disk, copy):
    assert read_export(f"name={three.name}", f"copy={copy}", export_name="disk") == disk[1]


def test_layer_disk_makes_the_disk_the_default_and_describes_it(three, disk):
    result = run_nbdkit(f"name={three.name}", "layer=disk", run='nbdinfo --json "$uri"')
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)["exports"][0]
    assert info["export-size"] == len(disk[1])
    assert info["description"] == (
        f"disk/downloaded of layer 2 ({three.diff_ids[2]}), in place from podman's "
        "storage: qcow2, 8.0 MiB virtual")


def test_verbose_says_which_file_is_the_disk_and_why(three):
    result = run_nbdkit(f"name={three.name}", "layer=disk", verbose=True)
    assert result.returncode == 0, result.stderr
    assert ("export disk: disk/downloaded of layer 2: the only regular file under "
            "disk/ once the 3 layers are merged") in result.stderr


@pytest.fixture(scope="module")
def derived(lab):
    """A containerdisk FROM another, whose second layer replaces the disk."""
    image = lab.build("localhost/cdi-test/derived:1", [
        {"disk/disk.qcow2": b"old disk " * 1000},
        {"disk/disk.qcow2": b"new disk " * 500}])
    yield image
    podman("rmi", "--force", image.name, check=False)


def test_the_disk_of_a_derived_containerdisk_is_the_new_one(derived):
    assert read_export(f"name={derived.name}", export_name="disk") == b"new disk " * 500
    result = run_nbdkit(f"name={derived.name}", "layer=auto", verbose=True,
                        run='nbdinfo --json "$uri"')
    assert json.loads(result.stdout)["exports"][0]["description"].startswith(
        f"layer 1 of 2: {derived.diff_ids[1]}")
    assert "disk/disk.qcow2 of layer 0 (replaced by layer 1)" in result.stderr


def test_a_whited_out_disk_is_not_the_disk(lab):
    layers = [tar_layer([directory("disk/"), regular("disk/old.img", b"old" * 100)]),
              tar_layer([whiteout("disk/old.img"), regular("disk/new.img", b"new" * 100)])]
    with lab.loaded("localhost/cdi-test/whited-out:1", layers) as image:
        assert read_export(f"name={image.name}", export_name="disk") == b"new" * 100


def test_several_candidate_disks_are_an_error_that_lists_them(lab):
    layers = [tar_layer([regular("disk/a.img", b"a" * 100)]),
              tar_layer([regular("disk/b.img", b"b" * 100)])]
    with lab.loaded("localhost/cdi-test/two-disks:1", layers) as image:
        assert nbdkit_error(f"name={image.name}", "layer=disk").rstrip().endswith(
            f"error: {image.name}: 2 candidate VM disks: disk/a.img (layer 0), "
            "disk/b.img (layer 1); serve one with layer=N --filter=tar tar-entry=PATH")


def test_a_single_file_at_the_root_is_the_disk(lab):
    layers = [tar_layer([regular("vm.qcow2", b"q" * 1000)])]
    with lab.loaded("localhost/cdi-test/root-file:1", layers) as image:
        assert read_export(f"name={image.name}", export_name="disk") == b"q" * 1000


# ------------------------------------------------------------------ archives

@pytest.mark.parametrize("format_name", ["oci-archive", "docker-archive"])
def test_an_archive_is_served_and_leaves_podman_storage_unchanged(lab, three, disk,
                                                                  format_name):
    archive = os.path.join(lab.workdir, f"three.{format_name}.tar")
    podman("save", "--quiet", "--format", format_name, "-o", archive, three.name)
    podman("rmi", three.name)
    before = podman("images", "--all", "--format", "{{.ID}} {{.Names}}")
    try:
        assert read_export(f"name={format_name}:{archive}", export_name="disk") == disk[1]
        data = read_export(f"name={format_name}:{archive}", "layer=1")
        assert sha256(data) == three.diff_ids[1]
        assert podman("images", "--all", "--format", "{{.ID}} {{.Names}}") == before
    finally:
        os.unlink(archive)
        podman("pull", "--quiet", f"{lab.registry}/cdi-test/three:1")
        podman("tag", f"{lab.registry}/cdi-test/three:1", three.name)
