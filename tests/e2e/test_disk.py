"""The containerdisk pipeline: layer -> tar filter -> qcow2 -> raw disk."""

import json
import os

from conftest import run_nbdkit


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
