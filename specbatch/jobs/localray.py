"""The local Ray: the Ray instance a run starts on this machine when no cluster is named.

It listens on the loopback interface only, and it is gone when the run ends, however it ends
(normal exit, an exception, SIGINT, or the driver killed with SIGKILL). Two things Ray 2.x
does not do on its own for a Ray started by ``ray.init()`` on Linux:

* **Binding.** Ray takes the machine's outward address as the node IP, and the GCS, the raylet,
  the workers and the dashboard agent then listen on all interfaces (an open Ray when token
  auth is disabled). Ray takes the loopback address as node IP where clusters are disabled
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, its default on macOS and Windows), and then every
  one of its processes binds 127.0.0.1 (or the IPv4-mapped ::ffff:127.0.0.1) only.
* **Lifetime.** When the driver dies without ``ray.shutdown()``, the GCS and the raylet die with
  it (Ray starts them with a parent-death signal), but the dashboard agent and the runtime-env
  agent (children of the raylet) block for a minute reporting the raylet's death to the dead
  GCS. So the driver starts a **reaper**: a small process that records the session's
  processes every second while the driver lives, and when the session ends (the driver closes
  the reaper's stdin after ``ray.shutdown()``, or dies) kills whatever of them is left.

Besides, Ray starts its workers at nice 15 (``worker_niceness``) so that its own processes stay
responsive on a shared node.  On the machine a local Ray owns, that lets the GCS, the raylet, the
agents and the driver's polling preempt the actor whenever they run: a 2-thread CPU actor then loses
one of its threads for a moment each time, and the other waits for it at every parallel region.
The local Ray runs its workers at nice 0 (``RAY_worker_niceness``, unless the environment sets it).

The session's processes are found by a **marker**, an environment variable
(``SPECBATCH_LOCAL_RAY=<id>``) set only while ``ray.init`` starts the GCS, the raylet and
their helpers, which inherit it (and pass it on to the workers the raylet starts), together
with their descendants (the agents rename themselves, which hides their environment). The
marker names this session's processes whoever their parent is by then, and no other Ray's.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Iterator

import psutil

MARKER = "SPECBATCH_LOCAL_RAY"
NICENESS = "RAY_worker_niceness"  # read by the raylet when it starts: the workers' nice value
WORKER_NICENESS = "0"  # the actor is the job: it runs at the priority of the command that started it
LOOPBACK = "127.0.0.1"
_SWEEP_ROUNDS = 50  # bounded: a sweep ends after this many rounds even if processes keep appearing


class LocalRay:
    """A started local Ray and its reaper; :meth:`stop` shuts both down (idempotent)."""

    def __init__(self, session: str, reaper: subprocess.Popen):
        self.session = session
        self.reaper = reaper

    def stop(self) -> None:
        """``ray.shutdown()``, then let the reaper kill whatever of this session is left."""
        import ray

        try:
            ray.shutdown()
        finally:
            if self.reaper.stdin is not None and not self.reaper.stdin.closed:
                self.reaper.stdin.close()  # end of session: the reaper sweeps and exits
            try:
                self.reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def start(**init_kwargs: Any) -> LocalRay:
    """Start a new local Ray bound to 127.0.0.1 (``ray.init(address="local", **init_kwargs)``)
    and its reaper; the caller calls ``stop()`` when the run ends. The dashboard (and its agent)
    bind 127.0.0.1 too unless ``dashboard_host`` says otherwise."""
    import ray
    from ray._private import ray_constants

    session = uuid.uuid4().hex
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    reaper = subprocess.Popen(
        [sys.executable, "-m", "specbatch.jobs.localray", session, str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path},
    )
    try:
        # Ray reads the setting at import time (ray_constants) and its processes read it from
        # their environment: both are set only while ray.init starts the processes. (A Ray
        # without the constant reads the environment alone.)
        constant = (_attribute(ray_constants, "ENABLE_RAY_CLUSTER", False)
                    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER") else contextlib.nullcontext())
        settings = {MARKER: session, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    NICENESS: os.environ.get(NICENESS, WORKER_NICENESS)}
        with _environment(settings), constant:
            ray.init(address="local", _node_ip_address=LOOPBACK, **{"dashboard_host": LOOPBACK, **init_kwargs})
    except BaseException:
        LocalRay(session, reaper).stop()
        raise
    return LocalRay(session, reaper)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


# ---------------------------------------------------------------------------------------------
# The reaper process: python -m specbatch.jobs.localray SESSION DRIVER_PID


def session_processes(session: str, exclude: set[int] = frozenset(),
                      marks: dict[psutil.Process, bool] | None = None) -> set[psutil.Process]:
    """The live processes of a session: those that carry its marker, and their descendants.

    Descendants count because a process that renames itself (the agents' ``ray::`` titles,
    set with setproctitle) overwrites the environment /proc shows; while its parent lives,
    the process tree still names it.  ``marks`` (kept by a caller that scans repeatedly)
    remembers whether each process carries the marker, which is fixed when it starts: a
    repeated scan reads the environment of new processes only (reading every process's
    environment each second was most of the reaper's CPU time), and a marked process that
    renames itself later is still known.
    """
    marks = {} if marks is None else marks
    live, marked = set(), set()
    children: dict[int, list[psutil.Process]] = {}  # parent pid -> its processes, from this one pass
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
        if proc.pid in exclude:
            continue
        live.add(proc)
        carries = marks.get(proc)
        if carries is None:
            try:
                carries = proc.environ().get(MARKER) == session
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                if not _alive(proc):
                    continue
                carries = False  # alive but unreadable (another user's, a kernel thread): not ours
            marks[proc] = carries
        if carries:
            marked.add(proc)
    for proc in [p for p in marks if p not in live]:  # forget the processes that are gone
        del marks[proc]
    # Descendants from the one pass's parent map (psutil's children() reads every process's
    # parent again for each call).
    found, todo = set(marked), list(marked)
    while todo:
        for child in children.get(todo.pop().pid, ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p for p in found if p.pid not in exclude and _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sweep(session: str, exclude: set[int], seen: set[psutil.Process] = frozenset()) -> int:
    """Kill the session's processes (and those seen earlier) until none is left (two empty
    scans in a row); return how many were killed."""
    killed, empty = 0, 0
    for _ in range(_SWEEP_ROUNDS):
        procs = session_processes(session, exclude) | {p for p in seen if _alive(p)}
        if not procs:
            empty += 1
            if empty == 2:
                break
            time.sleep(0.2)
            continue
        empty = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        psutil.wait_procs(list(procs), timeout=5)
    return killed


def _watch_until_end(session: str, driver: int, exclude: set[int]) -> set[psutil.Process]:
    """Record the session's processes every second until stdin reaches EOF (the driver closed
    it, or died) or the driver is no longer our parent; return every process recorded."""
    seen: set[psutil.Process] = set()
    marks: dict[psutil.Process, bool] = {}
    while os.getppid() == driver:
        seen |= session_processes(session, exclude, marks)
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if ready and not os.read(sys.stdin.fileno(), 1024):
            break
    return seen


def main(argv: list[str]) -> int:
    session, driver = argv[0], int(argv[1])
    # A Ctrl-C reaches the whole process group: the reaper outlives it to clean up after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exclude = {os.getpid(), driver}
    seen = _watch_until_end(session, driver, exclude)
    sweep(session, exclude, seen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
