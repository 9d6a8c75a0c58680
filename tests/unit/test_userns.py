"""The protocol between cdi.py and its helper in podman's user namespace,
the helper's side run in a thread on a socket pair (podman unshare itself
is for the end-to-end tests)."""

import errno
import os
import socket
import threading

import pytest

from cdipy import userns_helper
from cdipy.userns import NamespaceOpener


@pytest.fixture
def opener():
    """A NamespaceOpener talking to userns_helper.serve in a thread."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    helper = threading.Thread(target=userns_helper.serve, args=(theirs,), daemon=True)
    helper.start()
    namespace = NamespaceOpener("img")
    namespace.socket = ours
    yield namespace
    ours.close()      # the helper sees the end of the requests...
    helper.join(5)    # ...and returns
    assert not helper.is_alive()
    theirs.close()


def read(fd):
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_helper_opens_a_file_beneath_a_non_ascii_directory(opener, tmp_path):
    root = tmp_path / "dé" / "diff"
    (root / "disk").mkdir(parents=True)
    (root / "disk" / "disk.img").write_bytes(b"the disk")
    assert read(opener.open(str(root), (b"disk", b"disk.img"))) == b"the disk"


def test_helper_keeps_a_newline_in_a_name(opener, tmp_path):
    (tmp_path / "a\nb").write_bytes(b"newline")
    (tmp_path / "a").write_bytes(b"not me")
    assert read(opener.open(str(tmp_path), (b"a\nb",))) == b"newline"
    assert read(opener.open(str(tmp_path), (b"a",))) == b"not me"


def test_helper_answers_a_missing_file_with_its_errno_and_goes_on(opener, tmp_path):
    (tmp_path / "here").write_bytes(b"here")
    with pytest.raises(OSError) as failure:
        opener.open(str(tmp_path), (b"gone",))
    assert failure.value.errno == errno.ENOENT
    assert read(opener.open(str(tmp_path), (b"here",))) == b"here"


def test_helper_follows_no_symlink(opener, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(OSError) as failure:
        opener.open(str(tmp_path), (b"link", b"file"))
    assert failure.value.errno == errno.ENOTDIR


def test_helper_refuses_dot_dot(opener, tmp_path):
    with pytest.raises(OSError) as failure:
        opener.open(str(tmp_path / "sub"), (b"..", b"x"))
    assert failure.value.errno == errno.EINVAL
