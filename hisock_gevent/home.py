"""The OS thread and gevent hub that own a server's or client's sockets, and safe calls into them.

gevent objects belong to the hub of the thread that made them.  A plain (not
monkey-patched) program that runs a threaded server or client, or a ``threaded=True``
handler on a worker thread, calls our methods from *other* OS threads; :meth:`Home.call`
runs such a call in a greenlet on the home hub and hands the result (or exception) back.

:class:`WorkerThreads` runs those blocking handlers: real daemon threads, started as they
are needed up to a limit, that never outlive their usefulness to the hub (a handler still
running when its owner closes finishes on its own, and nothing it does afterwards touches
the hub that is gone).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple, TypeVar

import gevent
import gevent.monkey
from gevent._hub_local import get_hub_if_exists
from gevent.event import Event
from gevent.lock import Semaphore

__all__ = ["Home", "WorkerThreads", "at_home", "DEFAULT_HANDLER_THREADS"]

logger = logging.getLogger("hisock_gevent")

#: Worker threads available to ``threaded=True`` handlers in a plain program at once;
#: more handlers wait (and so does the connection that sent their messages).
DEFAULT_HANDLER_THREADS = 256
#: Seconds an idle worker thread waits for work before it ends.
_WORKER_IDLE_SECONDS = 30.0

# The real primitives, whether or not the program monkey-patched threading.
_get_ident: Callable[[], int] = gevent.monkey.get_original("_thread", "get_ident")
_allocate_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")
_RealThread: Any = gevent.monkey.get_original("threading", "Thread")
_RealSimpleQueue: Any = gevent.monkey.get_original("queue", "SimpleQueue")
_RealEmpty: Any = gevent.monkey.get_original("queue", "Empty")
_F = TypeVar("_F", bound=Callable[..., Any])
# How often a caller on another thread checks that the home is still alive while waiting.
_LIVENESS_POLL = 0.25


def at_home(method: _F) -> _F:
    """Decorator for a method of an object with a ``_home``: the call runs on the home hub,
    whichever thread makes it (see :meth:`Home.call`); directly when there is no home yet
    or it has closed."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        home = self._home
        ident = home.ident
        if ident is None or ident == _get_ident() or not home.alive:
            return method(self, *args, **kwargs)
        if kwargs:
            return home.call(functools.partial(method, self, *args, **kwargs))
        return home.call(method, self, *args)

    return wrapper  # type: ignore[return-value]


class Home:
    """Which thread and hub own an object; runs calls there from any thread.

    Until :meth:`adopt_current_thread` is called the object is not bound to a hub and every
    call runs directly in the caller's thread.
    """

    def __init__(self) -> None:
        self.hub: Optional[Any] = None
        self.ident: Optional[int] = None
        self._workers: Optional[WorkerThreads] = None
        self._thread: Optional[Any] = None
        self._worker_idents: Set[int] = set()
        # Held while checking ``alive`` and scheduling on the hub from another thread, and
        # while clearing ``alive``: nothing is scheduled on a hub that is being torn down.
        self._alive_lock = _allocate_lock()
        self.alive = False

    @staticmethod
    def program_is_patched() -> bool:
        """True when the program monkey-patched threading (blocking code then yields to gevent)."""
        return gevent.monkey.is_module_patched("threading")

    def adopt_current_thread(self) -> None:
        """Make the calling thread and its hub the home."""
        self.hub = gevent.get_hub()
        self.ident = _get_ident()
        self.alive = True

    def is_here(self) -> bool:
        """True when the caller runs on the home thread (or there is no home yet)."""
        return self.ident is None or not self.alive or _get_ident() == self.ident

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` on the home hub and return its result or raise its exception.

        On the home thread this is a plain call.  From another thread the caller's thread
        blocks until a greenlet on the home hub has run it.
        """
        if self.is_here():
            return func(*args)
        done = _allocate_lock()
        done.acquire()
        outcome: List[Tuple[bool, Any]] = []

        # A caller on a thread with its own hub (another server's or client's handler) must
        # keep that hub running while it waits: two homes calling each other from their
        # handlers would otherwise deadlock.
        caller_hub = get_hub_if_exists()
        cooperative = caller_hub is not None and gevent.getcurrent() is not caller_hub
        wake = woken = None
        if cooperative:
            woken = Event()
            wake = caller_hub.loop.async_()
            wake.start(woken.set)

        def run() -> None:
            try:
                outcome.append((True, func(*args)))
            except BaseException as exc:  # handed back to the calling thread
                outcome.append((False, exc))
            finally:
                done.release()
                if wake is not None:
                    wake.send()

        hub = self.hub
        assert hub is not None
        hub.loop.run_callback_threadsafe(gevent.spawn, run)
        try:
            while not self._wait(done, woken):
                if not self.alive:
                    # The home stopped before running us: nothing owns the sockets any more.
                    return func(*args)
        finally:
            if wake is not None:
                wake.stop()
                wake.close()
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    @staticmethod
    def _wait(done: Any, woken: Optional[Event]) -> bool:
        """Wait a little for ``done``; cooperatively (on the caller's hub) when ``woken`` is given."""
        if woken is None:
            return bool(done.acquire(True, _LIVENESS_POLL))
        if done.acquire(False):
            return True
        woken.wait(_LIVENESS_POLL)
        woken.clear()
        return bool(done.acquire(False))

    def workers(self) -> WorkerThreads:
        """The worker threads for blocking handlers (created on first use, on the home hub)."""
        if self._workers is None:
            self._workers = WorkerThreads(self, DEFAULT_HANDLER_THREADS)
        return self._workers

    def call_soon_threadsafe(self, func: Callable[[], Any]) -> bool:
        """Have the home hub run ``func()`` soon, from any thread; False (and nothing is
        done) once the home has closed."""
        with self._alive_lock:
            if not self.alive or self.hub is None:
                return False
            self.hub.loop.run_callback_threadsafe(func)
            return True

    @contextlib.contextmanager
    def worker_thread(self) -> Iterator[None]:
        """Mark the calling worker thread as running a handler for this home."""
        ident = _get_ident()
        self._worker_idents.add(ident)
        try:
            yield
        finally:
            self._worker_idents.discard(ident)

    def start_thread(self, target: Callable[[], Any], name: str) -> None:
        """Run ``target`` on a new real OS thread, which becomes the home.

        Returns once the thread has adopted itself, so calls made right after are routed.
        """
        adopted = _allocate_lock()
        adopted.acquire()

        def main() -> None:
            self.adopt_current_thread()
            adopted.release()
            try:
                target()
            finally:
                self.alive = False
                self._shutdown_thread_hub()

        self._thread = _RealThread(target=main, name=name, daemon=True)
        self._thread.start()
        adopted.acquire()

    def _shutdown_thread_hub(self) -> None:
        # Handler workers are not waited for: they never touch this hub once it is closed.
        with self._alive_lock:
            self.alive = False
        hub = gevent.get_hub()
        try:
            hub.destroy(destroy_loop=True)
        except Exception:  # the thread is ending anyway; leave a trace only
            logger.debug("hub teardown failed", exc_info=True)

    def join_thread(self, timeout: Optional[float] = None) -> None:
        """Wait for the home thread started by :meth:`start_thread` to end.

        Returns at once on the home thread itself and on a worker running one of its
        handlers: the home thread cannot end before they return.
        """
        thread = self._thread
        me = _get_ident()
        if thread is not None and thread.ident != me and me not in self._worker_idents:
            thread.join(timeout)

    def close(self) -> None:
        """The owner closed: stop routing calls here.

        Later calls from other threads run where they are made (the owner refuses them)
        instead of waiting on a hub that may end with its thread; worker threads still
        running a handler finish on their own, their idle peers end.
        """
        with self._alive_lock:
            self.alive = False
        if self._workers is not None:
            self._workers.stop()


class WorkerThreads:
    """Real daemon threads for ``threaded=True`` handlers of a program that is not
    monkey-patched, started as they are needed, at most ``limit`` busy at once.

    :meth:`submit` is called on the home hub; when ``limit`` handlers are already running
    it waits, cooperatively, so the connection whose messages they are is the one held
    back.  A worker that finishes frees its slot through :meth:`Home.call_soon_threadsafe`,
    which does nothing once the home has closed: a handler that outlives its server never
    touches the hub again.  Idle workers end after a while, and all of them at :meth:`stop`.
    """

    def __init__(self, home: Home, limit: int):
        self.home = home
        self.limit = limit
        self._slots = Semaphore(limit)
        self._tasks = _RealSimpleQueue()
        self._lock = _allocate_lock()
        self._threads = 0
        self._idle = 0
        self._stopped = False

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on a worker thread; waits for a free slot first."""
        self._slots.acquire()
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                start = False
            else:
                self._threads += 1
                start = True
        self._tasks.put((func, args))
        if start:
            _RealThread(target=self._work, name="hisock-handler", daemon=True).start()

    def stop(self) -> None:
        """Let every idle worker end (busy ones end after their handler)."""
        with self._lock:
            self._stopped = True
            idle = self._idle
        for _ in range(idle):
            self._tasks.put(None)

    def _work(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=_WORKER_IDLE_SECONDS)
            except _RealEmpty:
                with self._lock:
                    if self._idle > 0:  # nobody is about to hand this thread work
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if task is None:
                with self._lock:
                    self._idle -= 1
                    self._threads -= 1
                return
            func, args = task
            try:
                func(*args)
            except BaseException:  # the handler's runner reports; never let a worker die
                logger.debug("a handler worker's task raised", exc_info=True)
            finally:
                self.home.call_soon_threadsafe(self._slots.release)
            with self._lock:
                if self._stopped:
                    self._threads -= 1
                    return
                self._idle += 1
