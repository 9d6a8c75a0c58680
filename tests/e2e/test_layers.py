"""The export is the exact layer: its bytes hash to the layer's diffID."""

import os
import random
import re
import threading

import nbd
import pytest

from conftest import nbdkit_command, read_export, run_nbdkit, serve, sha256


@pytest.mark.parametrize("layer, index", [
    ("0", 0), ("1", 1), ("2", 2), ("-1", 2), ("-2", 1), ("-3", 0)])
def test_layer_bytes_hash_to_diff_id(three, layer, index):
    data = read_export(f"name={three.name}", f"layer={layer}")
    assert sha256(data) == three.diff_ids[index]


def test_default_layer_is_the_base_layer(three):
    assert sha256(read_export(f"name={three.name}")) == three.diff_ids[0]


def test_export_is_read_only_and_multi_conn(three):
    handle = nbd.NBD()
    handle.connect_command(nbdkit_command(f"name={three.name}", "layer=-1",
                                          options=["-s"]))
    try:
        assert handle.is_read_only()
        assert handle.can_multi_conn()
        assert handle.can_cache()
        assert not handle.can_trim()
        assert not handle.can_zero()
        with pytest.raises(nbd.Error) as error:
            handle.pwrite(b"x" * 512, 0)
        assert error.value.errnum in (1, 30)  # EPERM or EROFS
    finally:
        handle.shutdown()


def test_nbdinfo_shows_the_layer(three):
    result = run_nbdkit(f"name={three.name}", "layer=1", run='nbdinfo "$uri"')
    assert result.returncode == 0, result.stderr
    assert f"layer 1 of 3: {three.diff_ids[1]}, 2.5 KiB: 1 directory, 1 file" \
        in result.stdout
    assert "POSIX tar archive" in result.stdout
    assert "is_read_only: true" in result.stdout


def test_nbdcopy_copies_the_layer(three, lab):
    target = f"{lab.workdir}/nbdcopy.tar"
    result = run_nbdkit(f"name={three.name}", "layer=0",
                        run=f'nbdcopy "$uri" {target}')
    assert result.returncode == 0, result.stderr
    with open(target, "rb") as copy:
        assert sha256(copy.read()) == three.diff_ids[0]
    os.unlink(target)


def test_many_connections_read_random_ranges(lab, three):
    expected = read_export(f"name={three.name}")
    size = len(expected)
    failures = []

    def reader(sock, seed):
        generator = random.Random(seed)
        handle = nbd.NBD()
        handle.connect_unix(sock)
        try:
            for _ in range(200):
                offset = generator.randrange(size)
                count = generator.randint(1, min(256 << 10, size - offset))
                if handle.pread(count, offset) != expected[offset:offset + count]:
                    failures.append((seed, offset, count))
        finally:
            handle.shutdown()

    with serve(lab, f"name={three.name}") as server:
        threads = [threading.Thread(target=reader, args=(server.socket, seed))
                   for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


@pytest.mark.parametrize("copy, how", [("false", "storage"), ("true", "copy")])
def test_verbose_shows_each_podman_command_and_timings(three, copy, how):
    result = run_nbdkit(f"name={three.name}", "layer=1", f"copy={copy}", verbose=True)
    assert result.returncode == 0, result.stderr
    assert f"running: podman image exists -- {three.name}" in result.stderr
    assert re.search(r"found image [0-9a-f]{64} \(3 layers\) in [0-9.]+ s", result.stderr)
    assert f"export 1: {how}: layer 1 of 3: {three.diff_ids[1]}" in result.stderr
    assert re.search(r"ready in [0-9.]+ s", result.stderr)
    save = f"running: podman save --quiet --format docker-archive -- {three.id}"
    assert (save in result.stderr) == (copy == "true")
