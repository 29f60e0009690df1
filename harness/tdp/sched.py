"""Yield points, mmu_lock, RCU and the interleaver of a ``parallel``'s actors.

Every path that touches shared MMU state is a generator that yields at its
yield points (each SPTE read, cmpxchg, write, lock and RCU boundary).  A yield
of ``None`` is a plain yield point; a yield of a callable means "blocked until
this returns true".  Sequential execution drains one generator (``run``);
``interleave`` runs two to four, picking who steps by the digits of a schedule.
"""

from __future__ import annotations

from collections import deque


# A correct op finishes in far fewer steps; beyond this it is livelocked.
STEP_CAP = 200_000


class Hang(Exception):
    """A livelock or deadlock: an op did not finish within the step cap."""


def run(gen):
    """Drain ``gen`` alone and return its value; a block nobody can lift is a hang."""
    steps = 0
    try:
        while True:
            wait = next(gen)
            if wait is not None and not wait():
                raise Hang("blocked with no other thread to unblock it")
            steps += 1
            if steps > STEP_CAP:
                raise Hang(f"no progress after {STEP_CAP} steps")
    except StopIteration as stop:
        return stop.value


def yield_point(gen) -> str:
    """Where a suspended generator chain stands: ``function:line`` of its innermost frame."""
    while True:
        inner = gen.gi_yieldfrom
        if inner is None or not hasattr(inner, "gi_frame"):
            break
        gen = inner
    frame = gen.gi_frame
    return "done" if frame is None else f"{frame.f_code.co_name}:{frame.f_lineno}"


def interleave(sides, schedule: int, after_step=None, on_switch=None, taken=None):
    """Run the generators ``sides`` (two to four) interleaved; return their values in order.

    With N sides, digit i of ``schedule`` in base N (least significant first)
    picks who takes step i (0 = the first side); after its last non-zero
    digit, step i goes to side i mod N (SEMANTICS §H; with two sides, bit i
    picks, then they alternate).  Picking a blocked or finished side steps the
    next runnable one after it, cyclically.  ``after_step`` runs after every
    step (the RCU grace-period machinery hangs off it).  ``on_switch(parked,
    resumed)`` hears of every context switch: the yield point where the side
    that stops is parked and the one where the other resumes (interleaving
    coverage).  ``taken``, a list with an element per side, receives how many
    steps each side took: the range of preemption points a schedule explorer
    can choose from.
    """
    sides = list(sides)
    count = len(sides)
    # The digits still to read (schedule_digits, read as the steps are taken: a pair is
    # done in a few dozen steps, well before a schedule's 64 digits).
    unread = schedule
    waits, done, results = [None] * count, [False] * count, [None] * count
    running = count
    step, previous = 0, None
    while running:
        if unread:
            unread, want = divmod(unread, count)
        else:
            want = step % count
        # A side is runnable if not done and not blocked; the others are asked, in
        # order after it, only when the wanted one cannot run (the waits are pure tests).
        wait = waits[want]
        if done[want] or (wait is not None and not wait()):
            for offset in range(1, count):
                other = (want + offset) % count
                wait = waits[other]
                if not done[other] and (wait is None or wait()):
                    want = other
                    break
            else:
                raise Hang("every side blocked")
        if on_switch is not None and previous is not None and want != previous \
                and not done[previous]:
            on_switch(yield_point(sides[previous]), yield_point(sides[want]))
        previous = want
        if taken is not None:
            taken[want] += 1
        try:
            waits[want] = next(sides[want])
        except StopIteration as stop:
            done[want], results[want], waits[want] = True, stop.value, None
            running -= 1
        if after_step is not None:
            after_step()
        step += 1
        if step > STEP_CAP:
            raise Hang(f"no progress after {STEP_CAP} steps")
    return tuple(results)


class RwLock:
    """kvm->mmu_lock: faults take it for read; memslot updates and zap_all for write.

    x86's rwlock is a queued rwlock (kernel/locking/qrwlock.c), fair to
    writers and first come, first served past its fast paths:

    - a reader gets in at once unless a writer holds the lock or waits for it
      (``queued_read_lock`` takes the fast path only while no ``_QW_WMASK``
      bit, ``_QW_WAITING`` included, is set);
    - a writer gets in at once only if nobody holds or waits for the lock
      (``queued_write_lock``: ``cnts`` must be 0);
    - everyone else queues on ``wait_lock``, a fair spinlock, in arrival
      order.  The reader at its head takes the lock once no writer holds it;
      the writer at its head sets ``_QW_WAITING`` (from then on, new readers
      queue too) and takes the lock once the readers in it have left.

    Without the writer fairness, a vCPU whose fault retries while an
    invalidation is in progress re-takes the read lock forever ahead of the
    invalidation that waits to finish: a livelock the kernel cannot have.
    Without the queue, a writer that came later could take the lock ahead of
    one that has waited, which no kernel schedule does.
    """

    def __init__(self):
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0  # _QW_WAITING, set by the writer at the queue's head
        self._queue: deque = deque()  # wait_lock's waiters, in arrival order
        self._arrivals = 0

    def _readable(self) -> bool:
        return not self.writer and not self.writers_waiting

    def _writable(self) -> bool:
        return not self.writer and self.readers == 0

    def read_lock(self):
        """Generator: take the lock for read (a lock boundary is a yield point)."""
        if not self._readable():
            yield from self._queued(lambda: not self.writer)
        self.readers += 1
        yield

    def read_unlock(self) -> None:
        self.readers -= 1

    def write_lock(self):
        """Generator: take the lock for write."""
        if not self._writable() or self._queue or self.writers_waiting:
            yield from self._queued(self._writable, writer=True)
        self.writer = True
        yield

    def write_unlock(self) -> None:
        self.writer = False

    def needbreak(self) -> bool:
        """Someone waits on ``wait_lock`` (rwlock_needbreak): a long holder should drop the
        lock (cond_resched)."""
        return bool(self._queue)

    def _queued(self, ready, writer: bool = False):
        """Generator: wait on ``wait_lock`` until first in line, then until ``ready()``;
        a writer raises ``_QW_WAITING`` meanwhile."""
        ticket = self._arrivals
        self._arrivals += 1
        queue = self._queue
        queue.append(ticket)
        while queue[0] != ticket:
            yield lambda: queue[0] == ticket
        if writer:
            self.writers_waiting += 1
        while not ready():
            yield ready
        if writer:
            self.writers_waiting -= 1
        queue.popleft()


class Rcu:
    """RCU: readers mark their section; callbacks run once every older reader is done.

    A reader that started before ``call_rcu`` may still hold a pointer the
    callback frees, so the callback waits for it (a grace period).
    """

    def __init__(self):
        self._seq = 0
        self._readers: dict[int, int] = {}  # token -> seq at rcu_read_lock
        self._next_token = 0
        self._callbacks: deque = deque()  # (seq, fn), seq increasing

    def read_lock(self) -> int:
        """Enter a read-side section; returns the token for ``read_unlock``."""
        token = self._next_token
        self._next_token += 1
        self._readers[token] = self._seq
        return token

    def read_unlock(self, token: int) -> None:
        del self._readers[token]

    def call_rcu(self, fn) -> None:
        """Run ``fn`` after a grace period."""
        self._callbacks.append((self._seq, fn))
        self._seq += 1

    def process(self) -> None:
        """Run every callback whose grace period has elapsed (a quiescent point).

        Called after every step of a ``parallel``, nearly always with nothing queued.
        """
        if not self._callbacks:
            return
        oldest = min(self._readers.values(), default=self._seq)
        while self._callbacks and self._callbacks[0][0] < oldest:
            self._callbacks.popleft()[1]()

    def pending(self) -> bool:
        """Callbacks are still waiting for their grace period."""
        return bool(self._callbacks)

    def synchronize(self):
        """Generator: synchronize_srcu: block until every reader older than now is done."""
        seq = self._seq
        self._seq += 1
        yield
        while any(started <= seq for started in self._readers.values()):
            yield lambda: all(started > seq for started in self._readers.values())
