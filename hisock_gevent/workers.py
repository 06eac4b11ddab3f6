"""Run one ``serve`` target in several worker processes on one port, and keep them running.

``hisock-gevent serve MODULE:ATTR --workers N`` hands over to :class:`Supervisor`.  One
gevent server uses one CPU core; N worker processes use N.  Each worker is an ordinary
``python -m hisock_gevent serve MODULE:ATTR ...`` process started with the same options,
so a worker runs exactly the code path a single ``serve`` runs.  The supervisor never
imports the app: import side effects, bugs in handlers and the memory the app holds stay
in the workers, and a restarted worker imports the app afresh.

How the workers share the port
------------------------------

* **SO_REUSEPORT** (Linux, BSD; the default where the system has it).  The supervisor
  binds ``(HOST, PORT)`` with SO_REUSEADDR and SO_REUSEPORT but does *not* listen: that
  holds the port (and picks it when PORT is 0) for as long as the supervisor runs, while
  the kernel hands connections only to listening sockets.  Each worker binds the same
  address with ``reuse_port=True`` (``--reuse-port``) and the kernel spreads new
  connections among the workers.  Connections a dying worker had not accepted yet are
  reset.
* **One inherited socket** (``--no-reuse-port``, or no SO_REUSEPORT).  The supervisor
  binds and listens, and every worker serves that same socket, inherited as a file
  descriptor (``--listen-fd``, the server's ``listener=``).  Connections wait in the
  shared backlog while a worker restarts; every idle worker wakes for each connection.

The target may be a *factory* taking ``reuse_port`` and ``listener`` (or ``**kwargs``)
and passing them to :class:`~hisock_gevent.HiSockServer`, or, with SO_REUSEPORT, a server
made at import: the workers' environment has ``HISOCK_GEVENT_REUSE_PORT=1``, so every
worker's import binds with SO_REUSEPORT too, and the worker rebuilds it on the shared port
with its handlers.  With one inherited socket an instance cannot work (each import would
bind the port on its own) and is refused.

Supervision
-----------

Each worker gets the writing end of a pipe (``--ready-fd FD``, the idea of systemd's
``sd_notify``): it writes one byte when its server serves, and then one byte every
:data:`LIVENESS_INTERVAL` seconds from a greenlet on the server's own hub.  So the pipe
says both "ready" and "the hub still turns": a worker whose hub is blocked (a handler
that blocks it, a SIGSTOP) falls silent.  The supervisor reads every pipe; once every
worker is ready it logs ``serving on HOST:PORT with N workers (pids ...)``, and a worker
silent for ``worker_timeout`` seconds is logged, killed (SIGKILL, by pid) and restarted
like one that died, since with SO_REUSEPORT the kernel would keep handing it connections.

The supervisor also reads every worker's stderr and copies it to its own, each line
prefixed with ``[worker I pid P]``.  A worker that exits is logged (pid,
exit status or signal) and restarted after :data:`RESTART_DELAY` seconds, doubled up to
:data:`MAX_RESTART_DELAY` while it keeps dying within :data:`HEALTHY_RUN` seconds of its
start; the others keep serving.  A worker that fails before the group was ever serving
(bad target, import error, cannot bind) stops everything: :meth:`Supervisor.run` raises
:class:`CannotStart` with the worker's one-line error instead of restarting it forever.

SIGINT/SIGTERM to the supervisor send SIGTERM to every worker (which closes its server
gracefully), wait up to :data:`STOP_TIMEOUT` seconds, SIGKILL the stragglers and return
0; a second signal kills them at once.  Workers ignore SIGINT (a Ctrl-C reaches the whole
process group; only the supervisor acts on it) and close themselves when the supervisor
dies without stopping them.

Plain threads and subprocesses, no gevent: only the main thread starts, signals and reaps
workers; one thread per worker reads its stderr and reports through a queue.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from .server import REUSE_PORT_ENV

__all__ = ["CannotStart", "Supervisor", "report_liveness"]

log = logging.getLogger("hisock_gevent.cli")

#: Seconds before a worker that died is started again.
RESTART_DELAY = 0.5
#: The longest restart delay: it doubles up to this while a worker keeps dying young.
MAX_RESTART_DELAY = 5.0
#: A worker that ran at least this many seconds is restarted after RESTART_DELAY again.
HEALTHY_RUN = 5.0
#: Seconds the workers get to close gracefully after SIGTERM before they are killed.
STOP_TIMEOUT = 10.0
#: The longest the supervisor sleeps without looking at its workers (and signals).
_POLL_INTERVAL = 0.25
#: Seconds to wait for a dead worker's last stderr lines (a grandchild may hold the pipe).
_DRAIN_TIMEOUT = 2.0
#: Seconds to wait for a worker to be reaped after SIGKILL.
_KILL_WAIT = 5.0
#: Seconds between two "still alive" bytes a worker writes on its ready pipe.
LIVENESS_INTERVAL = 0.5
#: Seconds a serving worker may stay silent on its pipe before it is killed (``--worker-timeout``).
DEFAULT_WORKER_TIMEOUT = 30.0
#: The bytes on the ready pipe: the server serves; the hub still turns.
READY = b"R"
ALIVE = b"."
#: A worker's one-line error (``hisock-gevent: error: ...``); reported by the supervisor instead.
_ERROR_RE = re.compile(r"^hisock-gevent(?: \w+)?: error: (.*)$")


class CannotStart(Exception):
    """The workers cannot serve: the port cannot be bound, or a worker failed before the
    group was serving.  The message is one line for the user."""


class _Run:
    """One worker process, from its start to its exit."""

    def __init__(self, index: int, proc: subprocess.Popen) -> None:
        self.index = index
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        #: Set by the pipe's reader thread when the worker says it is serving.
        self.serving = False
        #: time.monotonic() of the last byte on its ready pipe.
        self.last_heard = self.started
        #: Why the supervisor killed it, if it did.
        self.killed_because: Optional[str] = None
        #: The worker's last ``hisock-gevent: error:`` message, if any.
        self.error: Optional[str] = None
        #: Its last non-empty stderr line: says why it died when there was no error line.
        self.last_line = ""
        self.reader: Optional[threading.Thread] = None
        self.pipe_reader: Optional[threading.Thread] = None


class _Slot:
    """Worker number ``index``: its current run, and when to start the next one."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.run: Optional[_Run] = None
        self.restart_at: Optional[float] = None
        self.delay = 0.0


class _Event:
    """What the reader threads and the signal handler tell the main thread."""

    __slots__ = ("kind", "run", "signum")

    def __init__(self, kind: str, run: Optional[_Run] = None, signum: int = 0) -> None:
        self.kind = kind  # "serving", "eof" or "signal"
        self.run = run
        self.signum = signum


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class Supervisor:
    """N ``serve`` worker processes on one port, restarted when they die.

    :param target: the ``MODULE:ATTR`` each worker serves (a factory).
    :param options: the other ``serve`` options, as command-line arguments, given to
        every worker unchanged.
    :param host: the address to serve at.
    :param port: the port; 0 picks a free one, which every worker then shares.
    :param workers: how many worker processes.
    :param reuse_port: share the port with SO_REUSEPORT when the system has it; False to
        have the workers serve the supervisor's own listening socket.
    :param stats_port: worker ``i`` serves its statistics on ``stats_port + i`` (each on a
        free port when 0); None for no statistics.
    :param backlog: the listening socket's backlog when the workers share one.
    :param worker_timeout: seconds a serving worker may go without writing on its ready
        pipe before it is killed and restarted.
    """

    def __init__(
        self,
        target: str,
        options: Sequence[str],
        host: str,
        port: int,
        workers: int,
        *,
        reuse_port: bool = True,
        stats_port: Optional[int] = None,
        backlog: int = 128,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if worker_timeout < 2 * LIVENESS_INTERVAL:
            raise ValueError(f"worker_timeout must be at least {2 * LIVENESS_INTERVAL:g} s")
        self.worker_timeout = worker_timeout
        self.target = target
        self.options = list(options)
        self.host = host
        self.port = port
        self.workers = workers
        self.stats_port = stats_port
        self.backlog = backlog
        self._want_reuse_port = reuse_port
        self._reuse_port = False
        self._socket: Optional[socket.socket] = None
        self._slots = [_Slot(i) for i in range(workers)]
        # SimpleQueue.put may be called from a signal handler (it is reentrant).
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._output_lock = threading.Lock()
        #: True once every worker has been serving at the same time.
        self._serving = False

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Start the workers and supervise them until SIGINT/SIGTERM; returns 0.

        :raises CannotStart: the port cannot be bound, a worker cannot be started, or a
            worker exited before all of them were serving.
        """
        self._socket = self._bind()
        self.host, self.port = self._socket.getsockname()[:2]
        previous: Dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, self._on_signal)
        try:
            for slot in self._slots:
                self._start(slot)
            failure = self._supervise()
        finally:
            # Also on an unexpected error: no worker outlives its supervisor.
            self._stop_all()
            for number, handler in previous.items():
                signal.signal(number, handler)
            self._socket.close()
        if failure is not None:
            raise CannotStart(failure)
        log.info("stopped")
        return 0

    def _bind(self) -> socket.socket:
        """The socket that holds the port: bound only (SO_REUSEPORT) or listening (shared)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._want_reuse_port and hasattr(socket, "SO_REUSEPORT"):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    self._reuse_port = True
                except OSError as exc:
                    log.debug("SO_REUSEPORT is not usable (%s): the workers share one socket", exc)
            sock.bind((self.host, self.port))
            if not self._reuse_port:
                sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise CannotStart(f"cannot serve on {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _argv(self, index: int, ready_fd: int) -> List[str]:
        argv = [sys.executable, "-m", "hisock_gevent", "serve", self.target, *self.options]
        argv += ["--host", self.host, "--port", str(self.port)]
        if self.stats_port is not None:
            argv += ["--stats-port", str(self.stats_port + index if self.stats_port else 0)]
        if self._reuse_port:
            argv.append("--reuse-port")
        else:
            assert self._socket is not None
            argv += ["--listen-fd", str(self._socket.fileno())]
        argv += ["--worker-index", str(index), "--ready-fd", str(ready_fd)]
        return argv

    def _start(self, slot: _Slot) -> None:
        assert self._socket is not None
        slot.restart_at = None
        ready_read, ready_write = os.pipe()
        inherited = [ready_write] if self._reuse_port else [ready_write, self._socket.fileno()]
        try:
            proc = subprocess.Popen(
                self._argv(slot.index, ready_write),
                # With SO_REUSEPORT every server the worker makes shares the port, even one
                # its module makes at import (see REUSE_PORT_ENV).
                env=dict(os.environ, **{REUSE_PORT_ENV: "1"}) if self._reuse_port else None,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=inherited,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            os.close(ready_read)
            if not self._serving:
                raise CannotStart(f"cannot start worker {slot.index}: {exc}") from exc
            self._schedule_restart(slot, 0.0, f"worker {slot.index} could not be started ({exc})")
            return
        finally:
            os.close(ready_write)  # the worker has its copy: EOF comes when it is gone
        run = _Run(slot.index, proc)
        run.reader = threading.Thread(target=self._read, args=(run,), name=f"hisock-worker-{slot.index}", daemon=True)
        run.reader.start()
        run.pipe_reader = threading.Thread(
            target=self._read_pipe, args=(run, ready_read), name=f"hisock-worker-{slot.index}-ready", daemon=True
        )
        run.pipe_reader.start()
        slot.run = run
        log.debug("started worker %d: pid %d", slot.index, run.pid)

    def _read_pipe(self, run: _Run, fd: int) -> None:
        """Pipe reader thread: note every byte the worker writes; report the first READY."""
        try:
            while True:
                data = os.read(fd, 512)
                if not data:
                    return  # the worker is gone (or closed its end)
                run.last_heard = time.monotonic()
                if not run.serving and READY in data:
                    run.serving = True
                    self._events.put(_Event("serving", run))
        except OSError as exc:
            log.debug("worker %d's ready pipe: %s", run.index, exc)
        finally:
            os.close(fd)

    def _read(self, run: _Run) -> None:
        """Reader thread: copy the worker's stderr to ours; report EOF."""
        assert run.proc.stderr is not None
        with run.proc.stderr as stream:
            for raw in stream:
                line = raw.rstrip("\r\n")
                error = _ERROR_RE.match(line)
                if error:
                    # Withheld: the supervisor reports it once, in its own words.
                    run.error = error.group(1)
                    continue
                if line.strip():
                    run.last_line = line
                self._forward(run, line)
        self._events.put(_Event("eof", run))

    def _forward(self, run: _Run, line: str) -> None:
        with self._output_lock:
            sys.stderr.write(f"[worker {run.index} pid {run.pid}] {line}\n")
            sys.stderr.flush()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._events.put(_Event("signal", signum=signum))

    # ------------------------------------------------------------------ supervising

    def _supervise(self) -> Optional[str]:
        """The main loop; returns None after a stop signal, or why the workers cannot serve."""
        while True:
            now = time.monotonic()
            for slot in self._slots:
                if slot.run is not None and slot.run.proc.poll() is not None:
                    failure = self._on_exit(slot, slot.run)
                    if failure is not None:
                        return failure
                if slot.run is None and slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)
                elif slot.run is not None and slot.run.serving:
                    self._check_alive(slot.run, now)
            timeout = _POLL_INTERVAL
            for slot in self._slots:
                if slot.run is None and slot.restart_at is not None:
                    timeout = min(timeout, max(0.0, slot.restart_at - now))
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                continue
            if event.kind == "signal":
                running = sum(1 for slot in self._slots if slot.run is not None)
                log.info("%s: stopping %d worker(s)", signal.Signals(event.signum).name, running)
                return None
            if event.kind == "serving":
                self._on_serving(event.run)
            elif event.kind == "eof" and event.run is not None:
                # The worker is exiting: reap it now rather than at the next poll.
                try:
                    event.run.proc.wait(timeout=_POLL_INTERVAL)
                except subprocess.TimeoutExpired:
                    pass

    def _check_alive(self, run: _Run, now: float) -> None:
        """Kill a serving worker that has been silent on its pipe for too long."""
        silent = now - run.last_heard
        if silent < self.worker_timeout or run.killed_because is not None:
            return
        run.killed_because = f"it had not answered for {silent:.1f} s (worker timeout {self.worker_timeout:g} s)"
        log.error("worker %d (pid %d) is hung: %s; killing it", run.index, run.pid, run.killed_because)
        if run.proc.poll() is None:
            run.proc.kill()  # Popen.kill: our own child, by pid, and never one already reaped

    def _current(self, run: Optional[_Run]) -> bool:
        return run is not None and self._slots[run.index].run is run

    def _on_serving(self, run: Optional[_Run]) -> None:
        if not self._current(run):
            return
        assert run is not None
        if self._serving:
            log.info("worker %d restarted: pid %d serving", run.index, run.pid)
            return
        runs = [slot.run for slot in self._slots]
        if all(r is not None and r.serving for r in runs):
            self._serving = True
            how = "sharing the port with SO_REUSEPORT" if self._reuse_port else "sharing one listening socket"
            pids = ", ".join(str(r.pid) for r in runs if r is not None)
            log.info("serving on %s:%s with %d workers (pids %s), %s", self.host, self.port, self.workers, pids, how)

    def _on_exit(self, slot: _Slot, run: _Run) -> Optional[str]:
        """A worker exited: schedule its restart, or return why the group cannot start."""
        if run.reader is not None:
            run.reader.join(_DRAIN_TIMEOUT)  # for its last lines: the error, if any
        slot.run = None
        how = _describe_exit(run.proc.returncode)
        if not self._serving and not run.serving:
            if run.error:
                return run.error
            why = f": {run.last_line}" if run.last_line else ""
            return f"worker {run.index} (pid {run.pid}) {how} before serving{why}"
        ran = time.monotonic() - run.started
        delay = RESTART_DELAY if ran >= HEALTHY_RUN or not slot.delay else min(slot.delay * 2, MAX_RESTART_DELAY)
        reason = f"{how}: {run.error}" if run.error else how
        if run.killed_because:
            reason = f"{how} because {run.killed_because}"
        self._schedule_restart(slot, delay, f"worker {run.index} (pid {run.pid}) {reason}")
        return None

    def _schedule_restart(self, slot: _Slot, delay: float, what: str) -> None:
        slot.delay = delay or RESTART_DELAY
        slot.restart_at = time.monotonic() + slot.delay
        log.warning("%s; restarting it in %.1f s", what, slot.delay)

    # ------------------------------------------------------------------ stopping

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait up to STOP_TIMEOUT, SIGKILL the rest; reap them all."""
        runs = [slot.run for slot in self._slots if slot.run is not None]
        for slot in self._slots:
            slot.run = None
            slot.restart_at = None
        for run in runs:
            # Popen.send_signal does nothing for a child already reaped: only our own pids.
            run.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(run.proc.poll() is None for run in runs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = self._events.get(timeout=min(remaining, 0.05))
            except queue.Empty:
                continue
            if event.kind == "signal":
                log.warning("%s again: killing the workers", signal.Signals(event.signum).name)
                break
        for run in runs:
            if run.proc.poll() is None:
                log.warning("worker %d (pid %d) did not stop within %g s: killing it", run.index, run.pid, STOP_TIMEOUT)
                run.proc.kill()
        for run in runs:
            try:
                run.proc.wait(timeout=_KILL_WAIT)
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) is still running after SIGKILL", run.index, run.pid)
            for reader in (run.reader, run.pipe_reader):
                if reader is not None:
                    reader.join(_DRAIN_TIMEOUT)


def report_liveness(fd: int, server: Any, interval: float = LIVENESS_INTERVAL) -> Any:
    """In a worker: tell the supervisor on ``fd`` (``--ready-fd``) that ``server`` serves,
    then that its hub still turns, until the server closes.

    Spawns a greenlet on the calling hub (the server's, for a server started here) that
    writes :data:`READY` once, then :data:`ALIVE` every ``interval`` seconds, each time
    after a call to ``server.stats()``, which runs on the server's own hub: a blocked hub
    means no bytes.  A supervisor slow to read costs a skipped byte, never a blocked hub;
    one that is gone ends the greenlet.  Returns the greenlet.
    """
    import gevent

    os.set_blocking(fd, False)

    def beat() -> None:
        byte = READY
        try:
            while not server.closed:
                server.stats()
                try:
                    os.write(fd, byte)
                except BlockingIOError:
                    pass  # the pipe is full: the supervisor will read the next one
                byte = ALIVE
                gevent.sleep(interval)
        except OSError as exc:  # the supervisor closed its end: it is gone
            log.debug("ready pipe closed: %s", exc)
        finally:
            os.close(fd)

    return gevent.spawn(beat)
