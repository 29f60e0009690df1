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

    x86's rwlock is a queued rwlock, which is fair to writers: once a writer
    waits, a new reader queues behind it (``queued_read_lock`` takes the fast
    path only while no ``_QW_WMASK`` bit, _QW_WAITING included, is set).
    Without that, a vCPU whose fault retries while an invalidation is in
    progress re-takes the read lock forever ahead of the invalidation that
    waits to finish: a livelock the kernel cannot have.
    """

    def __init__(self):
        self.readers = 0
        self.writer = False
        self.waiters = 0  # threads spinning on the lock: what rwlock_needbreak sees
        self.writers_waiting = 0  # _QW_WAITING: new readers queue behind them

    def _readable(self) -> bool:
        return not self.writer and not self.writers_waiting

    def _writable(self) -> bool:
        return not self.writer and self.readers == 0

    def read_lock(self):
        """Generator: take the lock for read (a lock boundary is a yield point)."""
        yield from self._wait(self._readable)
        self.readers += 1
        yield

    def read_unlock(self) -> None:
        self.readers -= 1

    def write_lock(self):
        """Generator: take the lock for write."""
        if self._writable():
            self.writer = True
        else:
            self.writers_waiting += 1
            yield from self._wait(self._writable)
            self.writers_waiting -= 1
            self.writer = True
        yield

    def write_unlock(self) -> None:
        self.writer = False

    def needbreak(self) -> bool:
        """Someone is waiting: a long holder should drop the lock (cond_resched)."""
        return self.waiters > 0

    def _wait(self, ready):
        if ready():
            return
        self.waiters += 1
        while not ready():
            yield ready
        self.waiters -= 1


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
