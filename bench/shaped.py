"""make bench-shaped: a VM disk served before it has arrived, over a link
shaped like a real one, against the download of the same blob.

It runs in a network namespace of its own (unshare --net, as root): the
registry's traffic is shaped to SHAPED_RATE on its loopback (htb, a class
for what the registry sends), and cdi.py reaches the registry through a
proxy (tests/e2e/httplab.py) that adds SHAPED_RTT to each request.  The
disks are bootable (tests/e2e/vm.py), their boot files behind their data:
512 MiB with the partition at 441 MiB, 2 GiB at 1,985 MiB, pushed as ORAS
artifacts of one raw blob; the 512 MiB one also as a containerdisk (FROM
scratch, disk/disk.img its only file, the gzip layer podman pushes).
Every cdi.py start is cold: a cache of its own.

Rows 20 to 23 are a cluster: four nodes (four cdi.py, each a cache of
its own) booting the 512 MiB disk one after another through one
pull-through cache (Distribution in proxy mode, cold at each round) on
the nodes' side of the shaped link, the upstream registry on the other.

Rows 24 to 26 boot the 512 MiB containerdisk as each shape of layer costs
it cold: gzip (streamed), zstd:chunked (pushed so by podman) and eStargz
(converted by ctr-remote, with a containerd of the bench's own), against
the same boot from a local copy of the disk.

  BENCH_RUNS   rounds (default 3)
  SHAPED_RATE  the link (default 200mbit)
  SHAPED_RTT   seconds added to each request (default 0.010)
  SHAPED_ROWS  the rows to measure, as "8,20-23" (default all)
"""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

HERE = Path(__file__).resolve().parent
for directory in (HERE.parent, HERE.parent / "tests", HERE.parent / "tests/e2e", HERE):
    sys.path.insert(0, str(directory))
from bench import Row, log  # noqa: E402
from cdipy.oci.chunks import CHUNK  # noqa: E402
from httplab import Proxy  # noqa: E402
from lab import (  # noqa: E402
    CDI,
    MIB,
    Blob,
    Lab,
    export_digest,
    podman,
    push_artifact,
    push_estargz,
    registry,
)
from vm import make_boot_disk, token_line  # noqa: E402

ORAS_LAYER = "application/vnd.oci.image.layer.v1.tar"
DISKS = {"512 MiB": (512 * MIB, 440 * MIB), "2 GiB": (2048 * MIB, 1984 * MIB)}


class Disk:
    """What NAME in the registry holds: a blob of SIZE bytes (DIGEST: of the
    file at PATH, unless given), a disk whose VM prints TOKEN."""

    def __init__(self, name, size, path, token, digest=None):
        self.name, self.size, self.path, self.token = name, size, path, token
        self.disk_digest = self.digest = digest
        if digest is not None:
            return
        with open(path, "rb") as file:
            digest = hashlib.sha256()
            for block in iter(lambda: file.read(8 * MIB), b""):
                digest.update(block)
        self.disk_digest = self.digest = "sha256:" + digest.hexdigest()


# The first row's number; a cluster's nodes.
FIRST_ROW = 8
NODES = 4


class Shaped:
    def __init__(self, lab, runs, rtt, chosen=None):
        self.lab, self.runs, self.rtt, self.chosen = lab, runs, rtt, chosen
        self.rows = []
        self.made = {}

    def disk(self, label):
        """The disk LABEL (a key of DISKS), made and pushed at its first use."""
        if label not in self.made:
            self.made[label] = self.make(label, *DISKS[label])
        return self.made[label]

    def containerdisk(self, shape="gzip"):
        """The 512 MiB disk as a containerdisk whose layer is SHAPE: gzip,
        zstd:chunked or eStargz."""
        if shape not in self.made:
            self.made[shape] = self.make_containerdisk(self.disk("512 MiB"), shape)
        return self.made[shape]

    def run(self, rate):
        shape(self.lab.registry.split(":")[1], rate)
        with Proxy(self.lab.registry) as self.proxy:
            self.proxy.delay = self.rtt
            self.rows = self.define_rows()
            chosen = [row for number, row in enumerate(self.rows, FIRST_ROW)
                      if self.chosen is None or number in self.chosen]
            for number in range(self.runs):
                log(f"round {number + 1}/{self.runs}")
                for row in chosen:
                    row.pairs.append(row.measure(number % 2 == 1))

    def define_rows(self):
        def small():
            return self.disk("512 MiB")

        def big():
            return self.disk("2 GiB")
        image = self.containerdisk
        return [
            Row("cold boot (nbdkit start to the VM's first console line), 512 MiB disk, "
                "vs downloading its blob",
                lambda flip: (self.boot(small()), self.download(small())),
                "s", "<= 0.4x", lambda ratio, _: ratio <= 0.4, speed=False),
            Row("cold boot of the 512 MiB disk vs the same boot from a local copy of the "
                "disk (qemu's TCG alone: the floor)",
                lambda flip: (self.boot(small()), self.boot_local(small())),
                "s", "<= 1.25x", lambda ratio, _: ratio <= 1.25, speed=False),
            Row("cold boot of the 2 GiB disk vs the 512 MiB one",
                lambda flip: (self.boot(big()), self.boot(small())),
                "s", "<= 1.2x", lambda ratio, _: ratio <= 1.2, speed=False),
            Row("cold qemu-img info of the disk export (nbdkit start to its answer), 2 GiB "
                "disk, vs downloading the 512 MiB blob", lambda flip: (
                    self.info(big()), self.download(small())),
                "s", "<= 1 s", lambda _, seconds: seconds <= 1.0, speed=False),
            Row("cold full nbdcopy of the disk export (byte-exact), 512 MiB, vs "
                "downloading its blob", lambda flip: (self.copy(small()), self.download(small())),
                "s", "<= 1.1x", lambda ratio, _: ratio <= 1.1, speed=False),
            Row("blob bytes fetched for one random 4 KiB read, vs one chunk",
                lambda flip: ((self.one_read(big()), None), (CHUNK, None)),
                "MiB", "1 chunk", lambda ratio, _: ratio <= 1.0, speed=False),
            Row("blob bytes fetched for a cold full copy, vs the blob (512 MiB)",
                lambda flip: ((self.last_copy_bytes, None), (small().size, None)),
                "MiB", "<= 1.02x", lambda ratio, _: ratio <= 1.02, speed=False),
            Row("peak RSS of nbdkit during a cold full copy (512 MiB), vs 64 MiB",
                lambda flip: ((self.last_copy_rss, None), (64 * MIB, None)),
                "MiB", "<= 64 MiB", lambda ratio, _: ratio <= 1.0, speed=False),
            Row("containerdisk (gzip layer, 512 MiB disk): cold qemu-img info of the disk "
                "export (nbdkit start to its answer) vs downloading the layer",
                lambda flip: (self.info(image()), self.download(image())),
                "s", "<= 0.3x", lambda ratio, _: ratio <= 0.3, speed=False),
            Row("containerdisk: cold full nbdcopy of the disk export (byte-exact) vs "
                "downloading the layer",
                lambda flip: (self.copy(image()), self.download(image())),
                "s", "<= 1.05x", lambda ratio, _: ratio <= 1.05, speed=False),
            Row("containerdisk: peak disk space taken during the cold full copy, vs the "
                "disk once", lambda flip: ((self.last_copy_space, None),
                                           (image().disk_size, None)),
                "MiB", "<= 1x", lambda ratio, _: ratio <= 1.0, speed=False),
            Row("containerdisk: peak RSS of nbdkit during the cold full copy, vs 64 MiB",
                lambda flip: ((self.last_copy_rss, None), (64 * MIB, None)),
                "MiB", "<= 64 MiB", lambda ratio, _: ratio <= 1.0, speed=False),
            Row("four nodes through one cold pull-through cache: cold boot of the 4th "
                "node vs the 1st", lambda flip: self.cluster_boots(small()),
                "s", "<= 0.5x", lambda ratio, _: ratio <= 0.5, speed=False),
            Row("four nodes: blob bytes the upstream sends, vs the blob",
                lambda flip: ((self.cluster.upstream, None), (small().size, None)),
                "MiB", "<= 1.1x", lambda ratio, _: ratio <= 1.1, speed=False),
            Row("four nodes: blob bytes the 1st node fetches (the cold cache's whole "
                "answer), vs the blob",
                lambda flip: ((self.cluster.fetched[0], None), (small().size, None)),
                "MiB", "<= 1.02x", lambda ratio, _: ratio <= 1.02, speed=False),
            Row("four nodes: blob bytes the 2nd to 4th nodes fetch (the most of them), vs "
                "a lone node's cold boot from the registry itself",
                lambda flip: ((max(self.cluster.fetched[1:]), None),
                              self.lone_boot_bytes(small())),
                "MiB", "<= 1.1x", lambda ratio, _: ratio <= 1.1, speed=False),
            *[Row(f"containerdisk, {shape} layer (512 MiB disk, boot files behind 440 MiB): "
                  "cold boot vs the same boot from a local copy of the disk",
                  lambda flip, shape=shape: (self.boot(self.containerdisk(shape)),
                                             self.boot_local(small())),
                  "s", target, lambda ratio, _, most=most: ratio <= most, speed=False)
              for shape, target, most in (("gzip", "(streamed)", float("inf")),
                                          ("zstd:chunked", "<= 1.25x", 1.25),
                                          ("eStargz", "<= 1.25x", 1.25))],
        ]

    def make(self, label, size, behind):
        log(f"making the {label} disk and pushing it")
        path = self.lab.workdir / f"boot-{size}.raw"
        token = os.urandom(8).hex()
        make_boot_disk(path, token, behind=behind, size=size)
        name = f"bench/boot-{size}:1"
        push_artifact(self.lab.workdir, f"{self.lab.registry}/{name}",
                      [Blob(ORAS_LAYER, path, "disk.img")])
        return Disk(name, size, path, token)

    def make_containerdisk(self, disk, shape):
        """An image FROM scratch holding DISK's file as disk/disk.img, pushed
        by podman (one layer of SHAPE: gzip or zstd:chunked; eStargz is the
        zstd:chunked one converted by ctr-remote): a Disk of its layer's
        blob.  Each shape's layer holds a file of its own: podman would
        otherwise push again a blob it pushed in another compression."""
        log(f"making a {shape} containerdisk of the 512 MiB disk and pushing it")
        slug = shape.replace(":", "-").lower()
        tag, name = f"localhost/bench/containerdisk-{slug}:1", f"bench/containerdisk-{slug}:1"
        if shape == "eStargz":
            source = self.containerdisk("zstd:chunked").name
            push_estargz(self.lab, source, name)
        else:
            self.lab.build(tag, [{"disk/disk.img": lambda path: shutil.copyfile(disk.path, path),
                                  "etc/bench-shape": shape.encode()}])
            compression = ["--compression-format=zstd:chunked"] if shape != "gzip" else []
            podman("push", "--quiet", *compression, tag, f"docker://{self.lab.registry}/{name}")
            podman("rmi", "--force", tag)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false",
             f"docker://{self.lab.registry}/{name}"],
            check=True, capture_output=True, text=True).stdout)
        layer = manifest["layers"][0]
        image = Disk(name, layer["size"], disk.path, disk.token, digest=layer["digest"])
        image.disk_size, image.disk_digest = disk.size, disk.digest
        return image

    def cold(self, disk, registry_address=None):
        """A cold cdi.py serving DISK from the registry at REGISTRY_ADDRESS
        (default: through the proxy), not yet ready."""
        cache = tempfile.mkdtemp(prefix="cache-", dir=self.lab.workdir)
        return self.lab.nbdkit(["python", CDI,
                                f"name={registry_address or self.proxy.address}/{disk.name}",
                                f"cache={cache}", "tls-verify=false", "layer=disk"],
                               ready=False)

    def download(self, disk):
        started = time.monotonic()
        subprocess.run(["curl", "--silent", "--fail", "--output", "/dev/null",
                        f"http://{self.lab.registry}/v2/{disk.name.split(':')[0]}/blobs/"
                        f"{disk.digest}"], check=True)
        return time.monotonic() - started, None

    def boot(self, disk, registry_address=None):
        started = time.monotonic()
        with self.cold(disk, registry_address) as server:
            server.wait_ready()
            return self.until_token(server.uri(), disk, started)

    def cluster_boots(self, disk):
        """NODES cold cdi.py (caches of their own) booting DISK one after
        another through one cold pull-through cache of the registry (behind
        the proxy, on the far side of the shaped link): ((the last node's
        boot, None), (the first's, None)); what the upstream sent and what
        each node fetched in self.cluster."""
        with registry(self.lab.workdir, f"pull-through-{os.urandom(3).hex()}",
                      proxy_of=self.proxy.address) as cache, Proxy(cache.address) as nodes:
            upstream = self.proxy.blob_bytes
            boots, fetched = [], []
            for number in range(NODES):
                before = nodes.blob_bytes
                boots.append(self.boot(disk, nodes.address))
                fetched.append(nodes.blob_bytes - before)
                log(f"node {number + 1}: booted in {boots[-1][0]:.1f} s, fetched "
                    f"{fetched[-1] / MIB:.1f} MiB; the upstream has sent "
                    f"{(self.proxy.blob_bytes - upstream) / MIB:.1f} MiB")
            self.cluster = Cluster(self.proxy.blob_bytes - upstream, fetched)
        return boots[-1], boots[0]

    def lone_boot_bytes(self, disk):
        """(Blob bytes a lone cold node fetches to boot DISK from the registry
        itself, None)."""
        before = self.proxy.blob_bytes
        seconds, _ = self.boot(disk)
        fetched = self.proxy.blob_bytes - before
        log(f"a lone node: booted in {seconds:.1f} s, fetched {fetched / MIB:.1f} MiB")
        return fetched, None

    def boot_local(self, disk):
        return self.until_token(str(disk.path), disk, time.monotonic())

    @staticmethod
    def until_token(drive, disk, started):
        """Seconds from STARTED until the VM booted from DRIVE prints its token."""
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "256", "-nodefaults",
             "-display", "none", "-serial", "stdio", "-no-reboot", "-drive",
             f"file={drive},format=raw,if=virtio,readonly=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            for line in qemu.stdout:
                if token_line(disk.token).encode() in line:
                    return time.monotonic() - started, None
            raise AssertionError("the VM did not print its token")
        finally:
            qemu.kill()
            qemu.wait()

    def info(self, disk):
        started = time.monotonic()
        with self.cold(disk) as server:
            server.wait_ready()
            subprocess.run(["qemu-img", "info", server.uri()], check=True,
                           stdout=subprocess.DEVNULL)
            return time.monotonic() - started, None

    def copy(self, disk):
        started = time.monotonic()
        before = self.proxy.blob_bytes
        free = FreeSpace(self.lab.workdir)
        with self.cold(disk) as server, free:
            server.wait_ready()
            digest = export_digest(server.uri())
            seconds = time.monotonic() - started
            assert digest == disk.disk_digest, "not byte-exact"
            with open(f"/proc/{server.pid}/status") as status:
                self.last_copy_rss = next(int(line.split()[1]) * 1024 for line in status
                                          if line.startswith("VmHWM:"))
        self.last_copy_bytes = self.proxy.blob_bytes - before
        self.last_copy_space = free.least_taken
        return seconds, None

    def one_read(self, disk):
        with self.cold(disk) as server:
            server.wait_ready()
            before = self.proxy.blob_bytes
            handle = nbd.NBD()
            handle.connect_unix(server.socket)
            offset = random.randrange(CHUNK * 8, disk.size - 4096) & ~4095
            handle.pread(4096, offset)
            handle.shutdown()
            return self.proxy.blob_bytes - before

    def report(self, rate):
        lines = [f"## cdi.py shaped bench: {rate}, {self.rtt * 1000:.0f} ms per request, "
                 f"median of {self.runs} rounds", "",
                 "| # | measurement | cdi.py | reference | ratio (min–max) | target | result |",
                 "|---" * 7 + "|"]
        for number, row in enumerate(self.rows, FIRST_ROW):
            if row.pairs:
                lines.append(f"| {number} | {row.title} | "
                             + " | ".join(row.cells()[:5]) + " |")
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Cluster:
    """What a round of the cluster rows saw: blob bytes the UPSTREAM sent
    (to the pull-through cache), and each node FETCHED (from it)."""
    upstream: int
    fetched: list


class FreeSpace:
    """While entered, the most space taken on the filesystem of DIRECTORY
    since (sampled every 0.1 s): least_taken, in bytes."""

    def __init__(self, directory):
        self.directory, self.least_taken = directory, 0

    def free(self):
        status = os.statvfs(self.directory)
        return status.f_bavail * status.f_frsize

    def __enter__(self):
        self.before, self.done = self.free(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.1):
            self.least_taken = max(self.least_taken, self.before - self.free())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def shape(port, rate):
    """What the registry on PORT sends goes at RATE; all else unshaped."""
    for command in (["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb",
                     "default", "20"],
                    ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10",
                     "htb", "rate", rate, "ceil", rate, "burst", "256k"],
                    ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20",
                     "htb", "rate", "40gbit"],
                    ["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", "sport", port, "0xffff",
                     "flowid", "1:10"]):
        subprocess.run(command, check=True, capture_output=True)


def row_numbers(text):
    """The row numbers TEXT names ("8,20-23"), or None (every row) if empty."""
    if not text.strip():
        return None
    numbers = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        numbers.update(range(int(first), int(last or first) + 1))
    return numbers


def main():
    if os.geteuid() != 0:
        raise SystemExit("make bench-shaped: run as root (a network namespace, tc)")
    if sys.argv[1:] != ["--inside"]:
        os.execvp("unshare", ["unshare", "--net", "--", sys.executable, __file__, "--inside"])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rate = os.environ.get("SHAPED_RATE") or "200mbit"
    rtt = float(os.environ.get("SHAPED_RTT") or "0.010")
    runs = int(os.environ.get("BENCH_RUNS") or "3")
    chosen = row_numbers(os.environ.get("SHAPED_ROWS") or "")
    with Lab("cdi-shaped-", parent="/var/tmp") as lab:
        log(f"working in {lab.workdir}")
        bench = Shaped(lab, runs, rtt, chosen)
        try:
            bench.run(rate)
        finally:
            sys.stdout.write(bench.report(rate))


if __name__ == "__main__":
    main()
