"""What the bench measures, one function each, and the statistics of it.

Every figure is a list of samples, one per run; the report shows their
median and range.  A ratio is taken per run, between two figures measured
in the same round (so the machine was equally busy for both), and then
summarised the same way.
"""

import os
import random
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

import nbd
from lab import run

MIB = 1 << 20


@dataclass
class Samples:
    values: list = field(default_factory=list)

    def add(self, value):
        self.values.append(value)

    def median(self):
        return statistics.median(self.values)

    def low(self):
        return min(self.values)

    def high(self):
        return max(self.values)


def ratios(numerators, denominators):
    """Per-run ratios of two figures measured in the same rounds (none
    where the denominator is zero: CPU time below a clock tick)."""
    return Samples([a / b for a, b in zip(numerators.values, denominators.values) if b])


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted list."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# ------------------------------------------------------------ reading

def copy_seconds(uri, connections):
    """Wall time of "nbdcopy URI null:" with CONNECTIONS connections."""
    started = time.perf_counter()
    run(["nbdcopy", f"--connections={connections}", uri, "null:"], timeout=3600)
    return time.perf_counter() - started


def cpu_seconds(pid):
    """User + system CPU time of process PID, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_cost(server, connections):
    """(wall seconds, CPU seconds of the server) of one whole copy from
    SERVER.  CPU time hardly depends on what else the machine runs, so its
    ratios stay meaningful on a busy machine, where wall time's do not."""
    before = cpu_seconds(server.process.pid)
    seconds = copy_seconds(server.uri(), connections)
    return seconds, cpu_seconds(server.process.pid) - before


def export_facts(uri):
    """(size, can_multi_conn) of the export at URI."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        return handle.get_size(), bool(handle.can_multi_conn())
    finally:
        handle.shutdown()


def read_latencies(uri, block, count, seed):
    """Seconds per synchronous pread of BLOCK bytes at COUNT random
    BLOCK-aligned offsets (the same ones for every export of that size)."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        slots = handle.get_size() // block
        chooser = random.Random(seed)
        latencies = []
        for _ in range(count):
            offset = chooser.randrange(slots) * block
            started = time.perf_counter_ns()
            handle.pread(block, offset)
            latencies.append((time.perf_counter_ns() - started) / 1e9)
        return latencies
    finally:
        handle.shutdown()


# ------------------------------------------------------------ imports

def used_bytes(path):
    status = os.statvfs(path)
    return (status.f_blocks - status.f_bfree) * status.f_frsize


class DiskSampler:
    """The most PATH's filesystem held beyond what it held at the start,
    sampled every few milliseconds: it sees files with no name too."""

    def __init__(self, path, interval=0.003):
        self.path = path
        self.interval = interval
        self.start_used = used_bytes(path)
        self.peak = 0
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, used_bytes(self.path) - self.start_used)
            time.sleep(self.interval)

    def extra_now(self):
        return used_bytes(self.path) - self.start_used

    def stop(self):
        """Stop sampling; return the peak extra bytes."""
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.extra_now())
        return self.peak


@dataclass
class ImportResult:
    ready: float          # seconds from exec until the socket accepts
    disk_peak: int        # extra bytes in TMPDIR's filesystem until ready
    disk_kept: int        # extra bytes still there once ready
    rss: int              # VmHWM of nbdkit after serving the layer whole


def import_once(server, tmpdir, verify_layer=None):
    """Start SERVER (not yet started) and measure it: time to ready and disk
    during the import, then peak RSS after nbdcopy has read the default
    export whole with 4 connections (and, with VERIFY_LAYER, after cdi.py's
    background sha256 of that layer has finished)."""
    sampler = DiskSampler(tmpdir)
    try:
        server.start()
        ready = server.wait_ready()
        disk_peak = sampler.stop()
        disk_kept = sampler.extra_now()
        subprocess.run(["nbdcopy", "--connections=4", server.uri(), "null:"], check=True,
                       stdin=subprocess.DEVNULL, timeout=3600)
        if verify_layer is not None:
            server.wait_verified([verify_layer])
        rss = server.peak_rss()
    finally:
        sampler.stop()
        server.stop()
    return ImportResult(ready, disk_peak, disk_kept, rss)
