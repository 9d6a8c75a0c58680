"""A real VM boots from the disk export, and the C plugin's headline example
(qcow2dec over tar) gives back the source disk byte for byte.

The disk is a tiny one of the tests' own making (vm.py): the
distribution's kernel and a busybox initramfs that prints a token on the
serial console.  qemu boots it with TCG from the NBD export; seeing the
token shows that the VM ran the bytes cdi.py served.
"""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import copy_export, serve
from lab import Blob, podman, push_artifact, sha256
from tars import directory, regular, tar_layer
from vm import boot, make_boot_disk, token_line

ORAS_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class BootDisk:
    raw: Path
    qcow2: Path
    token: str


@pytest.fixture(scope="module")
def boot_disk(lab):
    """The bootable disk, raw and as qcow2 (as containerdisks ship it)."""
    token = os.urandom(8).hex()
    raw, qcow2 = Path(lab.workdir) / "boot.raw", Path(lab.workdir) / "boot.qcow2"
    make_boot_disk(raw, token)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    yield BootDisk(raw, qcow2, token)
    raw.unlink()
    qcow2.unlink()


@pytest.fixture(scope="module")
def boot_containerdisk(lab, boot_disk):
    """A classic containerdisk of one layer, the qcow2 at ./disk/downloaded
    (KubeVirt's demo images name their entries so), as the C plugin's
    example has it."""
    layer = tar_layer([directory("./disk/"),
                       regular("./disk/downloaded", boot_disk.qcow2.read_bytes())])
    with lab.loaded(f"localhost/cdi-test/boot-{boot_disk.token}:1", [layer]) as image:
        yield image


def test_a_vm_boots_from_the_disk_export_of_a_containerdisk(lab, boot_disk,
                                                            boot_containerdisk):
    with serve(lab, f"name={boot_containerdisk.name}", "layer=disk") as nbdkit:
        console = boot(nbdkit.uri(), "qcow2")
    assert token_line(boot_disk.token) in console


def test_a_vm_boots_from_the_disk_export_of_an_oras_artifact(lab, boot_disk):
    remote = f"{lab.registry}/cdi-test/boot-oras:{boot_disk.token}"
    push_artifact(lab.workdir, remote, [Blob(ORAS_LAYER, boot_disk.qcow2, "disk.qcow2")])
    with serve(lab, f"name={remote}", "tls-verify=false", "layer=disk") as nbdkit:
        console = boot(nbdkit.uri(), "qcow2")
    assert token_line(boot_disk.token) in console


def test_a_vm_boots_from_a_derived_containerdisk_while_it_streams_in(lab, boot_disk):
    """Pushed by podman (gzip layers): a base whose disk the next layer
    replaces with the bootable one, and a small layer on top; streamed from
    the registry, not pulled."""
    tag = f"localhost/cdi-test/boot-derived-{boot_disk.token}:1"
    image = lab.build(tag, [{"disk/disk.qcow2": b"not this one" * 1000},
                            {"disk/disk.qcow2": boot_disk.qcow2.read_bytes()},
                            {"etc/motd": b"derived\n"}])
    remote = f"{lab.registry}/cdi-test/boot-derived:{boot_disk.token}"
    lab.push(image, remote)
    podman("rmi", "--force", image.id)
    cache = tempfile.mkdtemp(prefix="cache-", dir=lab.workdir)
    try:
        with serve(lab, f"name={remote}", f"cache={cache}", "tls-verify=false", "layer=disk",
                   verbose=True) as nbdkit:
            console = boot(nbdkit.uri(), "qcow2")
            log = nbdkit.log()
    finally:
        shutil.rmtree(cache)
    assert token_line(boot_disk.token) in console
    assert "streamed from" in log and "disk/disk.qcow2 of layer 1" in log


# ------------------------------------------------- qcow2dec (nbdkit >= 1.36)

def decoded(*params, filters):
    """(nbdinfo's record of the export, the sha256 of its bytes) of the
    default export served with PARAMS through FILTERS."""
    copy = copy_export(*params, filters=filters, info=[])
    return copy.info["exports"][0], copy.digest


@pytest.mark.requires("qcow2dec")
def test_the_c_plugins_headline_example_gives_back_the_source_disk(boot_disk,
                                                                   boot_containerdisk):
    # nbdkit cdi --filter=qcow2dec --filter=tar tar-entry=./disk/downloaded IMAGE
    info, checksum = decoded(f"name={boot_containerdisk.name}", "tar-entry=./disk/downloaded",
                             filters=["qcow2dec", "tar"])
    assert info["export-size"] == boot_disk.raw.stat().st_size
    assert info["content"].startswith("DOS/MBR boot sector")
    assert checksum == sha256(boot_disk.raw.read_bytes())


@pytest.mark.requires("qcow2dec")
def test_layer_disk_under_qcow2dec_gives_back_the_source_disk(boot_disk, boot_containerdisk):
    info, checksum = decoded(f"name={boot_containerdisk.name}", "layer=disk",
                             filters=["qcow2dec"])
    assert info["export-size"] == boot_disk.raw.stat().st_size
    assert info["content"].startswith("DOS/MBR boot sector")
    assert checksum == sha256(boot_disk.raw.read_bytes())
