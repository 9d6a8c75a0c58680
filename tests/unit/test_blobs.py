"""Compression told by a blob's first bytes (cdipy.oci.blobs.compression_of),
as containers/image tells it: the media type is only a hint."""

import gzip

import pytest
import zstandard

from cdipy.oci.blobs import compression_of


def skippable(data):
    return b"\x50\x2a\x4d\x18" + len(data).to_bytes(4, "little") + data


@pytest.mark.parametrize(("data", "expected"), [
    (gzip.compress(b"tar"), "gzip"),
    (zstandard.ZstdCompressor().compress(b"tar"), "zstd"),
    (skippable(b"metadata") + zstandard.ZstdCompressor().compress(b"tar"), "zstd"),
    (b"\x5f\x2a\x4d\x18" + bytes(4), "zstd"),
    (b"\x60\x2a\x4d\x18" + bytes(4), None),
    (b"disk/disk.img" + bytes(500), None),
    (b"QFI\xfb\0\0\0\3", None),
    (b"\x1f", None),
    (b"", None),
])
def test_compression_is_told_by_the_first_bytes(data, expected):
    assert compression_of(data[:4]) == expected
