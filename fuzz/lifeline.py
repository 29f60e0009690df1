"""A campaign's processes die with their supervisor, however it dies.

libFuzzer runs in a session of its own (so that Ctrl-C reaches only the
supervisor, which stops it cleanly), and with ``-jobs`` each job is a
grandchild behind ``sh -c``.  A supervisor killed with SIGKILL stops nothing,
so without more its workers would go on fuzzing the directory unwatched.
Two mechanisms, one per kind of process:

- the supervisor's direct children (libFuzzer, the minimizer) get a parent-death
  signal, SIGKILL, set between fork and exec (:func:`die_with_parent`): the
  kernel delivers it when the supervisor dies;
- every worker process holds the read end of a pipe whose only write end the
  supervisor holds (:class:`Lifeline`, :func:`hold_on`): when the supervisor
  dies, the kernel closes that end, the worker's read returns end-of-file, and
  the worker kills itself.  This reaches the ``-jobs`` grandchildren, whose
  parent (``sh``) does not die with libFuzzer, and it has no race: a worker
  that starts after the supervisor died reads end-of-file at once.

This module imports nothing of the project: a worker holds on before the
system under test is imported (under instrumentation).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

LIFELINE_ENV = "MMUFUZZ_LIFELINE"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """In a child between fork and exec (a ``preexec_fn``): SIGKILL when ``parent`` dies.

    The signal survives ``exec``.  A parent that died before the ``prctl``
    sends none, so the parent is checked after it: gone, the child exits.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent:
        os._exit(127)


class Lifeline:
    """The supervisor's end: a pipe whose read end every worker inherits.

    Both ends are created non-inheritable; the read end is passed to the
    workers explicitly (``pass_fds``), the write end never leaves this process.
    """

    def __init__(self):
        self.read, self._write = os.pipe()

    def env(self) -> dict:
        """The environment entry that tells a worker which descriptor to watch."""
        return {LIFELINE_ENV: str(self.read)}


def hold_on(environ=os.environ) -> bool:
    """In a worker: die when the supervisor does.  False if no supervisor gave a lifeline.

    A daemon thread blocks on the lifeline (a blocking read holds no GIL, so
    it costs the fuzzing nothing) and SIGKILLs this process at end-of-file.
    A descriptor that is not open (the supervisor is gone, or the variable
    leaked into a process that did not inherit it) counts as end-of-file.
    """
    fd = environ.get(LIFELINE_ENV)
    if not fd:
        return False

    def watch():
        try:
            while os.read(int(fd), 1):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
    return True
