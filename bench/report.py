"""The bench's results and their markdown tables, targets included."""

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

from measure import MIB, Samples, percentile, ratios

# Targets: (ratio to nbdkit file, ratio to noextents file) for reads.
SEQUENTIAL_VS_FILE = 0.95
SEQUENTIAL_VS_NOEXTENTS = 0.9
RSS_LIMIT = 64 * MIB
RSS_GROWTH_LIMIT = 4 * MIB   # "independent of layer size": at most this much more
WARM_READY_LIMIT = 0.2
COLD_VS_BASELINE = 0.6
ZERO_DISK = 1 * MIB          # below this, an import wrote nothing (tmpfs pages)
READ_KINDS = ("cdi", "cdi copy=true")
REFERENCE_KINDS = ("file", "noextents")


@dataclass
class Results:
    sizes: list
    runs: int
    images: dict = field(default_factory=dict)
    export_sizes: dict = field(default_factory=dict)   # (export, filtered) -> bytes
    multi_conn: dict = field(default_factory=dict)     # (export, filtered, kind) -> bool
    throughput: dict = field(default_factory=dict)     # (export, filtered, kind, conns)
    cpu: dict = field(default_factory=dict)            # same keys: server CPU s/GiB
    first_copy: dict = field(default_factory=dict)     # (kind, conns) -> Samples
    first_copy_cpu: dict = field(default_factory=dict)
    latencies: dict = field(default_factory=dict)      # (export, filtered, kind, block)
    run_p50s: dict = field(default_factory=dict)       # same keys -> Samples
    imports: dict = field(default_factory=dict)        # (image, case) -> [ImportResult]
    shared_disk: set = field(default_factory=set)      # (image, case) on a shared fs
    notes: list = field(default_factory=list)
    tmpfs: bool = False
    version: str = ""
    elapsed: float = 0.0

    def add_latencies(self, key, latencies):
        self.latencies.setdefault(key, []).extend(latencies)
        self.run_p50s.setdefault(key, Samples()).add(percentile(sorted(latencies), 0.5))

    def import_samples(self, image, case, attribute):
        return Samples([getattr(result, attribute) for result in
                        self.imports.get((image, case), [])])


def mib(size):
    return f"{size / MIB:.0f} MiB" if size < 10 << 30 else f"{size / (1 << 30):.0f} GiB"


def spread(samples, digits=0, scale=1.0):
    """"median (min–max)"."""
    if not samples.values:
        return "–"
    values = [samples.median() * scale, samples.low() * scale, samples.high() * scale]
    median, low, high = (f"{value:.{digits}f}" for value in values)
    return median if len(samples.values) == 1 else f"{median} ({low}–{high})"


def verdict(ok):
    return "PASS" if ok else "**MISS**"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine():
    nbdkit = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True,
                            check=False).stdout.strip()
    podman = subprocess.run(["podman", "--version"], capture_output=True, text=True,
                            check=False).stdout.strip()
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    return (f"{platform.node()}, {os.cpu_count()} cores, {nbdkit}, {podman}, "
            f"load average at the end {load}, {time.strftime('%Y-%m-%d %H:%M')}")


class Report:
    def __init__(self, results):
        self.results = results
        self.targets = []    # (target, measured, ok)

    # --------------------------------------------------------- sequential

    def exports(self):
        """(export, filtered) in the order the bench set them up."""
        seen = []
        for export, filtered, _ in self.results.multi_conn:
            if (export, filtered) not in seen:
                seen.append((export, filtered))
        return seen

    def kinds(self):
        """The ways of serving, in the order the bench set them up."""
        return list(dict.fromkeys(kind for _, _, kind in self.results.multi_conn))

    def sequential(self):
        results = self.results
        rows = []
        worst = {}
        for export, filtered in self.exports():
            for kind in READ_KINDS:
                for connections in (1, 4):
                    key = (export, filtered, kind, connections)
                    if key not in results.throughput:
                        continue
                    ours = results.throughput[key]
                    row = [export + ("" if kind == "cdi" else f" ({kind})"),
                           "tar" if filtered else "–", connections, spread(ours)]
                    for reference, limit in (("file", SEQUENTIAL_VS_FILE),
                                             ("noextents", SEQUENTIAL_VS_NOEXTENTS)):
                        theirs = results.throughput[export, filtered, reference, connections]
                        ratio = ratios(ours, theirs)
                        row += [spread(theirs), spread(ratio, 2), verdict(
                            ratio.median() >= limit)]
                        if kind == "cdi":
                            name = (reference, connections)
                            if name not in worst or ratio.median() < worst[name][0]:
                                worst[name] = (ratio.median(), f"{export}, "
                                               f"{'tar' if filtered else 'no filter'}")
                    cpu = results.cpu[key]
                    reference_cpu = results.cpu[export, filtered, "file", connections]
                    row += [spread(cpu, 2), spread(reference_cpu, 2),
                            spread(ratios(cpu, reference_cpu), 1)]
                    rows.append(row)
        for (reference, connections), (ratio, where) in sorted(worst.items()):
            limit = SEQUENTIAL_VS_FILE if reference == "file" else SEQUENTIAL_VS_NOEXTENTS
            self.targets.append((f"sequential, {connections} connection"
                                 f"{'s' if connections > 1 else ''}: >= {limit}x "
                                 f"`{'nbdkit file' if reference == 'file' else 'noextents file'}`"
                                 " (worst export)",
                                 f"{ratio:.2f}x ({where})", ratio >= limit))
        header = ["export", "filter", "conns", "cdi.py MiB/s", "nbdkit file MiB/s",
                  "× file", f"≥{SEQUENTIAL_VS_FILE}", "noextents file MiB/s",
                  "× noextents", f"≥{SEQUENTIAL_VS_NOEXTENTS}", "cdi.py CPU s/GiB",
                  "file CPU s/GiB", "CPU × file"]
        no_multi = [f"{export} {'tar ' if filtered else ''}{kind}"
                    for (export, filtered, kind), ok in results.multi_conn.items() if not ok]
        rounds = len(next(iter(results.throughput.values())).values)
        text = ("### Sequential read: `nbdcopy --connections=N \"$uri\" null:`\n\n"
                f"MiB/s, median (min–max) of {rounds} rounds; in each round the ways of "
                "serving one export are measured back to back, in shuffled order; × = "
                "per-round ratio.  All data in the page cache.  CPU s/GiB: user+system "
                "CPU time of the nbdkit process per GiB copied (clock-tick resolution), "
                "which depends little on what else the machine runs.\n\n")
        text += table(header, rows)
        if no_multi:
            text += ("\nNo multi-conn (nbdcopy used 1 connection): "
                     + ", ".join(no_multi) + "\n")
        return text

    def first_copy(self):
        results = self.results
        rows = []
        for connections in (1, 4):
            ours = results.first_copy.get(("cdi", connections))
            theirs = results.first_copy.get(("file", connections))
            if ours and theirs:
                ours_cpu = results.first_copy_cpu[("cdi", connections)]
                theirs_cpu = results.first_copy_cpu[("file", connections)]
                rows.append([connections, spread(ours), spread(theirs),
                             spread(ratios(ours, theirs), 2), spread(ours_cpu, 2),
                             spread(theirs_cpu, 2)])
        return ("### First copy right after start (1-layer, layer 0)\n\n"
                "A fresh server per copy: cdi.py's background sha256 of the layer "
                "(verify=true, the default) runs during the copy.\n\n"
                + table(["conns", "cdi.py MiB/s", "fresh nbdkit file MiB/s", "× file",
                         "cdi.py CPU s/GiB", "file CPU s/GiB"], rows))

    def variants(self):
        results = self.results
        export, filtered = "1-layer, layer 0", False
        kinds = [kind for kind in self.kinds()
                 if kind not in ("cdi copy=true", "file", "noextents")]
        rows = []
        best = {}
        for connections in (1, 4):
            current = results.throughput.get((export, filtered, "cdi", connections))
            current_cpu = results.cpu.get((export, filtered, "cdi", connections))
            reference = results.throughput.get((export, filtered, "file", connections))
            for kind in kinds:
                key = (export, filtered, kind, connections)
                ours = results.throughput.get(key)
                if not ours:
                    continue
                label = "serialize_requests (current)" if kind == "cdi" else kind
                rows.append([label, connections, spread(ours), spread(ratios(ours, reference), 2),
                             spread(ratios(ours, current), 2), spread(results.cpu[key], 2),
                             spread(ratios(results.cpu[key], current_cpu), 2)])
                if connections not in best or ours.median() > best[connections][1]:
                    best[connections] = (label, ours.median())
        text = ("### Thread model and block_size (copies of cdi.py; 1-layer, layer 0, "
                "no filter)\n\n"
                "block_size = (1, 64 KiB, 32 MiB).  × current = per-round ratio to the "
                "unchanged cdi.py, measured back to back with it.\n\n")
        text += table(["variant", "conns", "MiB/s", "× file", "× current", "CPU s/GiB",
                       "CPU × current"], rows)
        text += "\nFastest (median MiB/s): " + "; ".join(
            f"{connections} conn: {label} ({value:.0f} MiB/s)"
            for connections, (label, value) in sorted(best.items())) + "\n"
        return text

    # ------------------------------------------------------- random reads

    def random_reads(self):
        results = self.results
        rows = []
        exports, kinds = self.exports(), self.kinds()
        keys = sorted(results.latencies, key=lambda key: (
            exports.index(key[:2]), key[3], kinds.index(key[2])))
        for key in keys:
            export, filtered, kind, block = key
            values = sorted(results.latencies[key])
            reference = sorted(results.latencies.get((export, filtered, "file", block), []))
            row = [export, "tar" if filtered else "–", f"{block >> 10} KiB", kind,
                   spread(results.run_p50s[key], 0, 1e6)]
            row += [f"{percentile(values, fraction) * 1e6:.0f}" for fraction in (0.9, 0.99)]
            if reference and kind != "file":
                row += [f"{percentile(values, fraction) / percentile(reference, fraction):.2f}"
                        for fraction in (0.5, 0.99)]
            else:
                row += ["", ""]
            rows.append(row)
        return ("### Random reads: synchronous pread at random aligned offsets (Python "
                "`nbd` client)\n\n"
                "Latency in µs: p50 median (min–max) of the runs' p50, p90 and p99 over "
                "all reads of all runs; × file = ratio to `nbdkit file` of the same "
                "bytes.\n\n"
                + table(["export", "filter", "block", "server", "p50 µs", "p90 µs", "p99 µs",
                         "p50 × file", "p99 × file"], rows))

    # ---------------------------------------------------------- importing

    def image_labels(self):
        return list(dict.fromkeys(image for image, _ in self.results.imports))

    def time_to_ready(self):
        results = self.results
        rows = []
        for image in self.image_labels():
            for case, baseline in (("cold", "baseline cold"), ("warm", "baseline warm"),
                                   ("copy=true", "baseline warm"), ("warm, layer 0", None)):
                ours = results.import_samples(image, case, "ready")
                if not ours.values:
                    continue
                theirs = results.import_samples(image, baseline, "ready")
                ours_label = case if case != "warm, layer 0" else "warm, layer 0 (many files)"
                ratio = ratios(ours, theirs) if theirs.values else Samples()
                rows.append([image, ours_label, spread(ours, 2), spread(theirs, 2) if theirs.values
                             else "–", spread(ratio, 2)])
                if case.startswith("warm"):
                    self.targets.append((f"warm time to ready < {WARM_READY_LIMIT} s "
                                         f"({image}{case[4:]})", f"{ours.median():.2f} s",
                                         ours.median() < WARM_READY_LIMIT))
                if case == "cold" and ratio.values:
                    self.targets.append((f"cold time to ready <= {COLD_VS_BASELINE}x "
                                         f"baseline ({image})",
                                         f"{ratio.median():.2f}x ({ours.median():.1f} s vs "
                                         f"{theirs.median():.1f} s)",
                                         ratio.median() <= COLD_VS_BASELINE))
        return ("### Time to ready: from exec until the NBD socket accepts a connection\n\n"
                "Seconds.  cold: the image only in the registry (127.0.0.1); warm: in "
                "podman's storage.  Baseline: what the C cdi plugin does (podman pull; "
                "podman save --format docker-dir; keep the layer, remove the rest), then "
                "`nbdkit file`; copy=true is compared with the warm baseline.\n\n"
                + table(["image", "case", "cdi.py s", "baseline s", "× baseline"], rows))

    def disk(self):
        results = self.results
        rows = []
        for image in self.image_labels():
            for case in ("cold", "warm", "warm, layer 0", "copy=true", "baseline cold",
                         "baseline warm"):
                peak = results.import_samples(image, case, "disk_peak")
                if not peak.values:
                    continue
                kept = results.import_samples(image, case, "disk_kept")
                shared = (image, case) in results.shared_disk
                rows.append([image, case + (" (shared fs, approximate)" if shared else ""),
                             spread(peak, 0, 1 / MIB), spread(kept, 0, 1 / MIB)])
            warm = results.import_samples(image, "warm", "disk_peak")
            if warm.values:
                self.targets.append((f"peak extra disk zero, fast path from storage ({image})",
                                     f"{warm.high() / 1024:.0f} KiB at most",
                                     warm.high() < ZERO_DISK))
            copy = results.import_samples(image, "copy=true", "disk_peak")
            baseline = results.import_samples(image, "baseline warm", "disk_peak")
            if copy.values and baseline.values:
                self.targets.append((f"peak extra disk, copy=true <= baseline ({image})",
                                     f"{copy.median() / MIB:.0f} MiB vs "
                                     f"{baseline.median() / MIB:.0f} MiB",
                                     copy.median() <= baseline.median()))
        where = ("a tmpfs mounted for the bench" if results.tmpfs
                 else "a directory on a shared filesystem (no tmpfs: not root)")
        return ("### Peak extra disk in TMPDIR during the import\n\n"
                f"MiB; TMPDIR is {where}, sampled with statvfs every 3 ms from exec "
                "until ready (this sees the nameless O_TMPFILE copy too); kept = still "
                "used once ready.  cold includes podman pull's own staging in TMPDIR.\n\n"
                + table(["image", "case", "peak MiB", "kept MiB"], rows))

    def rss(self):
        results = self.results
        rows = []
        fast = {}
        for image in self.image_labels():
            size = self.layer_size(image)
            cells = []
            for case in ("warm", "cold", "copy=true", "baseline warm"):
                samples = results.import_samples(image, case, "rss")
                cells.append(spread(samples, 1, 1 / MIB))
                if case in ("warm", "copy=true") and samples.values:
                    fast.setdefault(case, []).append((size, samples.high(), image))
            rows.append([image, mib(size) if size else "", *cells])
        for case, entries in fast.items():
            largest = max(rss for _, rss, _ in entries)
            self.targets.append((f"peak RSS <= {RSS_LIMIT // MIB} MiB ({case})",
                                 f"{largest / MIB:.1f} MiB at most", largest <= RSS_LIMIT))
            # Independence: the single-layer images, which differ only in size.
            single = sorted(entry for entry in entries if entry[2].startswith("1-layer"))
            if len({size for size, _, _ in single}) > 1:
                growth = single[-1][1] - single[0][1]
                self.targets.append((
                    f"peak RSS independent of layer size ({case}: grows <= "
                    f"{RSS_GROWTH_LIMIT // MIB} MiB from {mib(single[0][0])} to "
                    f"{mib(single[-1][0])})",
                    f"{growth / MIB:+.1f} MiB", growth <= RSS_GROWTH_LIMIT))
        return ("### Peak RSS of the nbdkit process (VmHWM)\n\n"
                "MiB, after the import and a whole read of the layer with 4 connections "
                "(and the background sha256, on the fast path).\n\n"
                + table(["image", "layer", "fast path warm", "fast path cold", "copy=true",
                         "baseline (`nbdkit file`)"], rows))

    def layer_size(self, label):
        images = self.results.images
        for image in [images.get("one"), images.get("three"), *images.get("bigs", [])]:
            if image is not None and image.label == label:
                return image.size
        return 0

    def render(self):
        results = self.results
        sections = [self.sequential(), self.first_copy(), self.variants(),
                    self.random_reads(), self.time_to_ready(), self.disk(), self.rss()]
        images = results.images
        head = (f"## cdi.py benchmark\n\n{results.version}.\n\n"
                f"{machine()}.  {results.runs} runs of each "
                f"measurement (at most 3 for the other layer sizes); `make bench` took "
                f"{results.elapsed / 60:.1f} min.\n\n"
                f"Images: 1-layer = one {mib(images['one'].size)} layer "
                f"(disk/disk.img, random data); 3-layer = many small files "
                f"({mib(results.export_sizes.get(('3-layer, layer 0 (many files)', False), 0))}"
                f"), a text file, and disk/disk.img ({mib(images['three'].size)} layer)"
                + "".join(f"; {image.label} for time to ready, disk and RSS"
                          for image in images["bigs"])
                + ".\n\n")
        targets = table(["target", "measured", "result"],
                        [[name, measured, verdict(ok)] for name, measured, ok in self.targets])
        text = head + "### Targets\n\n" + targets + "\n" + "\n".join(sections)
        if results.notes:
            text += "\n### Notes\n\n" + "".join(f"- {note}\n" for note in results.notes)
        return text


def render(results):
    return Report(results).render()
