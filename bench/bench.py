"""make bench: cdi.py measured side by side with "nbdkit file" serving the
same bytes, and with what the C cdi plugin does to get ready, in one run.
Prints markdown tables on stdout (progress goes to stderr).

Environment:
  BENCH_SIZES  layer sizes of the single-layer images (default "1G 4G").
               The first is the main image, measured in full; the others
               only for time to ready, peak RSS and disk.
  BENCH_RUNS   runs of every measurement (default 5; 3 at most for the
               other sizes).
"""

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lab as lab_module
import measure
import report
from lab import Lab, Server, log, podman, random_file
from measure import Samples

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "cdi.py"
BASELINE = HERE / "baseline.sh"
DISK = "disk/disk.img"
CONNECTIONS = (1, 4)
BLOCKS = (4 << 10, 64 << 10)
READS_PER_RUN = 1000
# Sequential copies are short and noisy on a shared machine: more rounds.
READ_ROUNDS_PER_RUN = 2
SMALL_FILE_AVERAGE = 32 << 10
# The knobs tried on copies of cdi.py: (label, thread model, block_size).
CURRENT_MODEL = "return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS"
BLOCK_SIZE = (1, 64 << 10, 32 << 20)
VARIANTS = (("parallel", "PARALLEL", None),
            ("serialize + block_size", "SERIALIZE_REQUESTS", BLOCK_SIZE),
            ("parallel + block_size", "PARALLEL", BLOCK_SIZE))


def describe_source(snapshot):
    """Which cdi.py SNAPSHOT is: the last commit of cdi.py, whether the
    working tree differed, and the snapshot's own hash."""
    def git(*args):
        return subprocess.run(["git", "-C", str(SOURCE.parent), *args], check=False,
                              capture_output=True, text=True).stdout.strip()
    commit = git("log", "-1", "--format=%h %s", "--", "cdi.py") or "not in git"
    changed = git("status", "--porcelain", "--", "cdi.py")
    digest = hashlib.sha256(snapshot.read_bytes()).hexdigest()[:12]
    return (f"cdi.py sha256 {digest}, last commit {commit}"
            + (" (with uncommitted changes)" if changed else ""))


def parse_size(text):
    """"64M", "1G" or a number of MiB, in bytes."""
    match = re.fullmatch(r"([0-9]+)([MG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise SystemExit(f"BENCH_SIZES: {text!r} is not a size such as 64M or 1G")
    return int(match.group(1)) << (30 if match.group(2).upper() == "G" else 20)


@dataclass
class Image:
    label: str
    name: str          # what cdi.py and the baseline are given
    layer: int         # the layer served (index)
    diff_id: str
    size: int          # bytes of that layer


def fill_disk(size):
    return lambda directory: random_file(directory / DISK, size)


def fill_small_files(total, seed):
    """A rootfs-like layer: many small files, TOTAL bytes in all."""
    def fill(directory):
        chooser = random.Random(seed)
        written = 0
        index = 0
        while written < total:
            size = min(total - written, chooser.randint(1, 2 * SMALL_FILE_AVERAGE))
            path = directory / "files" / f"{index // 256:03d}" / f"f{index:05d}"
            random_file(path, size)
            written += size
            index += 1
    return fill


def fill_text(directory):
    (directory / "etc").mkdir()
    (directory / "etc" / "hello.txt").write_text("hello from the middle layer\n")


def cdi_args(script, image, *params, filters=(), layer=None):
    layer = image.layer if layer is None else layer
    return ([f"--filter={name}" for name in filters]
            + ["python", str(script), f"name={image.name}", f"layer={layer}", *params]
            + ([f"tar-entry={DISK}"] if "tar" in filters else []))


def file_args(path, filters=()):
    return ([f"--filter={name}" for name in filters] + ["file", str(path)]
            + ([f"tar-entry={DISK}"] if "tar" in filters else []))


def make_variant(cdi, workdir, label, model, block_size):
    """A copy of cdi.py with another thread model and/or a block_size
    callback, in the bench's temporary directory; cdi.py is not touched."""
    text = Path(cdi).read_text()
    if CURRENT_MODEL not in text:
        raise RuntimeError(f"cdi.py no longer says {CURRENT_MODEL!r}: update VARIANTS")
    text = text.replace(CURRENT_MODEL, f"return nbdkit.THREAD_MODEL_{model}")
    if block_size:
        text += ("\n\n# bench variant\ndef block_size(layer):\n"
                 f"    return {block_size!r}\n")
    path = workdir / f"cdi-{re.sub('[^a-z]+', '-', label)}.py"
    path.write_text(text)
    return path


@dataclass
class ReadCase:
    """One export served one way: a row of the read tables."""
    export: str        # which layer, e.g. "1-layer, layer 0"
    filtered: bool     # through --filter=tar tar-entry=disk/disk.img
    kind: str          # "cdi", "file", "noextents", a variant, ...
    server: Server
    verify: tuple = ()  # layers cdi.py checks in the background


class Bench:
    def __init__(self, lab, sizes, runs):
        self.lab = lab
        self.sizes = sizes
        self.runs = runs
        self.results = report.Results(sizes=sizes, runs=runs)
        # The cdi.py measured: a snapshot, so that the whole run measures one
        # version even if the working tree changes meanwhile.
        self.cdi = lab.workdir / "cdi.py"
        shutil.copyfile(SOURCE, self.cdi)
        self.results.version = describe_source(self.cdi)
        self.env = dict(os.environ, TMPDIR=str(lab.disk_tmpdir))

    # ------------------------------------------------------------ images

    def build_images(self):
        main = self.sizes[0]
        log(f"building the 1-layer image ({report.mib(main)})")
        info = self.lab.build("localhost/bench/one:1", [fill_disk(main)])
        self.one = Image("1-layer", self.lab.publish("localhost/bench/one:1", "bench/one:1"),
                         0, info["diff_ids"][0], 0)
        log("building the 3-layer image")
        info = self.lab.build("localhost/bench/three:1", [
            fill_small_files(main // 8, seed=8), fill_text, fill_disk(main // 2)])
        self.three = Image("3-layer", self.lab.publish("localhost/bench/three:1",
                                                       "bench/three:1"),
                           2, info["diff_ids"][2], 0)
        self.three_base_diff_id = info["diff_ids"][0]
        self.bigs = []
        for size in self.sizes[1:]:
            log(f"building a 1-layer image of {report.mib(size)}")
            tag = f"localhost/bench/big-{size >> 20}m:1"
            info = self.lab.build(tag, [fill_disk(size)])
            self.bigs.append(Image(f"1-layer {report.mib(size)}", tag, 0,
                                   info["diff_ids"][0], info["size"]))

    # ------------------------------------------------------------ reading

    def reference(self, server, export, diff_id, name):
        """The layer as a plain file, checked against its diffID."""
        path = self.lab.workdir / name
        subprocess.run(["nbdcopy", server.uri(export), str(path)], check=True,
                       stdin=subprocess.DEVNULL)
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(8 << 20):
                digest.update(chunk)
        if "sha256:" + digest.hexdigest() != diff_id:
            raise RuntimeError(f"{name}: the copy does not hash to {diff_id}")
        return path

    def read_cases(self):
        """Start every server of the read measurements; return the cases."""
        lab, one, three = self.lab, self.one, self.three
        for image in (one, three):
            podman("pull", "--quiet", image.name)

        def server(label, args):
            return Server(lab, label, args, env=self.env).start()

        cdi_one = server("cdi 1-layer", cdi_args(self.cdi, one))
        cdi_three = server("cdi 3-layer", cdi_args(self.cdi, three, layer=0))
        cdi_one.wait_ready()
        cdi_three.wait_ready()
        ref_one = self.reference(cdi_one, "", one.diff_id, "one.tar")
        ref_base = self.reference(cdi_three, "0", self.three_base_diff_id, "three-0.tar")
        ref_top = self.reference(cdi_three, "2", three.diff_id, "three-2.tar")
        one.size = ref_one.stat().st_size
        three.size = ref_top.stat().st_size
        tar = ("tar",)
        # The order of filters: the first named is nearest the client.
        tar_noextents = ("tar", "noextents")
        cases = []
        for export, path, filters, cdi_server, verify in (
                ("1-layer, layer 0", ref_one, (), cdi_one, (0, )),
                ("1-layer, layer 0", ref_one, tar,
                 server("cdi+tar 1-layer", cdi_args(self.cdi, one, filters=tar)), (0, )),
                ("3-layer, layer 0 (many files)", ref_base, (), cdi_three, (0, 2)),
                ("3-layer, layer 2", ref_top, tar,
                 server("cdi+tar 3-layer", cdi_args(self.cdi, three, filters=tar)), (2, ))):
            noextents = tar_noextents if filters else ("noextents",)
            cases += [
                ReadCase(export, bool(filters), "cdi", cdi_server, verify),
                ReadCase(export, bool(filters), "file",
                         server(f"file {path.name}", file_args(path, filters))),
                ReadCase(export, bool(filters), "noextents",
                         server(f"noextents {path.name}", file_args(path, noextents)))]
        cases.append(ReadCase("1-layer, layer 0", False, "cdi copy=true",
                              server("cdi copy=true", cdi_args(self.cdi, one, "copy=true"))))
        for label, model, block_size in VARIANTS:
            script = make_variant(self.cdi, lab.workdir, label, model, block_size)
            cases.append(ReadCase("1-layer, layer 0", False, label,
                                  server(f"variant {label}", cdi_args(script, one)), (0, )))
        for case in cases:
            case.server.wait_ready()
        return cases

    def read_phase(self):
        cases = self.read_cases()
        log("warming up: one copy of every export; cdi.py's background sha256")
        for case in cases:
            measure.copy_seconds(case.server.uri(), 4)
            size, multi_conn = measure.export_facts(case.server.uri())
            self.results.export_sizes[case.export, case.filtered] = size
            self.results.multi_conn[case.export, case.filtered, case.kind] = multi_conn
        for case in cases:
            if case.verify:
                case.server.wait_verified(case.verify)
        self.sequential(cases)
        self.first_copies()
        self.random_reads(cases)
        for case in cases:
            case.server.stop()
        for path in ("one.tar", "three-0.tar", "three-2.tar"):
            (self.lab.workdir / path).unlink()

    def sequential(self, cases):
        """Every export, every way of serving it, back to back: the figures
        compared with each other are measured seconds apart."""
        groups = {}
        for case in cases:
            for connections in CONNECTIONS:
                groups.setdefault((case.export, case.filtered, connections), []).append(case)
        rounds = READ_ROUNDS_PER_RUN * self.runs
        log(f"sequential reads: {len(cases)} servers x {CONNECTIONS} connections "
            f"x {rounds} rounds")
        order = list(groups)
        for round_number in range(rounds):
            chooser = random.Random(round_number)
            chooser.shuffle(order)
            for key in order:
                group = groups[key]
                chooser.shuffle(group)
                for case in group:
                    self.record_copy(case, key[2], *measure.copy_cost(case.server, key[2]))
            if (round_number + 1) % self.runs == 0:
                log(f"  round {round_number + 1}/{rounds} done")

    def record_copy(self, case, connections, seconds, cpu):
        size = self.results.export_sizes[case.export, case.filtered]
        key = (case.export, case.filtered, case.kind, connections)
        self.results.throughput.setdefault(key, Samples()).add(size / seconds / measure.MIB)
        self.results.cpu.setdefault(key, Samples()).add(cpu / (size / (1 << 30)))

    def first_copies(self):
        """The copy a user makes right after start: with cdi.py, the
        background sha256 of the layer runs meanwhile."""
        log("first copy after start, against a fresh nbdkit file")
        one = self.one
        ref = self.lab.workdir / "one.tar"
        export = "1-layer, layer 0"
        for run in range(self.runs):
            order = [(kind, connections) for kind in ("cdi", "file")
                     for connections in CONNECTIONS]
            random.Random(run).shuffle(order)
            for kind, connections in order:
                args = cdi_args(self.cdi, one) if kind == "cdi" else file_args(ref)
                server = Server(self.lab, f"first {kind}", args, env=self.env).start()
                try:
                    server.wait_ready()
                    seconds, cpu = measure.copy_cost(server, connections)
                finally:
                    server.stop()
                size = self.results.export_sizes[export, False]
                self.results.first_copy.setdefault((kind, connections), Samples()).add(
                    size / seconds / measure.MIB)
                self.results.first_copy_cpu.setdefault((kind, connections), Samples()).add(
                    cpu / (size / (1 << 30)))

    def random_reads(self, cases):
        log(f"random reads: {len(cases)} servers x {len(BLOCKS)} sizes "
            f"x {self.runs} runs x {READS_PER_RUN} reads")
        rounds = [(case, block) for case in cases for block in BLOCKS]
        for run in range(self.runs):
            random.Random(run).shuffle(rounds)
            for case, block in rounds:
                latencies = measure.read_latencies(case.server.uri(), block, READS_PER_RUN,
                                                   seed=run * 7919 + block)
                self.results.add_latencies((case.export, case.filtered, case.kind, block),
                                           latencies)

    # ---------------------------------------------------------- importing

    def cdi_server(self, image, tmpdir, *params, layer=None):
        env = dict(os.environ, TMPDIR=str(tmpdir))
        return Server(self.lab, f"cdi {image.label} {params}",
                      cdi_args(self.cdi, image, *params, layer=layer), env=env)

    def baseline_server(self, image, tmpdir):
        env = dict(os.environ, TMPDIR=str(tmpdir))
        return Server(self.lab, f"baseline {image.label}", None, env=env, wrapper=lambda sock: [
            *lab_module.DIE_WITH_PARENT, "bash", str(BASELINE), image.name, str(image.layer),
            sock])

    def import_case(self, image, case, tmpdir):
        if case.startswith("baseline"):
            server, verify = self.baseline_server(image, tmpdir), None
        elif case == "copy=true":
            server, verify = self.cdi_server(image, tmpdir, "copy=true"), None
        elif case.startswith("warm, layer "):
            layer = int(case.rsplit(" ", 1)[1])
            server, verify = self.cdi_server(image, tmpdir, layer=layer), layer
        else:
            server, verify = self.cdi_server(image, tmpdir), image.layer
        result = measure.import_once(server, tmpdir, verify)
        left = os.listdir(tmpdir)
        if left and not case.startswith("baseline"):
            self.results.notes.append(f"cdi.py {case} left {left} in TMPDIR")
        for name in left:
            shutil.rmtree(tmpdir / name, ignore_errors=True)
        self.results.imports.setdefault((image.label, case), []).append(result)

    def import_phase(self, image):
        tmpdir = self.lab.measured_tmpdir()
        log(f"time to ready, {image.label}: cold x {self.runs}")
        for run in range(self.runs):
            order = ["cold", "baseline cold"]
            random.Random(run).shuffle(order)
            for case in order:
                self.lab.forget(image.name)
                self.import_case(image, case, tmpdir)
        self.lab.forget(image.name)
        podman("pull", "--quiet", image.name)
        log(f"time to ready, {image.label}: warm x {self.runs}")
        for run in range(self.runs):
            order = ["warm", "copy=true", "baseline warm"]
            if image.layer != 0:
                # The base layer too: in the 3-layer image, the many files.
                order.append("warm, layer 0")
            random.Random(run).shuffle(order)
            for case in order:
                self.import_case(image, case, tmpdir)

    def big_phase(self, image):
        """Other layer sizes: peak RSS (and disk) of both paths."""
        runs = min(self.runs, 3)
        log(f"{image.label}: warm and copy=true x {runs}")
        for _ in range(runs):
            self.import_case(image, "warm", self.lab.measured_tmpdir())
            # A copy of a large layer would not fit a tmpfs in RAM.
            self.import_case(image, "copy=true", self.lab.disk_tmpdir)
        self.results.shared_disk.add((image.label, "copy=true"))
        podman("rmi", "--force", image.name)

    def run(self):
        self.build_images()
        self.results.images = {"one": self.one, "three": self.three, "bigs": self.bigs}
        self.read_phase()
        for image in (self.one, self.three):
            self.import_phase(image)
        for image in self.bigs:
            self.big_phase(image)


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    sizes = [parse_size(text) for text in
             (os.environ.get("BENCH_SIZES") or "1G 4G").replace(",", " ").split()]
    runs = int(os.environ.get("BENCH_RUNS") or "5")
    if not sizes or runs < 1:
        raise SystemExit("BENCH_SIZES needs a size and BENCH_RUNS at least 1")
    started = time.monotonic()
    # The tmpfs holds at most a copy path's two copies, or the baseline's
    # whole saved image and podman's staging: about twice the main image.
    with Lab(tmpfs_size=3 * sizes[0] + (512 << 20)) as lab:
        lab_module.log(f"working in {lab.workdir}")
        bench = Bench(lab, sizes, runs)
        bench.results.tmpfs = lab.tmpfs is not None
        try:
            bench.run()
        except BaseException:
            # Show what was measured before the failure, then the failure.
            bench.results.elapsed = time.monotonic() - started
            with contextlib.suppress(Exception):
                sys.stdout.write(report.render(bench.results))
            raise
    bench.results.elapsed = time.monotonic() - started
    sys.stdout.write(report.render(bench.results))


if __name__ == "__main__":
    main()
