"""The engine for a file that arrives, driven a step at a time: a format of
the test's own whose pieces arrive only when the test lets each through,
so that every state the engine passes through can be looked at, with no
sleep standing in for one.  (The formats themselves, against a registry of
bytes: test_chunks.py, test_stream.py.)"""

import errno
import threading
import time

import pytest

from cdipy.errors import CdiError, RegistryError, Unsupported
from cdipy.oci import arrival
from cdipy.oci.arrival import Arrival, Broken

PIECE = 10
WAIT = 30  # seconds: a bound on a wait that must end at once, never a state


class Pieces:
    """A file of COUNT pieces of PIECE bytes.  produce() waits until the test
    lets the piece through (let(piece)) unless GATED is false; a piece given
    an error in FAULTS raises it (once, or always)."""
    read_ahead = 2
    fill_idle = 3600.0  # the fill waits for readers quiet for an hour: only where a test says
    label = "img: the test's file"

    def __init__(self, count, gated=True, parallel=4):
        self.count, self.gated, self.at_once = count, gated, parallel
        self.data = bytearray(count * PIECE)
        self.held = [False] * count
        self.produced = []               # pieces, in the order they were produced
        self.faults, self.always = {}, set()
        self.checks, self.bad = 0, False
        self.lets = {piece: threading.Event() for piece in range(count)}
        self.started = threading.Condition()
        self.running = set()             # pieces being produced now

    def holds(self, piece):
        return self.held[piece]

    def needed(self, offset, count):
        return [piece for piece in range(offset // PIECE, (offset + count - 1) // PIECE + 1)
                if not self.held[piece]]

    def span(self, offset, count):
        return offset // PIECE, (offset + count - 1) // PIECE

    def missing(self):
        return [piece for piece in range(self.count) if not self.held[piece]]

    def parked(self):
        return None

    def left(self):
        return len(self.missing()) * PIECE

    def parallel(self):
        return self.at_once

    def produce(self, piece, last):
        with self.started:
            self.running.add(piece)
            self.started.notify_all()
        try:
            if self.gated:
                assert self.lets[piece].wait(WAIT), f"piece {piece} never let through"
            if piece in self.faults:
                error = self.faults[piece] if piece in self.always else self.faults.pop(piece)
                raise error
            self.data[piece * PIECE:(piece + 1) * PIECE] = bytes([piece + 1]) * PIECE
            self.held[piece] = True
            self.produced.append(piece)
        finally:
            with self.started:
                self.running.discard(piece)

    def check(self):
        self.checks += 1
        if self.bad:
            raise Broken("img: verify: the test's file does not match its digest")
        return "learnt"

    # for the test

    def let(self, *pieces):
        for piece in pieces:
            self.lets[piece].set()

    def wait_running(self, piece):
        with self.started:
            assert self.started.wait_for(lambda: piece in self.running, WAIT), \
                f"piece {piece} was never asked for"


@pytest.fixture
def engine():
    """engine(form, workers=4, start=True) -> an Arrival of FORM; each stopped after."""
    made = []

    def make(form, workers=4, start=True):
        wholes = []
        engine = Arrival(form, wholes.append, workers=workers)
        engine.wholes = wholes
        made.append((engine, form))
        if start:
            engine.start()
        return engine

    yield make
    for engine, form in made:
        form.let(*range(form.count))
        assert engine.stop(WAIT), "a thread of the engine outlived the test"


def reading(engine, offset, count):
    """A reader in a thread of its own: (thread, outcome) where outcome gets
    "done" or the OSError's strerror."""
    outcome = []

    def read():
        try:
            engine.wait(offset, count)
            outcome.append("done")
        except OSError as error:
            outcome.append(error.strerror)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, outcome


def finished(thread):
    thread.join(WAIT)
    return not thread.is_alive()


def test_a_reader_waits_for_its_piece_and_no_other(engine):
    form = Pieces(8)
    file = engine(form)
    thread, outcome = reading(file, 3 * PIECE + 2, 4)
    form.wait_running(3)
    assert outcome == [], "the read returned before its piece arrived"
    form.let(3)
    assert finished(thread) and outcome == ["done"]
    assert form.produced == [3]


def test_two_readers_of_one_piece_cause_one_fetch(engine):
    form = Pieces(4)
    file = engine(form)
    first, one = reading(file, 0, 5)
    form.wait_running(0)
    second, two = reading(file, 5, 5)
    form.let(0)
    assert finished(first) and finished(second) and one == two == ["done"]
    assert form.produced == [0]


def test_a_reader_in_order_gets_the_next_pieces_fetched_ahead(engine):
    form = Pieces(8, parallel=1)
    file = engine(form)
    form.let(0, 1)
    file.wait(0, PIECE)
    file.wait(PIECE, PIECE)  # in order: pieces 2 and 3 are asked for ahead of it
    form.wait_running(2)
    form.let(2, 3)
    with file.condition:
        assert file.condition.wait_for(lambda: form.held[3], WAIT)
    assert form.produced == [0, 1, 2, 3]


def test_what_a_reader_asks_for_comes_before_what_is_ahead(engine):
    form = Pieces(8, parallel=1)
    file = engine(form)
    form.let(0, 1)
    file.wait(0, PIECE)
    file.wait(PIECE, PIECE)
    form.wait_running(2)  # ahead: 2, then 3
    thread, outcome = reading(file, 6 * PIECE, 1)
    with file.condition:
        assert file.condition.wait_for(lambda: 6 in file.queue, WAIT)
    form.let(2, 3, 6)
    assert finished(thread) and outcome == ["done"]
    assert form.produced[2:4] == [2, 6], "the reader's piece waited for the read-ahead"


def test_a_piece_that_fails_fails_its_readers_and_the_next_read_tries_again(engine):
    form = Pieces(4, gated=False)
    form.faults[1] = CdiError("img: piece 1: the registry said no")
    file = engine(form)
    with pytest.raises(OSError) as raised:
        file.wait(PIECE, 1)
    assert raised.value.errno == errno.EIO
    assert raised.value.strerror == "img: piece 1: the registry said no"
    file.wait(PIECE, 1)
    assert form.held[1]
    assert file.failure is None, "one piece's failure failed the file"


def test_a_transient_fault_is_tried_again_within_the_read(engine, monkeypatch):
    monkeypatch.setattr(arrival, "FIRST_RETRY", 0.001)
    form = Pieces(2, gated=False)
    form.faults[0] = RegistryError("img: the connection was cut", transient=True)
    file = engine(form)
    file.wait(0, 1)
    assert form.produced == [0]


def test_a_transient_fault_that_lasts_fails_the_read_with_it(engine, monkeypatch):
    monkeypatch.setattr(arrival, "FIRST_RETRY", 0.001)
    monkeypatch.setattr(arrival, "RETRY_SECONDS", 0.05)
    form = Pieces(2, gated=False)
    form.faults[0] = RegistryError("img: the connection was refused", transient=True)
    form.always.add(0)
    file = engine(form)
    with pytest.raises(OSError, match="img: the connection was refused$"):
        file.wait(0, 1)


def test_a_broken_file_fails_every_read_from_then_on(engine):
    form = Pieces(4, gated=False)
    form.faults[2] = Broken("img: the test's file is not a valid stream")
    file = engine(form)
    with pytest.raises(OSError, match="not a valid stream"):
        file.wait(2 * PIECE, 1)
    with pytest.raises(OSError, match="not a valid stream"):
        file.wait(0, 1)  # a piece that could arrive: the file cannot be right


def test_a_bug_in_a_format_fails_the_file_saying_what(engine):
    form = Pieces(2, gated=False)
    form.faults[0] = ValueError("a bug")
    file = engine(form)
    with pytest.raises(OSError, match=r"img: the test's file: fetching it: ValueError\('a bug'\)"):
        file.wait(0, 1)


def test_once_whole_it_is_checked_once_and_handed_on(engine):
    form = Pieces(3, gated=False)
    file = engine(form)
    file.wait(0, 3 * PIECE)
    file.wait_until(lambda: file.whole)
    assert form.checks == 1 and file.wholes == ["learnt"]


def test_a_whole_file_that_fails_its_check_fails_every_read(engine):
    form = Pieces(3, gated=False)
    form.bad = True
    file = engine(form)
    with pytest.raises(OSError, match="does not match its digest"):
        file.wait_until(lambda: file.whole)
    with pytest.raises(OSError, match="does not match its digest"):
        file.wait(0, 1)
    assert file.wholes == []


def test_before_the_threads_run_the_reader_fetches_itself(engine):
    form = Pieces(4, gated=False)
    file = engine(form, start=False)
    file.wait(PIECE, PIECE + 1)
    assert form.produced == [1, 2] and not file.threads


def test_the_fill_waits_for_the_readers_to_be_quiet(engine):
    form = Pieces(4)
    file = engine(form, workers=1)
    form.let(*range(4))
    file.wait(0, 1)
    assert form.produced == [0], "the fill fetched while a reader read"
    file.last_read_time -= 3600.0  # an hour later
    with file.condition:
        file.condition.notify_all()
        assert file.condition.wait_for(lambda: file.whole, WAIT)
    assert form.produced == [0, 1, 2, 3]


def test_the_fill_stops_at_a_failure_until_a_reader_brings_a_piece(engine):
    form = Pieces(4)
    form.fill_idle = 0.0
    form.faults[1] = CdiError("img: piece 1: no")
    file = engine(form, workers=1)
    form.let(0, 1)
    with file.condition:
        assert file.condition.wait_for(lambda: 1 in file.failed, WAIT)
    assert form.produced == [0]
    form.let(2, 3)
    file.wait(PIECE, 1)  # the reader's piece arrives: the fill goes on
    with file.condition:
        assert file.condition.wait_for(lambda: file.whole, WAIT)
    assert sorted(form.produced) == [0, 1, 2, 3]


def test_no_more_pieces_at_once_than_the_format_allows(engine):
    form = Pieces(6, parallel=1)
    file = engine(form)
    thread, outcome = reading(file, 0, 6 * PIECE)
    form.wait_running(0)
    with form.started:
        assert form.running == {0}
    form.let(*range(6))
    assert finished(thread) and outcome == ["done"]


def test_little_left_as_the_server_stops_is_taken_in(engine):
    form = Pieces(4, gated=False)
    file = engine(form, start=False)
    file.wait(0, 3 * PIECE)
    assert file.take_the_rest(PIECE, deadline=float("inf"))
    assert file.wholes == ["learnt"]


def test_more_left_as_the_server_stops_is_not(engine):
    form = Pieces(4, gated=False)
    file = engine(form, start=False)
    file.wait(0, PIECE)
    assert not file.take_the_rest(PIECE, deadline=float("inf"))
    assert form.produced == [0]


def test_stopping_waits_for_a_check_under_way(engine):
    form = Pieces(2, gated=False)
    began, go_on = threading.Event(), threading.Event()
    check = form.check

    def held_up():
        began.set()
        assert go_on.wait(WAIT)
        return check()

    form.check = held_up
    file = engine(form)
    file.wait(0, 2 * PIECE)
    assert began.wait(WAIT), "no thread began the check"
    stopping = threading.Thread(target=file.stop)
    stopping.start()
    with file.condition:
        assert file.condition.wait_for(lambda: file.stopping, WAIT)
    assert stopping.is_alive() and file.wholes == []
    go_on.set()
    assert finished(stopping) and file.wholes == ["learnt"]


def test_a_piece_queued_ahead_then_asked_for_is_fetched_first(engine):
    form = Pieces(8, parallel=1)
    form.read_ahead = 3
    file = engine(form)
    form.let(0, 1)
    file.wait(0, PIECE)
    file.wait(PIECE, PIECE)  # ahead, in this order: 2, 3, 4
    form.wait_running(2)
    thread, outcome = reading(file, 4 * PIECE, 1)
    with file.condition:
        assert file.condition.wait_for(lambda: file.queue.priority(4) == arrival.CLIENT, WAIT)
    form.let(2, 3, 4)
    assert finished(thread) and outcome == ["done"]
    assert form.produced[2:] == [2, 4, 3]


def test_a_reader_waiting_as_the_server_stops_is_told(engine):
    form = Pieces(2)
    file = engine(form, workers=1)
    thread, outcome = reading(file, 0, 1)
    form.wait_running(0)
    file.stopping = True
    with file.condition:
        file.condition.notify_all()
    assert finished(thread), "a reader still waits for a server that stops"
    assert outcome == ["img: the test's file: the server is stopping"]


def test_the_queue_gives_the_highest_priority_first_then_the_order_asked():
    queue = arrival.Queue()
    for piece, priority in ((5, arrival.AHEAD), (6, arrival.AHEAD), (7, arrival.CLIENT),
                            (6, arrival.CLIENT), (7, arrival.AHEAD)):
        queue.push(piece, priority)
    assert [queue.pop() for _ in range(4)] == [7, 6, 5, None]
    assert not queue


def test_a_reader_in_order_over_pieces_here_still_gets_the_next_ones_ahead(engine):
    form = Pieces(12, gated=False, parallel=1)
    file = engine(form)
    file.wait(0, PIECE)
    file.wait(PIECE, PIECE)  # ahead: 2 and 3
    with file.condition:
        assert file.condition.wait_for(lambda: form.held[3], WAIT)
    file.wait(2 * PIECE, PIECE)  # here already
    file.wait(3 * PIECE, PIECE)
    file.wait(4 * PIECE, PIECE)  # still in order: 5 and 6 ahead
    with file.condition:
        assert file.condition.wait_for(lambda: form.held[6], WAIT), \
            "the reader's order was lost over the pieces that were here"


def test_a_source_that_cannot_give_a_range_fails_that_read_alone(engine):
    form = Pieces(2, gated=False)
    form.faults[0] = Unsupported("the mirror answered 416")
    file = engine(form)
    with pytest.raises(OSError, match="img: the test's file: the mirror answered 416"):
        file.wait(0, 1)
    file.wait(0, 1)
    assert file.failure is None


def test_at_stop_a_fill_that_gave_up_is_not_waited_for(engine):
    form = Pieces(3, gated=False)
    form.fill_idle = 0.0
    form.faults[0] = CdiError("img: the registry is gone")
    form.always.add(0)
    file = engine(form, workers=1)
    with file.condition:
        assert file.condition.wait_for(lambda: file.fill_waits, WAIT)
    started = time.monotonic()
    assert not file.take_the_rest(3 * PIECE, deadline=started + WAIT)
    assert time.monotonic() - started < WAIT / 2, "waited for a fill that gave up"


def test_a_piece_the_format_parked_is_produced_as_the_workers_start(engine):
    form = Pieces(4, gated=False)
    form.parked = lambda: 2
    file = engine(form)
    with file.condition:
        assert file.condition.wait_for(lambda: form.held[2], WAIT), \
            "the parked piece waited for a reader or the fill"
    assert form.produced == [2]
