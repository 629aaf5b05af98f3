"""SIGTERM as an interruption: what schedulers and Kubernetes send to stop a job.

:func:`install` makes SIGTERM raise :class:`Terminated` in the main thread, a KeyboardInterrupt,
so that a terminated run unwinds exactly as after Ctrl-C: its actors are stopped, its local Ray
and reaper shut down, committed shards kept, and the command ends with one line and exit code
143 (128 + SIGTERM, the shell's convention). A second SIGTERM during that cleanup is ignored.
``ray.init`` installs a handler of its own; the driver puts the one it found back
(:func:`restored`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


_received = threading.Event()


def received() -> bool:
    """Whether SIGTERM arrived since :func:`install` (a library on the way, Ray's wait among
    them, may turn the Terminated it raised into a plain KeyboardInterrupt)."""
    return _received.is_set()


def _raise_terminated(signum, frame) -> None:
    _received.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs to its end
    raise Terminated()


def install() -> None:
    """SIGTERM raises Terminated (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        _received.clear()
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Put back, on leaving, the SIGTERM handler there was on entering (around ``ray.init``)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)
