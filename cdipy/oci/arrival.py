"""One engine for a file that arrives: a file of the cache filled by one
producer from pieces that a *format* describes, served as its pieces land.

The formats:
- chunks.BlobChunks: a blob as it is, fetched by ranges, in any order;
- stream.Stream: a gzip or zstd layer decompressed as it streams in, in order.

The engine owns what they share: readers waiting on what has arrived,
workers that fetch what readers ask for first and what is ahead of a
reader in order next, a fill that fetches the rest behind them, one retry
policy, every read failed with the reason once the file cannot be right,
and one path to the end: once every piece is here the format checks the
whole against its digest, and only then is it handed on (to be named whole
in the cache).

Until start() runs the workers (after nbdkit forked: threads do not
survive a fork; for a file read only on demand, never), a reader produces
what it needs itself, one reader at a time.

A format is an object with:
- holds(piece), needed(offset, count) -> the missing pieces of that range
  of the file, missing() -> the missing pieces in the order the fill takes
  them, left() -> bytes still to arrive;
- produce(piece, last): fetch and keep PIECE (and perhaps more: a whole
  answer is kept up to piece LAST, before the workers run).  A transient
  RegistryError is tried again; Broken fails the file; any other CdiError
  (or Unsupported) fails this piece's readers, and the next read of it
  tries again; any other exception is a bug, and fails the file;
- parallel() -> how many pieces may be produced at once now;
- check() -> once every piece is here: what the check learnt, or Broken;
- read_ahead (pieces fetched ahead of a reader in order, numbered up to
  count; span(offset, count) -> the first and last piece of a range) and
  fill_idle (seconds readers must have been quiet before the fill fetches);
- parked() -> a piece a worker must produce at once when they start (an
  answer begun before nbdkit forked, to be read on), or None;
- label, naming the image and the file in messages.

Locks, in the order they are taken, never the other way round:
1. a file lock of the cache (chunks.PartialBlob.locked), across processes;
2. Arrival.condition, one per file: its queue and state.  It is never held
   while fetching, writing, checking or waiting for a file lock.
A source that watches several files (sources/streamed_image.py) has a lock
of its own, taken before none of these.
"""

import contextlib
import errno
import heapq
import itertools
import logging
import os
import threading
import time

from ..errors import CdiError, RegistryError, Unsupported

log = logging.getLogger("cdipy")

# A piece that cannot be fetched is tried again, waiting longer each time,
# for this long in all; then the read fails (EIO), never with zeros.
RETRY_SECONDS = 30.0
FIRST_RETRY = 0.25
# Priorities: lower first.
CLIENT, AHEAD = 0, 1


class Broken(CdiError):
    """The file cannot be right (a digest that does not match, bytes that
    are not what the format says): every read fails from now on."""


def retried(attempt, stopping):
    """ATTEMPT() until it returns; a transient RegistryError tried again,
    waiting longer each time, for RETRY_SECONDS in all (or until STOPPING()
    is true); then, or for another error, raise it."""
    deadline, pause = time.monotonic() + RETRY_SECONDS, FIRST_RETRY
    while True:
        try:
            return attempt()
        except RegistryError as error:
            if not error.transient or time.monotonic() + pause > deadline or stopping():
                raise
            log.debug(f"{error}: trying again in {pause:.2f} s")
        time.sleep(pause)
        pause = min(pause * 2, 8.0)


class Arrival:
    """The file FORMAT describes, arriving; ON_WHOLE(learnt) is
    called once, when every piece is here and the format's check passed
    (with what the check learnt)."""

    def __init__(self, format, on_whole, *, workers=4):
        self.format, self.on_whole, self.workers = format, on_whole, workers
        self.condition = threading.Condition()
        self.inline = threading.Lock()  # the one reader producing, while no thread runs
        self.queue = Queue()           # what readers asked for, for the workers
        self.in_flight = set()
        self.failed = {}               # piece -> why its last fetch failed
        self.failure = None            # why the file cannot be right
        self.fill_waits = False        # the fill gave up until a reader's piece arrives
        self.arrived = 0               # pieces produced: the fill waits on it after a failure
        self.threads = []
        self.stopping = False
        self.finished = False          # its check began
        self.whole = False             # checked and handed on
        self.last_read = None          # the last piece a reader asked for, for read-ahead
        self.last_read_time = time.monotonic()

    # ------------------------------------------------------------ readers

    def wait(self, offset, count):
        """Until the file's bytes [OFFSET, OFFSET+COUNT) are here, asking for
        them (and for what is ahead of a reader in order); OSError (EIO) if
        they cannot be."""
        needed = self.format.needed(offset, count)
        ahead = ()
        if self.format.read_ahead:
            first, last = self.format.span(offset, count)
            if needed and self.last_read is not None and first in (self.last_read,
                                                                   self.last_read + 1):
                ahead = range(last + 1, min(last + 1 + self.format.read_ahead, self.format.count))
            self.last_read = last  # every read moves the order on, one of pieces here too
        self.last_read_time = time.monotonic()
        if needed:
            self.wait_for(lambda: self.format.needed(offset, count), ahead)
        self.raise_failure()

    def wait_until(self, predicate):
        """Until PREDICATE() is true, asking for the pieces in order; OSError
        (EIO) if the file cannot arrive or could not be checked."""
        def needed():
            if predicate():
                return []
            missing = self.format.missing()
            if missing:
                return missing[:1]
            if not self.threads:  # no one else checks it
                self.finish_if_complete()
                if predicate():
                    return []
            if self.finished and not self.whole:
                self.raise_failure()
                raise OSError(errno.EIO, f"{self.format.label}: arrived, but could not be checked")
            return [None]  # being checked, by another thread
        self.wait_for(needed)

    def wait_for(self, needed, ahead=()):
        """Until NEEDED() (the pieces still missing) is empty."""
        while not self.threads:
            with self.inline:
                if self.threads:
                    break
                self.raise_failure()
                missing = [piece for piece in needed() if piece is not None]
                if not missing:
                    return
                self.produce_now(missing[0], last=missing[-1])
                self.finish_if_complete()
        with self.condition:
            for piece in needed():
                self.failed.pop(piece, None)  # failed before this read: try again
            first_round = True
            while True:
                self.raise_failure()
                missing = needed()
                if not missing:
                    return
                if self.stopping:
                    raise OSError(errno.EIO, f"{self.format.label}: the server is stopping")
                failed = [piece for piece in missing if piece in self.failed]
                if failed:
                    raise OSError(errno.EIO, self.failed[failed[0]])
                for piece in missing:
                    self.enqueue(piece, CLIENT)
                if first_round:
                    for piece in ahead:
                        self.enqueue(piece, AHEAD)
                    first_round = False
                self.condition.notify_all()
                self.condition.wait()

    def raise_failure(self):
        if self.failure:
            raise OSError(errno.EIO, self.failure)

    def enqueue(self, piece, priority):
        """Queue PIECE for the workers (under the condition)."""
        if not (piece is None or piece in self.in_flight or piece in self.failed
                or self.format.holds(piece)):
            self.queue.push(piece, priority)

    # ------------------------------------------------------------ producing

    def produce_now(self, piece, last=None, until=None):
        """Produce PIECE in this thread, tried again for RETRY_SECONDS (or
        until UNTIL, a monotonic time); OSError (EIO) if it cannot be."""
        try:
            retried(lambda: self.format.produce(piece, last), lambda: self.stopping or (
                until is not None and time.monotonic() > until))
        except Broken as error:
            self.fail(str(error))
            raise OSError(errno.EIO, self.failure) from None
        except Unsupported as error:  # this source, for now: the next read tries again
            raise OSError(errno.EIO, f"{self.format.label}: {error}") from None
        except CdiError as error:
            raise OSError(errno.EIO, str(error)) from None
        except Exception as error:  # a bug must not look like zeros or a hang
            self.fail(f"{self.format.label}: fetching it: {error!r}")
            raise OSError(errno.EIO, self.failure) from error
        self.changed(produced=True)

    def changed(self, produced=False):
        """Wake whoever waits on this file: a piece arrived, or what may be
        produced at once changed."""
        with self.condition:
            self.arrived += produced
            self.condition.notify_all()

    def fail(self, reason):
        """Every read fails with REASON from now on."""
        with self.condition:
            self.failure = self.failure or reason
            self.condition.notify_all()
        log.debug(self.failure)

    def start(self):
        """Start the workers and the fill (after nbdkit forked)."""
        if self.threads or self.failure or self.whole:
            return
        parked = self.format.parked()
        if parked is not None:
            with self.condition:
                self.enqueue(parked, CLIENT)
        for number in range(self.workers):
            self.threads.append(threading.Thread(target=self.work, daemon=True,
                                                 name=f"fetch-{number}"))
        self.threads.append(threading.Thread(target=self.fill, daemon=True,
                                             name="fill"))
        for thread in self.threads:
            thread.start()

    def may_start(self):
        return len(self.in_flight) < self.format.parallel()

    def work(self):
        while True:
            with self.condition:
                while not (self.stopping or self.whole or self.failure) and not (
                        self.queue and self.may_start()):
                    self.condition.wait()
                if self.stopping or self.whole or self.failure:
                    return  # nothing more to fetch
                piece = self.queue.pop()
                if piece in self.in_flight or self.format.holds(piece):
                    self.condition.notify_all()  # the fill waits while the queue is not empty
                    continue
                self.in_flight.add(piece)
            self.produce_for_others(piece)

    def produce_for_others(self, piece):
        """Produce PIECE for the readers that wait for it, telling them why
        it failed if it did; whether it arrived."""
        try:
            self.produce_now(piece)
            arrived = True
        except Exception as error:  # whatever it is, the waiting reader must hear of it
            with self.condition:
                self.failed[piece] = getattr(error, "strerror", None) or str(error)
            arrived = False
        finally:
            with self.condition:
                self.in_flight.discard(piece)
                self.condition.notify_all()
        self.finish_if_complete()
        return arrived

    def fill(self):
        """Produce what no reader asked for, in order, once readers have been
        quiet for the format's fill_idle; after a failure, only once a
        reader's piece arrived again; then check the whole."""
        with contextlib.suppress(OSError):  # not allowed: keep the priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            missing = self.format.missing()
            if not missing:
                break
            for piece in missing:
                with self.condition:
                    while not self.stopping and (
                            not self.may_start() or self.queue or piece in self.in_flight
                            or time.monotonic() - self.last_read_time < self.format.fill_idle):
                        self.condition.wait(self.format.fill_idle / 4 or None)
                    if self.stopping or self.failure:
                        return
                    if self.format.holds(piece):
                        continue
                    self.in_flight.add(piece)
                    arrived = self.arrived
                if not self.produce_for_others(piece):
                    log.debug(f"the fill of {self.format.label} waits for a reader's piece to "
                              f"arrive: {self.failed.get(piece)}")
                    with self.condition:
                        self.fill_waits = True
                        self.condition.notify_all()
                        self.condition.wait_for(lambda arrived=arrived: self.stopping
                                                or self.failure or self.arrived > arrived)
                        self.fill_waits = False
                    break
        self.finish_if_complete()

    # ------------------------------------------------------------ the end

    def finish_if_complete(self):
        """Once every piece is here: the format checks the whole; it is
        handed on, or every read fails.  Once, and to its end even if the
        server is stopping: a file whole by now is kept (stop() waits)."""
        with self.condition:
            if self.finished or self.failure or self.format.missing():
                return
            self.finished = True
        try:
            learnt = self.format.check()
        except Broken as error:
            self.fail(str(error))
            return
        except (CdiError, OSError) as error:
            # Nothing is named whole: the next start checks it again.
            log.debug(f"{self.format.label}: cannot check it: {error}")
            self.changed()
            return
        with self.condition:
            self.whole = True
            self.condition.notify_all()
        self.on_whole(learnt)

    def take_the_rest(self, limit, deadline):
        """If no more than LIMIT bytes are left to arrive, let them arrive,
        until DEADLINE (a monotonic time) at most; whether it is whole.
        Why: a client that read the whole disk stops the server before the
        file's last bytes (a tar's end, a chunk no one read) arrived, and
        that is little."""
        if self.whole or self.failure or self.format.left() > limit:
            return self.whole
        while time.monotonic() < deadline and not (self.whole or self.failure):
            if self.threads:
                with self.condition:
                    if self.fill_waits:
                        break  # the source gave no more: not waited for again
                    self.condition.wait(max(deadline - time.monotonic(), 0))
                continue
            missing = self.format.missing()
            if not missing:
                break
            try:
                self.produce_now(missing[0], until=deadline)
            except OSError:
                break
            self.finish_if_complete()
        if self.whole:
            log.debug(f"{self.format.label}: taken in to its end as the server stops")
        return self.whole

    def stop(self, timeout=RETRY_SECONDS + 5):
        """Stop the threads, waiting TIMEOUT at most; whether they have (else
        the file must stay open: a thread may still write to it).  A file
        whole by now is checked and handed on first."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(deadline - time.monotonic(), 0))
        if any(thread.is_alive() for thread in self.threads):
            log.debug(f"{self.format.label}: a fetch still runs: its files stay open")
            return False
        self.finish_if_complete()
        return True


class Queue:
    """Pieces for the workers, the highest priority (lowest number) first,
    then in the order asked.  A piece asked again with a higher priority
    moves up; one asked again with a lower one stays where it is."""

    def __init__(self):
        self.heap = []       # (priority, order, piece), some of them stale
        self.best = {}       # piece -> its priority in the heap
        self.order = itertools.count()

    def __bool__(self):
        return bool(self.best)

    def __contains__(self, piece):
        return piece in self.best

    def priority(self, piece):
        return self.best.get(piece)

    def push(self, piece, priority):
        if self.best.get(piece, priority + 1) > priority:
            heapq.heappush(self.heap, (priority, next(self.order), piece))
            self.best[piece] = priority

    def pop(self):
        """The next piece, or None if there is none."""
        while self.heap:
            priority, _, piece = heapq.heappop(self.heap)
            if self.best.get(piece) == priority:
                del self.best[piece]
                return piece
        return None
