"""A tiny bootable VM disk of the tests' own making, and a VM that boots it.

The disk is what a BIOS boots: an MBR (syslinux's) and one FAT partition
holding syslinux, the distribution's kernel (/boot/vmlinuz-*) and an
initramfs of busybox whose /init prints a token on the serial console and
powers off.  qemu boots it with TCG, so no KVM is needed; the token on the
console shows that the VM ran what the disk holds, read over NBD.
"""

import glob
import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MIB = 1 << 20
PARTITION_START = MIB  # sector 2048, where partitioning tools put the first
PARTITION_SIZE = 20 * MIB
SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"
BUSYBOX = "/bin/busybox"  # busybox-static's: it needs no library in the initramfs
BOOT_CONFIG = """\
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet panic=-1
"""
INIT = """\
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
echo "{line}" > /dev/ttyS0
/bin/busybox poweroff -f
"""


def token_line(token):
    """The line the VM's init prints."""
    return f"cdi-py test VM booted: {token}"


def kernel():
    """The distribution's newest kernel."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    assert kernels, "no kernel in /boot: make setup installs linux-image-amd64"
    return kernels[-1]


def make_boot_disk(path, token, behind=0, size=None):
    """Write at PATH a raw disk that boots and prints token_line(TOKEN);
    with BEHIND, its partition (the boot files) sits behind that many bytes
    of random data; SIZE, if given, is the disk's size (zeros at its end)."""
    start = PARTITION_START + -(-behind // MIB) * MIB
    work = Path(tempfile.mkdtemp(prefix="boot-disk-", dir=Path(path).parent))
    try:
        initrd = work / "initrd"
        (initrd / "bin").mkdir(parents=True)
        (initrd / "dev").mkdir()
        shutil.copy(BUSYBOX, initrd / "bin" / "busybox")
        (initrd / "init").write_text(INIT.format(line=token_line(token)))
        (initrd / "init").chmod(0o755)
        names = sorted(os.path.relpath(os.path.join(root, name), initrd)
                       for root, directories, files in os.walk(initrd)
                       for name in directories + files)
        archive = subprocess.run(["cpio", "--create", "--format=newc", "--quiet",
                                  "--owner=0:0"], input="\n".join(names).encode(),
                                 cwd=initrd, check=True, capture_output=True).stdout
        (work / "initrd.gz").write_bytes(gzip.compress(archive))
        (work / "syslinux.cfg").write_text(BOOT_CONFIG)
        shutil.copy(kernel(), work / "vmlinuz")

        partition = work / "partition"
        run("mkfs.fat", "-C", "-h", str(start // 512), "-n", "CDIBOOT",
            str(partition), str(PARTITION_SIZE // 1024))
        run("mcopy", "-i", str(partition), *(str(work / name) for name in
                                            ("vmlinuz", "initrd.gz", "syslinux.cfg")), "::")
        run("syslinux", "--install", str(partition))

        with open(path, "wb") as disk:
            disk.truncate(PARTITION_START)
            disk.seek(PARTITION_START)
            for _ in range(0, start - PARTITION_START, MIB):
                disk.write(os.urandom(MIB))
            with open(partition, "rb") as source:
                shutil.copyfileobj(source, disk)
            if size is not None:
                disk.truncate(size)
        subprocess.run(["sfdisk", "--quiet", str(path)], check=True, capture_output=True,
                       input=f"start={start // 512}, type=c, bootable\n".encode())
        with open(SYSLINUX_MBR, "rb") as mbr, open(path, "r+b") as disk:
            disk.write(mbr.read(440))  # the boot code, before the partition table
    finally:
        shutil.rmtree(work)


def boot(uri, disk_format, timeout=180):
    """Boot a VM from the NBD export at URI, whose bytes are DISK_FORMAT
    (raw or qcow2), with TCG; return what it printed on its serial console
    until it powered off."""
    result = subprocess.run(
        ["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "256", "-nodefaults",
         "-display", "none", "-serial", "stdio", "-no-reboot",
         "-drive", f"file={uri},format={disk_format},if=virtio,readonly=on"],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    console = result.stdout.decode(errors="replace")
    assert result.returncode == 0, \
        f"qemu exit status {result.returncode}: {result.stderr.decode(errors='replace')}" \
        f"\nconsole: {console}"
    return console


def run(*argv):
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
