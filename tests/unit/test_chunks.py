"""A blob served as it arrives: the record of the chunks held, what a
restart finds, reads that fetch what they need and no more, extents that
never call what has not arrived zero, and the check once whole.

The registry here is plain data: fakes.Registry, blobs in memory (the
end-to-end tests use the real registry)."""

import errno
import hashlib
import os
import threading

import pytest

from cdipy.cache import Cache
from cdipy.layer import DATA, Member, Window
from cdipy.oci import arrival, chunks
from cdipy.oci.chunks import CHUNK, PartialBlob, RemoteBlob
from fakes import Registry

SIZE = 5 * CHUNK + 1000


@pytest.fixture
def data():
    return os.urandom(5 * CHUNK) + bytes(1000)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def make(tmp_path, data):
    """make(registry=None, digest=None) -> a RemoteBlob of DATA; each is closed after."""
    made, wholes = [], []

    def make_blob(registry=None, digest=None):
        registry = registry or Registry(data)
        partial = PartialBlob(Cache(str(tmp_path)), digest or digest_of(data), SIZE,
                              "img")
        blob = RemoteBlob(0, registry, partial, lambda layer, zeros: wholes.append(zeros))
        made.append(blob)
        return blob

    make_blob.wholes = wholes
    yield make_blob
    for blob in made:
        blob.close()


def read(layer, offset, length):
    view = bytearray(length)
    layer.read(memoryview(view), offset)
    return bytes(view)


def test_a_read_fetches_its_chunk_alone(make, data):
    blob = make()
    assert read(blob, 3 * CHUNK + 10, 4096) == data[3 * CHUNK + 10:3 * CHUNK + 4106]
    assert blob.registry.ranges == [(3 * CHUNK, 4 * CHUNK)]


def test_a_read_across_two_chunks_fetches_both(make, data):
    blob = make()
    assert read(blob, CHUNK - 10, 20) == data[CHUNK - 10:CHUNK + 10]
    assert blob.registry.ranges == [(0, CHUNK), (CHUNK, 2 * CHUNK)]


def test_the_last_chunk_is_short(make, data):
    blob = make()
    assert read(blob, SIZE - 100, 100) == data[-100:]
    assert blob.registry.ranges == [(5 * CHUNK, SIZE)]


def test_a_restart_finds_the_chunks_held(make, data):
    read(make(), 0, 10)
    again = make()
    assert read(again, 5, 10) == data[5:15]
    assert again.registry.ranges == []


def test_a_damaged_record_starts_anew(make, tmp_path, data):
    read(make(), 0, 10)
    record = next((tmp_path / "partial").glob("*.chunks"))
    record.write_bytes(b"\2" * 3)
    again = make()
    assert read(again, 5, 10) == data[5:15]
    assert again.registry.ranges == [(0, CHUNK)]


def test_what_has_not_arrived_is_data_never_zero(make):
    blob = make()
    assert blob.extents(0, SIZE) == [(0, SIZE, DATA)]
    assert blob.registry.ranges == [], "extents fetched"


def test_a_cut_connection_is_tried_again(make, data, monkeypatch):
    monkeypatch.setattr(arrival, "FIRST_RETRY", 0.001)
    blob = make(Registry(data, failures=2))
    assert read(blob, 0, 10) == data[:10]


def test_a_registry_that_stays_away_fails_the_read_never_with_zeros(make, data, monkeypatch):
    monkeypatch.setattr(arrival, "FIRST_RETRY", 0.001)
    monkeypatch.setattr(arrival, "RETRY_SECONDS", 0.05)
    blob = make(Registry(data, failures=10**6))
    with pytest.raises(OSError) as raised:
        read(blob, 0, 10)
    assert raised.value.errno == errno.EIO
    assert "the connection was cut" in raised.value.strerror


def test_a_whole_blob_that_matches_its_digest_is_handed_on_with_its_zeros(make, data):
    blob = make()
    read(blob, 0, SIZE)
    blob.arrival.finish_if_complete()
    assert blob.verified
    assert make.wholes == [[(5 * CHUNK, SIZE)]]


def test_a_whole_blob_that_does_not_match_fails_every_read(make, data, tmp_path):
    blob = make(digest="sha256:" + "0" * 64)
    with pytest.raises(OSError, match="hashes to sha256:"):
        read(blob, 0, SIZE)  # the read that made it whole
    assert make.wholes == []
    with pytest.raises(OSError, match="hashes to sha256:"):
        read(blob, 0, 10)
    with pytest.raises(OSError, match="hashes to sha256:"):
        blob.extents(0, 10)
    # Its lock alone stays (empty, and never removed: processes lock it).
    assert [path.suffix for path in (tmp_path / "partial").iterdir()] == [".lock"], \
        "the partial blob stays"


def test_a_window_reads_through_it(make, data):
    blob = make()
    window = Window(blob, Member("disk.img", "file", SIZE, 0), "the only blob")
    assert read(window, CHUNK * 2, 8) == data[CHUNK * 2:CHUNK * 2 + 8]
    assert blob.registry.ranges == [(2 * CHUNK, 3 * CHUNK)]


def test_a_blob_read_whole_before_the_workers_run_is_checked_at_once(make, data):
    blob = make()  # no workers: the reads fetch, and check the whole
    assert read(blob, 0, SIZE) == data[:SIZE]
    assert len(make.wholes) == 1, "read whole, and not checked"


def test_a_check_a_worker_began_is_finished_before_the_server_stops(make, data, monkeypatch):
    began, go_on = threading.Event(), threading.Event()
    note_zeros = chunks.note_zeros

    def held_up(*args):  # a step of the check, held until the test says
        began.set()
        go_on.wait(30)
        note_zeros(*args)

    monkeypatch.setattr(chunks, "note_zeros", held_up)
    blob = make()
    blob.start()
    assert read(blob, 0, SIZE) == data[:SIZE]
    assert began.wait(30), "no worker began the check of the whole blob"
    closing = threading.Thread(target=blob.close)
    closing.start()
    with blob.arrival.condition:
        assert blob.arrival.condition.wait_for(lambda: blob.arrival.stopping, 30)
    assert closing.is_alive(), "the server stopped with a check under way"
    assert make.wholes == []
    go_on.set()
    closing.join(30)
    assert not closing.is_alive()
    assert len(make.wholes) == 1, "the server stopped without keeping the whole blob"


# ------------------------------------- a pull-through cache that sends it whole

def test_a_whole_answer_to_a_range_fills_every_chunk_once(make, data):
    blob = make(Registry(data, whole=1))
    blob.start()
    assert read(blob, 3 * CHUNK + 10, 4096) == data[3 * CHUNK + 10:3 * CHUNK + 4106]
    assert read(blob, 0, SIZE) == data
    assert blob.registry.wholes == [(3 * CHUNK, 4 * CHUNK)]
    assert blob.registry.ranges == [], "a chunk was asked twice"
    blob.close()  # after the check under way
    assert blob.verified and len(make.wholes) == 1


def test_reads_made_while_a_whole_answer_arrives_wait_for_it(make, data):
    held_back = threading.Event()
    blob = make(Registry(data, whole=1, held_back=held_back))
    blob.start()
    assert read(blob, 10, 10) == data[10:20]  # the answer's first piece
    later = {}
    reader = threading.Thread(target=lambda: later.update(data=read(blob, 4 * CHUNK, 100)))
    reader.start()
    try:
        with blob.arrival.condition:
            assert blob.arrival.condition.wait_for(
                lambda: 4 in blob.arrival.queue, 30), \
                "a worker took the chunk while the whole answer was arriving"
    finally:
        held_back.set()
        reader.join(30)
    assert later["data"] == data[4 * CHUNK:4 * CHUNK + 100]
    assert blob.registry.ranges == [], "a chunk was asked while the whole answer arrived"
    assert len(blob.registry.wholes) == 1


def test_a_whole_answer_cut_short_leaves_the_rest_to_ranges(make, data, monkeypatch):
    monkeypatch.setattr(arrival, "FIRST_RETRY", 0.001)
    blob = make(Registry(data, whole=1, cut=2 * CHUNK + 100))
    blob.start()
    assert read(blob, 0, SIZE) == data
    assert blob.registry.wholes == [(0, CHUNK)]
    assert sorted(blob.registry.ranges) == [(2 * CHUNK, 3 * CHUNK), (3 * CHUNK, 4 * CHUNK),
                                            (4 * CHUNK, 5 * CHUNK), (5 * CHUNK, SIZE)]


def test_a_whole_answer_at_start_up_is_read_on_by_the_workers(make, data):
    blob = make(Registry(data, whole=1))
    assert read(blob, 2 * CHUNK, 10) == data[2 * CHUNK:2 * CHUNK + 10]
    assert list(blob.partial.held) == [1, 1, 1, 0, 0, 0], "kept beyond the chunk read"
    assert read(blob, 4 * CHUNK, 10) == data[4 * CHUNK:4 * CHUNK + 10]
    assert list(blob.partial.held) == [1, 1, 1, 1, 1, 0]
    blob.start()
    assert read(blob, 0, SIZE) == data
    blob.close()
    assert blob.registry.wholes == [(2 * CHUNK, 3 * CHUNK)]
    assert blob.registry.ranges == [], "a chunk was asked twice"
    assert len(make.wholes) == 1


def test_a_whole_answer_never_read_on_is_closed_with_the_blob(make, data):
    closed = []

    def answer():
        try:
            yield data
        finally:
            closed.append(True)

    registry = Registry(data)
    registry.blob_range_or_whole = lambda *_: answer()
    blob = make(registry)
    read(blob, 0, 10)
    assert blob.format.parked_answer and not closed
    blob.close()
    assert closed == [True] and blob.format.parked_answer is None
