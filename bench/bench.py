"""make bench: cdi.py against a reference measured in the same run.

Each row alternates cdi.py and its reference round by round and reports
medians; the table goes to stdout, progress to stderr.  See README.md.

  BENCH_SIZE  size of the big layers and disks (default 1G; 64M for a smoke run)
  BENCH_RUNS  rounds (default 5)
"""

import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd

for directory in ("tests", "tests/e2e"):  # lab.py, and tars.py, which it takes
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / directory))
from lab import CDI, MIB, NBDKIT, Blob, Lab, check_passed, push_artifact, wait_for  # noqa: E402

BARE = str(Path(__file__).resolve().parent / "bare.py")
DISK = "disk/disk.img"
SPARSE_DATA = 8 * MIB
# -v for cdi.py's "verified layer" line, without a line per request.
VERBOSE = ["-v", "-D", "nbdkit.backend.datapath=0"]
TOP = {"etc/hello.txt": b"hello from the top layer\n"}


@dataclass
class Row:
    title: str
    measure: object          # measure(flip) -> ((seconds, cpu) of cdi.py, of the reference)
    unit: str                # "MiB/s", "ms" or "s"
    target: str
    passes: object           # passes(median ratio, median seconds) -> bool
    size: int = 0            # bytes per copy, for MiB/s and CPU s/GiB
    speed: bool = True       # ratio = reference time / time; else time / reference time
    pairs: list = field(default_factory=list)

    def ratios(self):
        return [(theirs[0] / ours[0]) if self.speed else (ours[0] / theirs[0])
                for ours, theirs in self.pairs]

    def cells(self):
        ours, theirs = zip(*self.pairs)
        ratios = self.ratios()
        median = statistics.median(ratios)
        seconds = statistics.median(sample[0] for sample in ours)
        return [self.show(ours), self.show(theirs),
                f"{median:.2f}x ({min(ratios):.2f}–{max(ratios):.2f})", self.target,
                "PASS" if self.passes(median, seconds) else "**MISS**",
                f"{self.cpu(ours)} / {self.cpu(theirs)}"]

    def show(self, samples):
        seconds = statistics.median(sample[0] for sample in samples)
        if self.unit == "MiB/s":
            return f"{self.size / MIB / seconds:.0f} MiB/s"
        if self.unit == "MiB":  # bytes, not seconds
            return f"{seconds / MIB:.1f} MiB"
        return f"{seconds * 1000:.1f} ms" if self.unit == "ms" else f"{seconds:.3f} s"

    def cpu(self, samples):
        if samples[0][1] is None:
            return "–"
        cpu = statistics.median(sample[1] for sample in samples)
        return f"{cpu / (self.size / (1 << 30)):.2f}" if self.size else f"{cpu:.2f} s"


class Bench:
    def __init__(self, lab, size, runs):
        self.lab, self.size, self.runs = lab, size, runs
        self.rows = []

    def run(self):
        self.build_images()
        with self.cdi(self.full, verbose=True) as steady:
            reference = self.lab.workdir / "layer.tar"
            subprocess.run(["nbdcopy", steady.uri(), str(reference)], check=True)
            with open(reference, "rb") as file:
                digest = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
            assert digest == self.full.diff_ids[0], "the export is not the layer"
            wait_verified(steady)
            self.first_and_later(self.sparse)  # its check remembered, as for full
            with self.lab.nbdkit(["python", BARE, f"file={reference}"]) as bare, \
                    self.lab.nbdkit(["file", str(reference)]) as plain:
                self.rows = self.plan(steady, bare, plain, os.path.getsize(reference))
                for round_number in range(self.runs):
                    log(f"round {round_number + 1}/{self.runs}")
                    for row in self.rows:
                        row.pairs.append(row.measure(round_number % 2 == 1))

    def plan(self, steady, bare, plain, layer_size):
        size = describe(self.size)
        return [
            Row(f"first nbdcopy after a warm start, its check running, vs a later one "
                f"({size} random layer)",
                lambda flip: self.first_and_later(self.full, fresh_cache=True),
                "MiB/s", ">= 0.9x",
                lambda ratio, _: ratio >= 0.9, size=layer_size),
            Row(f"first copy through the tar filter: {describe(SPARSE_DATA)} of data in a "
                f"{size} disk vs a full one",
                alternate(lambda: self.first_copy(self.sparse),
                          lambda: self.first_copy(self.full)),
                "MiB/s", "<= 0.2x (time)", lambda ratio, _: ratio <= 0.2, size=self.size,
                speed=False),
            Row("steady nbdcopy vs bare.py (one os.preadv) on the same bytes",
                alternate(lambda: copy(steady), lambda: copy(bare)),
                "MiB/s", ">= 0.95x", lambda ratio, _: ratio >= 0.95, size=layer_size),
            Row("steady nbdcopy vs nbdkit file on the same bytes",
                alternate(lambda: copy(steady), lambda: copy(plain)),
                "MiB/s", ">= 0.9x", lambda ratio, _: ratio >= 0.9, size=layer_size),
            Row("first open of the default export (small top layer), with a 15,000-file "
                "base layer vs without",
                alternate(lambda: self.first_open(self.many, "layer=-1"),
                          lambda: self.first_open(self.small)),
                "ms", "<= 5 ms", lambda _, seconds: seconds <= 0.005, speed=False),
            Row("warm ready, one layer of 20,000 small files vs one small file",
                alternate(lambda: self.ready(self.files), lambda: self.ready(self.small)),
                "s", "<= 0.5 s", lambda _, seconds: seconds <= 0.5, speed=False),
            Row(f"warm ready of an ORAS artifact ({size} raw disk) from the cache vs the "
                "same disk as an image in podman's storage",
                alternate(lambda: self.ready(self.artifact), lambda: self.ready(self.full)),
                "s", "<= 1.1x", lambda ratio, _: ratio <= 1.1, speed=False),
        ]

    def build_images(self):
        log(f"building images ({describe(self.size)} layers)")
        lab = self.lab
        self.full = lab.build("localhost/bench/full:1", [{DISK: random_file(self.size)}])
        self.sparse = lab.build("localhost/bench/sparse:1", [{DISK: sparse_file(self.size)}])
        self.small = lab.build("localhost/bench/small:1", [TOP])
        self.many = lab.build("localhost/bench/many:1", [small_files(15_000), TOP])
        self.files = lab.build("localhost/bench/files:1", [small_files(20_000)])
        self.artifact = Artifact(f"{lab.registry}/bench/artifact:1")
        disk = lab.workdir / "artifact.img"
        random_file(self.size)(disk)
        try:
            push_artifact(lab.workdir, self.artifact.name,
                          [Blob("application/vnd.oci.image.layer.v1.tar", disk, "disk.img")])
        finally:
            disk.unlink()
        with self.cdi(self.artifact) as server:
            copy(server)  # read whole into the cache: later starts are warm

    def cdi(self, image, *params, filters=(), verbose=False, ready=True, env=None):
        """A fresh cdi.py server (ready when READY); VERBOSE for its
        "verified" line."""
        return self.lab.nbdkit([*(VERBOSE if verbose else []),
                                *(f"--filter={name}" for name in filters),
                                "python", CDI, f"name={image.name}", *params],
                               ready=ready, env=env)

    def first_and_later(self, image, fresh_cache=False):
        """The first copy from a fresh server and one once the layer passed
        its check.  With FRESH_CACHE, cdi.py remembers no check: it checks
        the layer during the first copy."""
        env = None
        if fresh_cache:
            cache = tempfile.mkdtemp(prefix="cache-", dir=self.lab.workdir)
            env = dict(os.environ, XDG_CACHE_HOME=cache)
        with self.cdi(image, verbose=True, env=env) as server:
            first = copy(server)
            wait_verified(server)
            return first, copy(server)

    def first_copy(self, image):
        with self.cdi(image, f"tar-entry={DISK}", filters=["tar"]) as server:
            return copy(server)

    def first_open(self, image, *params):
        """Seconds from connecting to the first byte read, right after ready."""
        with self.cdi(image, *params) as server:
            handle = nbd.NBD()
            started = time.perf_counter()
            handle.connect_unix(server.socket)
            handle.pread(1, 0)
            seconds = time.perf_counter() - started
            handle.shutdown()
            return seconds, None

    def ready(self, image):
        """Seconds from exec until nbdkit has written its pidfile."""
        with self.cdi(image, ready=False) as server:
            return server.wait_ready(), cpu_seconds(server.pid)

    def report(self):
        nbdkit = subprocess.run([NBDKIT, "--version"], capture_output=True, text=True,
                                check=False).stdout.split("\n")[0]
        lines = [f"## cdi.py bench: {describe(self.size)}, median of {self.runs} rounds",
                 "", f"{os.cpu_count()} cores, {nbdkit}, {time.strftime('%Y-%m-%d %H:%M')}.",
                 "", "| # | measurement | cdi.py | reference | ratio (min–max) | target "
                 "| result | CPU s/GiB cdi.py / reference |", "|---" * 8 + "|"]
        for number, row in enumerate(self.rows, 1):
            if row.pairs:
                lines.append(f"| {number} | {row.title} | " + " | ".join(row.cells()) + " |")
        return "\n".join(lines) + "\n"


@dataclass
class Artifact:
    name: str


def alternate(ours, theirs):
    """measure(flip): (ours(), theirs()), measured in that order, or in the
    other with FLIP."""
    def measure(flip):
        if flip:
            reference = theirs()
            return ours(), reference
        return ours(), theirs()
    return measure


def copy(server):
    """(wall seconds, the server's CPU seconds) of nbdcopy URI null:."""
    before = cpu_seconds(server.pid)
    started = time.perf_counter()
    subprocess.run(["nbdcopy", server.uri(), "null:"], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started, cpu_seconds(server.pid) - before


def cpu_seconds(pid):
    """User + system CPU time of process PID, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_verified(server):
    wait_for(lambda: check_passed(server.log(), 0), 3600,
             lambda: f"layer 0 not verified: {server.log()[-2000:]}", interval=0.05)


def random_file(size):
    """Fills a file with SIZE random bytes: incompressible, no holes."""
    def write(path):
        with open(path, "wb") as file:
            for offset in range(0, size, 8 * MIB):
                file.write(os.urandom(min(8 * MIB, size - offset)))
    return write


def sparse_file(size):
    """Fills a file of SIZE bytes, zeros but for SPARSE_DATA random bytes in
    eight pieces spread over it."""
    def write(path):
        with open(path, "wb") as file:
            file.truncate(size)
            piece = SPARSE_DATA // 8
            for index in range(8):
                file.seek(index * (size // 8))
                file.write(os.urandom(piece))
    return write


def small_files(count):
    """A layer of COUNT files of 1 byte to 4 KiB, 256 to a directory."""
    return {f"files/{index // 256:03d}/{index:05d}": os.urandom(index % 4096 + 1)
            for index in range(count)}


def describe(size):
    return f"{size >> 30} GiB" if size % (1 << 30) == 0 else f"{size >> 20} MiB"


def parse_size(text):
    match = re.fullmatch(r"([0-9]+)([MG])", text.strip().upper())
    if not match:
        raise SystemExit(f"BENCH_SIZE={text!r}: expected a size such as 64M or 1G")
    return int(match.group(1)) << (30 if match.group(2) == "G" else 20)


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)  # the lab cleans up on the way out
    size = parse_size(os.environ.get("BENCH_SIZE") or "1G")
    runs = int(os.environ.get("BENCH_RUNS") or "5")
    if size < 2 * SPARSE_DATA or runs < 1:
        raise SystemExit("BENCH_SIZE must be at least 16M and BENCH_RUNS at least 1")
    with Lab("cdi-bench-", parent="/var/tmp") as lab:
        log(f"working in {lab.workdir}")
        bench = Bench(lab, size, runs)
        try:
            bench.run()
        finally:
            sys.stdout.write(bench.report())


if __name__ == "__main__":
    main()
