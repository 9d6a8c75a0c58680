"""Which export a name selects, what each export says it holds, and why a
layer is copied rather than served from storage.  Nothing here is built:
the image is an inspect record, and podman is never needed."""

import base64
import gzip
import json

import pytest

from cdipy.cache import PrivateCache
from cdipy.errors import CdiError, NoSuchExport
from cdipy.exports import Exports
from cdipy.parameters import Settings
from cdipy.sources.in_place import podman_image_source
from cdipy.verify import CheckRecords

NAME = "quay.io/kubevirt/fedora-cloud-container-disk-demo"
DIFF_IDS = ["sha256:" + digit * 64 for digit in "123"]


RECORDS, MAPS = CheckRecords(PrivateCache(None)), PrivateCache(None)


def table(settings, image):
    """The table start-up fills for IMAGE (with no podman: none is vfs)."""
    return Exports(podman_image_source(image, settings, MAPS), settings, RECORDS)


def image_record(layers=DIFF_IDS, driver=None):
    record = {"Id": "0" * 64, "RootFS": {"Layers": list(layers)}}
    if driver is not None:
        record["GraphDriver"] = driver
    return record


@pytest.fixture
def exports():
    """Three layers to copy (copy=true), the default export being layer 1."""
    exports = table(Settings(name=NAME, copy=True), image_record())
    exports.default_name = "1"
    return exports


# --------------------------------------------------------------------- find

def test_find_of_the_empty_name_is_the_default_export(exports):
    assert exports.find("") is exports.exports[1]


def test_find_of_an_index_is_that_layer(exports):
    assert exports.find("0") is exports.exports[0]
    assert exports.find("2") is exports.exports[2]


def test_find_of_a_negative_index_counts_from_the_top(exports):
    assert exports.find("-1") is exports.exports[2]
    assert exports.find("-3") is exports.exports[0]


def test_find_of_a_diff_id_is_the_layer_with_it(exports):
    assert exports.find(DIFF_IDS[2]) is exports.exports[2]
    assert exports.find(DIFF_IDS[0]) is exports.exports[0]


@pytest.mark.parametrize("name", ["3", "-4", "x", "1" * 30, "sha256:" + "9" * 64, "1.0"])
def test_find_of_no_such_export_is_none(exports, name):
    assert exports.find(name) is None


def test_exports_hold_their_index_and_diff_id(exports):
    assert [(export.index, export.digest) for export in exports.exports] == list(
        enumerate(DIFF_IDS))


def test_names_are_the_layer_indexes(exports):
    assert exports.names() == ["0", "1", "2", "disk"]


def test_open_of_no_such_export_lists_the_exports(exports):
    with pytest.raises(NoSuchExport) as raised:
        exports.open("7")
    assert str(raised.value) == (
        "no export '7': the exports are 0, 1, 2, disk (or -1, -2, ... or a layer's diffID)")


# ----------------------------------------------------------------- describe

def test_describe_of_a_layer_not_yet_copied_says_when_it_will_be(exports):
    assert exports.describe(exports.exports[0]) == (
        f"layer 0 of 3: {DIFF_IDS[0]}: copied with podman save when first opened (copy=true)")


def test_describe_of_a_layer_that_failed_says_why(exports):
    exports.exports[2].failure = f"{NAME}: save: podman exit status 125: Error: boom"
    assert exports.describe(exports.exports[2]) == (
        f"layer 2 of 3: {DIFF_IDS[2]}: cannot be served: "
        f"{NAME}: save: podman exit status 125: Error: boom")


def test_listing_describes_every_export_by_name(exports):
    listing = exports.listing()
    assert [name for name, _ in listing] == ["0", "1", "2"]
    assert listing[1][1].startswith(f"layer 1 of 3: {DIFF_IDS[1]}: copied with")


def test_the_disk_of_layers_to_copy_is_found_when_first_opened(exports):
    assert exports.find("disk") is exports.disk
    assert exports.describe(exports.disk) == (
        "the VM disk file, found when first opened (with podman save)")


# ---------------------------------------------------- served or copied, why

def test_copy_true_copies_every_layer(exports):
    assert [(exports.source.in_place(index), exports.source.pending(index).endswith(
        "(copy=true)")) for index in range(3)] == [(False, True)] * 3


def test_storage_driver_other_than_overlay_copies_every_layer():
    exports = table(Settings(name=NAME), image_record(driver={"Name": "btrfs", "Data": {}}))
    assert exports.source.not_in_storage == [
        "cannot serve from podman's storage (storage driver 'btrfs' is not overlay or vfs)"] * 3
    assert exports.source.plans == [None] * 3


def test_image_without_graph_driver_copies_every_layer():
    exports = table(Settings(name=NAME), image_record())
    assert exports.source.not_in_storage[0] == (
        "cannot serve from podman's storage (storage driver None is not overlay or vfs)")


def test_describe_of_a_layer_storage_cannot_serve_says_why():
    exports = table(Settings(name=NAME), image_record(driver={"Name": "btrfs"}))
    assert exports.describe(exports.exports[2]) == (
        f"layer 2 of 3: {DIFF_IDS[2]}: copied with podman save when first opened "
        "(cannot serve from podman's storage (storage driver 'btrfs' is not overlay or vfs))")


# ------------------------------------------------------- the default layer

def test_default_layer_out_of_range_gives_the_allowed_range():
    settings = Settings(name=NAME, layer=3, copy=True)
    with pytest.raises(CdiError) as raised:
        table(settings, image_record()).build_default()
    assert str(raised.value) == (
        f"{NAME}: layer=3 is out of range: the image has 3 layers (allowed: 0..2 or -3..-1)")


def test_default_layer_below_the_base_is_out_of_range():
    settings = Settings(name=NAME, layer=-4, copy=True)
    with pytest.raises(CdiError, match=r"layer=-4 is out of range: the image has 3 layers"):
        table(settings, image_record()).build_default()


def test_default_layer_of_an_image_with_one_layer_uses_the_singular():
    settings = Settings(name=NAME, layer=1, copy=True)
    with pytest.raises(CdiError) as raised:
        table(settings, image_record(DIFF_IDS[:1])).build_default()
    assert str(raised.value) == (
        f"{NAME}: layer=1 is out of range: the image has 1 layer (allowed: 0..0 or -1..-1)")


def test_default_layer_of_an_image_with_no_layers_allows_none():
    settings = Settings(name=NAME, layer=0, copy=True)
    with pytest.raises(CdiError) as raised:
        table(settings, image_record([])).build_default()
    assert str(raised.value) == (
        f"{NAME}: layer=0 is out of range: the image has 0 layers (allowed: none)")


# ------------------------------------------------- served from overlay storage

@pytest.fixture
def stored_image(tmp_path):
    """An image of one empty layer (a tar of its two end blocks alone) in
    overlay storage laid out as podman lays it out, under tmp_path."""
    diff_dir = tmp_path / "overlay" / "L1" / "diff"
    diff_dir.mkdir(parents=True)
    (tmp_path / "overlay-layers").mkdir()
    (tmp_path / "overlay-layers" / "layers.json").write_text(json.dumps(
        [{"id": "L1", "diff-digest": DIFF_IDS[0], "diff-size": 1024}]))
    line = json.dumps({"type": 2, "payload": base64.b64encode(bytes(1024)).decode()})
    (tmp_path / "overlay-layers" / "L1.tar-split.gz").write_bytes(
        gzip.compress(line.encode() + b"\n"))
    return image_record(DIFF_IDS[:1], driver={"Name": "overlay",
                                              "Data": {"UpperDir": str(diff_dir)}})


@pytest.fixture
def stored_exports(stored_image):
    exports = table(Settings(name=NAME, verify="false"), stored_image)
    exports.default_name = "0"
    yield exports
    exports.close()


def test_layer_in_overlay_storage_is_planned_not_copied(stored_exports, tmp_path):
    source = stored_exports.source
    assert (source.plans[0].diff_dir, source.not_in_storage[0]) == (
        str(tmp_path / "overlay" / "L1" / "diff"), None)


def test_describe_of_a_layer_in_storage_opens_it_to_tell(stored_exports):
    assert stored_exports.describe(stored_exports.exports[0]) == (
        f"layer 0 of 1: {DIFF_IDS[0]}, 1.0 KiB: empty")
    assert stored_exports.exports[0].layer.served_from == "storage"


def test_open_of_a_layer_built_from_storage_is_that_layer(stored_exports):
    stored_exports.describe(stored_exports.exports[0])
    assert stored_exports.open("") is stored_exports.exports[0].layer


def test_describe_of_a_layer_storage_fails_to_open_falls_back_to_copying(
        stored_exports, tmp_path):
    tar_split = tmp_path / "overlay-layers" / "L1.tar-split.gz"
    tar_split.unlink()
    export = stored_exports.exports[0]
    assert stored_exports.describe(export) == (
        f"layer 0 of 1: {DIFF_IDS[0]}: copied with podman save when first opened "
        f"(cannot serve from podman's storage (cannot read {tar_split}: "
        "No such file or directory))")
    assert stored_exports.source.plans[0] is None
