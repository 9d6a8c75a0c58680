"""Choosing the VM disk in the merged filesystem of an image's layers."""

import pytest

from cdipy.disk import choose_disk, merged_files
from cdipy.errors import CdiError
from cdipy.layer import Member, member_kind


def layer(*names):
    """Members named NAMES: a trailing "/" is a directory, "->" a link."""
    members = []
    for name in names:
        kind = "link" if name.endswith("->") else member_kind(name, b"0")
        members.append(Member(name.rstrip("->"), kind, 10, 512))
    return members


def choose(*layers):
    return choose_disk(list(enumerate(layers)), "img")


def test_a_disk_in_one_layer_is_chosen():
    choice = choose(layer("etc/", "etc/hosts"), layer("disk/", "disk/a.qcow2"))
    assert (choice.index, choice.member.name) == (1, "disk/a.qcow2")
    assert choice.why == "the only regular file under disk/ once the 2 layers are merged"


def test_a_later_layer_replacing_the_disk_wins():
    choice = choose(layer("disk/", "disk/a.qcow2"), layer("disk/", "disk/a.qcow2"))
    assert choice.index == 1
    assert "disk/a.qcow2 of layer 0 (replaced by layer 1)" in choice.why


def test_a_whited_out_disk_is_not_a_candidate():
    choice = choose(layer("disk/old.img"), layer("disk/.wh.old.img", "disk/new.img"))
    assert choice.member.name == "disk/new.img"
    assert "disk/old.img of layer 0 (whited out by layer 1)" in choice.why


def test_a_whiteout_after_the_new_disk_in_the_same_layer_still_hides_only_the_old():
    choice = choose(layer("disk/old.img"), layer("disk/new.img", "disk/.wh.old.img"))
    assert choice.member.name == "disk/new.img"


def test_an_opaque_directory_hides_the_disks_below():
    choice = choose(layer("disk/a.img", "disk/b.img"), layer("disk/.wh..wh..opq", "disk/c.img"))
    assert (choice.index, choice.member.name) == (1, "disk/c.img")


def test_a_whited_out_directory_hides_its_files():
    choice = choose(layer("disk/a.img", "b.img"), layer(".wh.disk"))
    assert choice.member.name == "b.img"
    assert choice.why.startswith("the only regular file at the root, with no disk/")


def test_a_file_replacing_the_directory_hides_its_files():
    files, _ = merged_files(list(enumerate([layer("disk/a.img"), layer("disk")])))
    assert sorted(files) == ["disk"]


def test_a_link_replacing_the_disk_hides_it():
    with pytest.raises(CdiError) as error:
        choose(layer("disk/a.img"), layer("disk/a.img->"))
    assert str(error.value) == (
        "img: no VM disk: the merged filesystem of its 2 layers has no regular file "
        "under disk/ nor at the root; disk/a.img of layer 0 (replaced by layer 1)")


def test_several_candidates_are_listed_with_how_to_choose():
    with pytest.raises(CdiError) as error:
        choose(layer("disk/a.img"), layer("disk/b.qcow2"))
    assert str(error.value) == (
        "img: 2 candidate VM disks: disk/a.img (layer 0), disk/b.qcow2 (layer 1); "
        "serve one with layer=N --filter=tar tar-entry=PATH")


def test_files_at_the_root_do_not_count_when_disk_has_one():
    assert choose(layer("a.img", "b.img", "disk/c.img")).member.name == "disk/c.img"


def test_several_files_at_the_root_are_listed():
    with pytest.raises(CdiError, match=r"2 candidate VM disks: a.img \(layer 0\), "
                                       r"b.img \(layer 0\)"):
        choose(layer("a.img", "b.img", "etc/x"))


def test_a_root_opaque_marker_hides_everything_below():
    choice = choose(layer("disk/a.img"), layer(".wh..wh..opq", "c.img"))
    assert choice.member.name == "c.img"


def test_many_files_merge_quickly():
    names = [f"usr/lib/{index // 100}/file{index}" for index in range(20_000)]
    files, _ = merged_files([(0, layer(*names)), (1, layer(*names, "disk/x.img"))])
    assert len(files) == 20_001


def test_a_directory_replacing_a_file_hides_the_file():
    choice = choose(layer("boot.img", "disk/a.img"), layer("boot.img/", "boot.img/x"))
    assert choice.member.name == "disk/a.img"
    files, _ = merged_files(list(enumerate([layer("vm.img"), layer("vm.img/")])))
    assert files == {}


def test_one_layer_is_said_so():
    assert choose(layer("disk/a.img")).why == (
        "the only regular file under disk/ once the 1 layer is merged")
