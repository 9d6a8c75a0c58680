"""Serving layers in place from podman's overlay storage, and the save path.

The images here are crafted docker-archives loaded with podman, so each
layer's exact bytes are known: the tests compare what nbdkit serves with
those bytes, on the fast path (the default), on the save path (copy=true)
and against the diffID.  Layers hold what `podman build` cannot express:
whiteouts, hard links, symlinks out of the layer, names that are not UTF-8.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import nbd
import pytest

from conftest import copy_export, nbdkit_error, read_export, run_nbdkit, serve
from lab import podman, sha256
from tars import MTIME, Layer, directory, hardlink, layer_tar, regular, symlink, whiteout


def pseudo_random(size, seed):
    """SIZE reproducible bytes that do not compress or repeat."""
    return hashlib.shake_256(seed.encode()).digest(size)


# ------------------------------------------------------- serving and reading

@contextlib.contextmanager
def connected(sock, export_name=""):
    handle = nbd.NBD()
    handle.set_export_name(export_name)
    handle.set_full_info(True)  # for the export's description
    handle.connect_unix(sock)
    try:
        yield handle
    finally:
        handle.shutdown()


def read_range(handle, start, end, chunk=4 << 20):
    return b"".join(handle.pread(min(chunk, end - offset), offset)
                    for offset in range(start, end, chunk))


def extent_map(*params, filters=()):
    """nbdinfo --map of the default export: [{offset, length, type, description}]."""
    result = run_nbdkit(*params, filters=filters, run='nbdinfo --map --json "$uri"')
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_holes_hold_zeros(extents, data, at_least):
    """The holes in EXTENTS read as zeros in DATA and add up to AT_LEAST bytes."""
    holes = [extent for extent in extents if extent["type"] & 1]
    assert all(hole["description"] == "hole,zero" for hole in holes), extents
    for hole in holes:
        start, end = hole["offset"], hole["offset"] + hole["length"]
        assert data[start:end] == bytes(end - start), f"data in the hole {hole}"
    assert sum(hole["length"] for hole in holes) >= at_least, extents


# ---------------------------------------- every kind of entry, both paths

# Layers of the "mixed" image, base first, with what each exercises.
MIXED = {
    "links": layer_tar([
        directory("etc"),
        regular("etc/hello", b"hello\n"),
        hardlink("etc/hello-again", "etc/hello"),
        regular("empty"),
        symlink("passwd", "/etc/passwd"),      # out of the layer: never followed
        symlink("up", "../../x"),
        symlink("dangling", "nowhere"),
        hardlink("passwd-again", "passwd"),    # a hard link to a symlink
        regular("data.bin", pseudo_random(100 << 10, "data")),
        regular("données/café.txt", b"un caf\xc3\xa9\n"),  # a pax path record
        regular("日本語.txt", "日本語\n".encode()),
    ]),
    "directories-only": layer_tar([
        directory("a"), directory("a/b"), directory("a/b/c"), directory("empty-dir")]),
    "whiteouts": layer_tar([
        whiteout("empty"),
        whiteout("données/café.txt"),
        directory("etc"),
        regular("etc/.wh..wh..opq"),           # opaque: hides all of the lower etc/
        regular("etc/new", b"new\n"),
    ]),
    # GNU format: names as raw bytes, a Latin-1 one that is not UTF-8, and a
    # long name in a ././@LongLink entry.
    "gnu-raw-names": layer_tar([
        regular("caf\udce9.txt", b"Latin-1\n"),
        regular("ελληνικά.txt", "ελληνικά\n".encode()),
        regular("long/" + "n" * 150, pseudo_random(3000, "long")),
    ], tar_format=tarfile.GNU_FORMAT),
    "empty": layer_tar([]),
}
MIXED_CONTENTS = ["1 directory, 5 files, 5 links", "4 directories",
                  "1 directory, 1 file, 3 whiteouts", "3 files", "empty"]


@pytest.fixture(scope="module")
def mixed(lab):
    with lab.loaded("localhost/cdi-test/mixed:1", list(MIXED.values())) as image:
        yield image


def test_fast_path_serves_every_layer_in_place(mixed):
    result = run_nbdkit(f"name={mixed.name}", verbose=True, run='nbdinfo --list "$uri"')
    assert result.returncode == 0, result.stderr
    assert "cannot serve from podman's storage" not in result.stderr
    for index, diff_id in enumerate(mixed.diff_ids):
        assert f"export {index}: storage: layer {index} of 5: {diff_id}" in result.stderr


@pytest.mark.parametrize("index", range(len(MIXED)), ids=list(MIXED))
def test_fast_path_serves_the_exact_layer(mixed, index):
    data = read_export(f"name={mixed.name}", export_name=str(index))
    assert sha256(data) == mixed.diff_ids[index]


@pytest.mark.parametrize("index", range(len(MIXED)), ids=list(MIXED))
def test_save_path_serves_the_exact_layer(mixed, index):
    data = read_export(f"name={mixed.name}", f"layer={index}", "copy=true")
    assert sha256(data) == mixed.diff_ids[index]


@pytest.mark.parametrize("index", range(len(MIXED)), ids=list(MIXED))
def test_save_path_describes_the_layer_as_the_fast_path_does(mixed, index):
    result = run_nbdkit(f"name={mixed.name}", f"layer={index}", "copy=true",
                        run='nbdinfo --json "$uri"')
    assert result.returncode == 0, result.stderr
    description = json.loads(result.stdout)["exports"][0]["description"]
    assert description.endswith(f" KiB: {MIXED_CONTENTS[index]}")


def test_symlinks_are_served_as_links_never_followed(mixed):
    data = read_export(f"name={mixed.name}", export_name="0")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        links = {member.name: (member.linkname, member.size)
                 for member in archive if member.issym()}
    assert links == {"passwd": ("/etc/passwd", 0), "up": ("../../x", 0),
                     "dangling": ("nowhere", 0)}
    assert Path("/etc/passwd").read_bytes() not in data


def test_copy_true_says_it_copies_with_podman_save(mixed):
    copied = copy_export(f"name={mixed.name}", "layer=2", "copy=true", verbose=True)
    assert "copy=true: copying the layer with podman save" in copied.stderr
    assert "cannot serve from podman's storage" not in copied.stderr
    assert copied.digest == mixed.diff_ids[2]


# A file stored below a symlink of its own layer: podman resolves
# "escape/inside.txt" to real/inside.txt, the plugin must not follow "escape".
THROUGH_SYMLINK = layer_tar([directory("real"), symlink("escape", "real"),
                             regular("escape/inside.txt", b"inside\n")])


@pytest.fixture(scope="module")
def through_symlink(lab):
    layers = [THROUGH_SYMLINK, layer_tar([regular("top.txt", b"top\n")])]
    with lab.loaded("localhost/cdi-test/through-symlink:1", layers) as image:
        yield image


def test_file_below_a_symlink_falls_back_to_podman_save(through_symlink):
    copied = copy_export(f"name={through_symlink.name}", "layer=0", verbose=True)
    assert ("cannot serve from podman's storage (cannot open b'escape/inside.txt': "
            "Not a directory): copying the layer with podman save") in copied.stderr
    assert copied.digest == through_symlink.diff_ids[0]


def test_unsafe_layer_beside_the_served_one_is_listed_and_copied_on_first_use(
        through_symlink):
    result = copy_export(f"name={through_symlink.name}", "layer=1", export="0",
                         info=["--list"], verbose=True)
    exports = {export["export-name"]: export["description"]
               for export in result.info["exports"]}
    assert list(exports) == ["0", "1"]
    assert exports["0"] == (
        f"layer 0 of 2: {through_symlink.diff_ids[0]}: copied with podman save when first "
        "opened (cannot serve from podman's storage (cannot open b'escape/inside.txt': "
        "Not a directory))")
    assert result.digest == through_symlink.diff_ids[0]
    assert "layer 0: cannot serve from podman's storage" in result.stderr


# ------------------------------------------------- another storage driver

@pytest.fixture
def vfs_storage(lab):
    """Podman storage with the vfs driver, for this test only."""
    root = Path(tempfile.mkdtemp(dir=lab.workdir, prefix="vfs-"))
    config = root / "storage.conf"
    config.write_text('[storage]\ndriver = "vfs"\n'
                      f'graphroot = "{root}/graph"\nrunroot = "{root}/run"\n')
    # Restored here, before plugin_tmpdir looks for images left behind.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONTAINERS_STORAGE_CONF", str(config))
        try:
            yield root
        finally:
            podman("rmi", "--all", "--force", check=False)
    shutil.rmtree(root)


def test_vfs_storage_serves_every_layer_in_place(lab, vfs_storage):
    image = lab.load("localhost/cdi-test/on-vfs:1", [
        layer_tar([regular("base.txt", b"base\n"), regular("gone.txt", b"gone\n")]),
        layer_tar([whiteout("gone.txt"), regular("top.txt", b"top\n"),
                   symlink("link", "/etc/passwd")])])
    for index, diff_id in enumerate(image.diff_ids):
        copied = copy_export(f"name={image.name}", f"layer={index}", verbose=True)
        assert copied.digest == diff_id
        assert f"export {index}: storage: layer {index} of 2: {diff_id}" in copied.stderr
        assert "copying the layer with podman save" not in copied.stderr


# ------------------------------------------------- the image goes away

def test_removing_the_image_while_serving_changes_no_byte(lab):
    layers = [layer_tar([regular(f"part{number}.bin", pseudo_random(256 << 10, str(number)))
                         for number in range(8)]),
              layer_tar([regular("top.txt", b"top\n")])]
    expected = layers[0]
    half = len(expected) // 2
    with lab.loaded("localhost/cdi-test/removed:1", layers) as image, \
            serve(lab, f"name={image.name}") as server, connected(server.socket) as handle:
        first_half = read_range(handle, 0, half)
        driver_data = json.loads(podman("image", "inspect", "--format",
                                        "{{json .GraphDriver.Data}}", image.id))
        diff_dirs = [driver_data["LowerDir"], driver_data["UpperDir"]]
        podman("rmi", "--force", image.id)
        assert not any(os.path.exists(path) for path in diff_dirs)
        assert first_half + read_range(handle, half, len(expected)) == expected
        with connected(server.socket) as late:
            assert read_range(late, 0, len(expected)) == expected
        with connected(server.socket, export_name="1") as late:
            assert read_range(late, 0, len(layers[1])) == layers[1]


# ------------------------------------------------- exports and their names

def test_export_list_has_one_export_per_layer(mixed):
    result = run_nbdkit(f"name={mixed.name}", run='nbdinfo --list --json "$uri"')
    assert result.returncode == 0, result.stderr
    exports = json.loads(result.stdout)["exports"]
    assert [export["export-name"] for export in exports] == ["0", "1", "2", "3", "4"]
    for index, (export, data) in enumerate(zip(exports, MIXED.values())):
        assert export["export-size"] == len(data)
        assert export["description"] == (
            f"layer {index} of 5: {mixed.diff_ids[index]}, "
            f"{len(data) / 1024:.1f} KiB: {MIXED_CONTENTS[index]}")


@pytest.mark.parametrize("export_name, index", [
    ("1", 1), ("-1", 4), ("-5", 0), ("", 2), ("diffID of layer 3", 3)],
    ids=["index", "from-the-top", "base-from-the-top", "default-is-layer=", "diff-id"])
def test_export_name_selects_the_layer(mixed, export_name, index):
    if export_name.startswith("diffID"):
        export_name = mixed.diff_ids[3]
    data = read_export(f"name={mixed.name}", "layer=2", export_name=export_name)
    assert sha256(data) == mixed.diff_ids[index]


@pytest.mark.parametrize("export_name", ["7", "-6", "nope", "sha256:" + "0" * 64])
def test_unknown_export_name_is_refused(mixed, export_name):
    uri = f"nbd+unix:///{export_name}?socket=$unixsocket"
    result = run_nbdkit(f"name={mixed.name}", run=f'nbdinfo "{uri}"')
    assert result.returncode != 0
    assert (f"no export {export_name!r}: the exports are 0, 1, 2, 3, 4 "
            "(or -1, -2, ... or a layer's diffID)") in result.stderr


def test_copy_true_lists_every_layer_and_copies_each_on_first_use(mixed):
    result = copy_export(f"name={mixed.name}", "layer=3", "copy=true", export="0",
                         info=["--list"], verbose=True)
    exports = {export["export-name"]: export["description"]
               for export in result.info["exports"]}
    assert list(exports) == ["0", "1", "2", "3", "4"]
    assert exports["0"] == (f"layer 0 of 5: {mixed.diff_ids[0]}: copied with podman save "
                            "when first opened (copy=true)")
    assert exports["3"].startswith(f"layer 3 of 5: {mixed.diff_ids[3]}, ")
    assert result.digest == mixed.diff_ids[0]
    assert "layer 0: copy=true: copying the layer with podman save" in result.stderr


# ------------------------------------------------------------- layer=auto

DISK = pseudo_random(64 << 10, "disk")
AUTO_IMAGES = {
    # "./" names, as "tar -C dir ." writes them.
    "base": [layer_tar([directory("./disk"), regular("./disk/downloaded", DISK)]),
             layer_tar([regular("etc/hello", b"hello\n")])],
    # The layer holding the one disk the merged filesystem shows: links,
    # other directories and files removed later are no disks.
    "middle": [layer_tar([directory("disk"), symlink("disk/link.img", "../data.img"),
                          regular("data.img", DISK), regular("disks/other.img", DISK)]),
               layer_tar([directory("disk"), regular("disk/downloaded", DISK)]),
               layer_tar([whiteout("data.img"), regular("etc/later", DISK)])],
    "none": [layer_tar([directory("disk"), symlink("disk/link.img", "../srv/data.img")]),
             layer_tar([regular("srv/data.img", DISK), regular("mydisk/downloaded", DISK)])],
    # A name that is not ASCII: the entry has a pax header, as has a disk of
    # 8 GiB or more.
    "pax-header": [layer_tar([regular("etc/hello", b"hello\n")]),
                   layer_tar([directory("disk"), regular("disk/système.img", DISK)])],
    "two": [layer_tar([regular("etc/hello", b"hello\n")]),
            layer_tar([regular("disk/a.img", DISK), regular("disk/b.img", DISK)])],
}


@pytest.fixture(scope="module")
def auto_images(lab):
    with contextlib.ExitStack() as stack:
        yield {case: stack.enter_context(lab.loaded(f"localhost/cdi-test/auto-{case}:1", layers))
               for case, layers in AUTO_IMAGES.items()}


@pytest.mark.parametrize("case, index, copy", [
    ("base", 0, "false"), ("middle", 1, "false"), ("middle", 1, "true")],
    ids=["disk-in-base", "disk-in-middle", "disk-in-middle-copy"])
def test_layer_auto_selects_the_layer_holding_the_visible_disk(auto_images, case, index,
                                                               copy):
    image = auto_images[case]
    copied = copy_export(f"name={image.name}", "layer=auto", f"copy={copy}")
    assert copied.digest == image.diff_ids[index]


@pytest.mark.parametrize("copy", ["false", "true"])
def test_layer_auto_finds_a_disk_whose_entry_has_a_pax_header(auto_images, copy):
    image = auto_images["pax-header"]
    copied = copy_export(f"name={image.name}", "layer=auto", f"copy={copy}")
    assert copied.digest == image.diff_ids[1]


@pytest.mark.parametrize("copy", ["false", "true"])
def test_layer_auto_without_a_disk_fails(auto_images, copy):
    image = auto_images["none"]
    stderr = nbdkit_error(f"name={image.name}", "layer=auto", f"copy={copy}")
    assert (f"{image.name}: no VM disk: the merged filesystem of its 2 layers has no "
            "regular file under disk/ nor at the root") in stderr


@pytest.mark.parametrize("copy", ["false", "true"])
def test_layer_auto_with_two_disks_in_a_layer_fails(auto_images, copy):
    image = auto_images["two"]
    stderr = nbdkit_error(f"name={image.name}", "layer=auto", f"copy={copy}")
    assert (f"{image.name}: 2 candidate VM disks: disk/a.img (layer 1), disk/b.img (layer 1); "
            "serve one with layer=N --filter=tar tar-entry=PATH") in stderr


# ------------------------------------------------------------ descriptions

@pytest.fixture(scope="module")
def qcow2_image(lab):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    scratch = Path(tempfile.mkdtemp(dir=lab.workdir, prefix="qcow2-"))
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                        str(scratch / "disk.qcow2"), "1G"], check=True)
        qcow2 = (scratch / "disk.qcow2").read_bytes()
    finally:
        shutil.rmtree(scratch)
    layers = [layer_tar([regular("etc/os-release", b"ID=test\n")]),
              layer_tar([directory("disk"), regular("disk/downloaded", qcow2)])]
    with lab.loaded("localhost/cdi-test/qcow2:1", layers) as image:
        yield image


@pytest.mark.parametrize("copy", ["false", "true"])
def test_description_gives_a_qcow2_disk_virtual_size(qcow2_image, copy):
    result = run_nbdkit(f"name={qcow2_image.name}", "layer=auto", f"copy={copy}",
                        run='nbdinfo --json "$uri"')
    assert result.returncode == 0, result.stderr
    description = json.loads(result.stdout)["exports"][0]["description"]
    assert description.startswith(f"layer 1 of 2: {qcow2_image.diff_ids[1]}, ")
    assert description.endswith(": disk/downloaded (qcow2, 1.0 GiB virtual)")


# ------------------------------------------------------------------ holes

# 8 MiB of zeros but for a few bytes at the start, the middle and the end.
SPARSE = bytearray(8 << 20)
SPARSE[0:5] = b"start"
SPARSE[4 << 20:(4 << 20) + 6] = b"middle"
SPARSE[-3:] = b"end"
SPARSE = bytes(SPARSE)
SPARSE_LAYER = layer_tar([regular("sparse.bin", SPARSE)])


@pytest.fixture(scope="module")
def sparse_image(lab):
    """An image whose stored sparse.bin has holes: podman writes every byte,
    fallocate --dig-holes makes holes of its zero blocks, same content."""
    with lab.loaded("localhost/cdi-test/sparse:1", [SPARSE_LAYER]) as image:
        upper = podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                       image.id).strip()
        stored = Path(upper) / "sparse.bin"
        subprocess.run(["fallocate", "--dig-holes", str(stored)], check=True)
        assert stored.stat().st_blocks * 512 < 1 << 20, "fallocate made no hole"
        yield image


def test_save_path_leaves_zero_blocks_as_holes(sparse_image):
    extents = extent_map(f"name={sparse_image.name}", "copy=true")
    assert_holes_hold_zeros(extents, SPARSE_LAYER, at_least=7 << 20)


def test_fast_path_shows_the_holes_of_the_stored_file(sparse_image):
    extents = extent_map(f"name={sparse_image.name}")
    assert_holes_hold_zeros(extents, SPARSE_LAYER, at_least=(8 << 20) - (64 << 10))
    assert sha256(read_export(f"name={sparse_image.name}")) == sparse_image.diff_ids[0]


def test_tar_filter_shows_the_holes_of_the_entry(sparse_image):
    extents = extent_map(f"name={sparse_image.name}", "tar-entry=sparse.bin",
                         filters=["tar"])
    assert sum(extent["length"] for extent in extents) == len(SPARSE)
    assert_holes_hold_zeros(extents, SPARSE, at_least=(8 << 20) - (64 << 10))


# ------------------------------------------------------- a file over 8 GiB

# Over 8 GiB: too big for the tar header's size field, so a pax record holds it.
HUGE_SIZE = (8 << 30) + (100 << 20) + 12345


@pytest.mark.slow
def test_file_over_8_gib_is_served_exactly_and_sparsely(lab):
    info = tarfile.TarInfo("disk/huge.img")
    info.size, info.mode, info.mtime = HUGE_SIZE, 0o644, MTIME
    header = info.tobuf(tarfile.PAX_FORMAT)
    start = len(header)
    nonzero = [(start, b"first"), (start + (5 << 30), b"middle"),
               (start + HUGE_SIZE - 4, b"last")]
    layer = Layer(start + HUGE_SIZE + (-HUGE_SIZE % 512) + 1024,
                  [(offset, len(data), data) for offset, data in [(0, header), *nonzero]])
    with lab.loaded("localhost/cdi-test/huge:1", [layer]) as image:
        upper = podman("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                       image.id).strip()
        subprocess.run(["fallocate", "--dig-holes", f"{upper}/disk/huge.img"], check=True)
        # verify=false: the test hashes every byte itself.
        params = (f"name={image.name}", "verify=false")
        extents = extent_map(*params)
        with serve(lab, *params) as server, connected(server.socket) as handle:
            assert handle.get_size() == layer.size
            assert handle.get_export_description().endswith(": disk/huge.img (8.1 GiB)")
            hasher = hashlib.sha256()
            for offset in range(0, layer.size, 32 << 20):
                hasher.update(handle.pread(min(32 << 20, layer.size - offset), offset))
        assert "sha256:" + hasher.hexdigest() == image.diff_ids[0]
    holes = [extent for extent in extents if extent["type"] & 1]
    assert sum(hole["length"] for hole in holes) > 8 << 30
    for offset, data in nonzero:
        assert not any(hole["offset"] <= offset < hole["offset"] + hole["length"]
                       for hole in holes), f"{data!r} at {offset} is in a hole"
