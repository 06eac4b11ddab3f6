"""``on()``: handler registration, reserved-event signatures, argument checks, and calling.

Server and client each own a :class:`HandlerTable` configured with their reserved events.
The table stores registrations in HiSock's ``funcs`` shape
(``{command: {"func", "name", "threaded", "override", "num_args"}}``) and looks them up
in O(1).  Calling a handler (inline, in a greenlet, or on a worker thread) and routing its
exceptions is the business of :class:`HandlerRunner`.
"""

from __future__ import annotations

import inspect
import logging
import sys
import traceback
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import gevent
from gevent.pool import Group

from .home import Home
from .messages import is_reserved_command

__all__ = [
    "HandlerTable",
    "HandlerRunner",
    "SERVER_RESERVED",
    "SERVER_UNRESERVED_ARGS",
    "CLIENT_RESERVED",
    "CLIENT_UNRESERVED_ARGS",
    "CATCH_ALL",
]

logger = logging.getLogger("hisock_gevent")

#: The catch-all event for command messages nobody registered for.
CATCH_ALL = "*"

#: Server reserved events -> the argument counts their handlers may take.
#: ``message`` takes (client, command, content); HiSock 3.0's documented two-argument
#: form (client, content) is accepted too.
SERVER_RESERVED: Mapping[str, Tuple[int, ...]] = {
    "join": (1,),
    "leave": (1,),
    "message": (2, 3),
    "name_change": (3,),
    "group_change": (3,),
    CATCH_ALL: (3,),
}
#: An ordinary server handler takes (), (client) or (client, content).
SERVER_UNRESERVED_ARGS: Tuple[int, ...] = (0, 1, 2)

#: Client reserved events -> the argument counts their handlers may take.
CLIENT_RESERVED: Mapping[str, Tuple[int, ...]] = {
    "client_connect": (1,),
    "client_disconnect": (1,),
    "force_disconnect": (0,),
    "reconnect": (0,),
    CATCH_ALL: (2,),
}
#: An ordinary client handler takes () or (content).
CLIENT_UNRESERVED_ARGS: Tuple[int, ...] = (0, 1)


#: What a handler call was about: (reserved event or "" for a command handler, the
#: command or None, the client concerned or None).  Put into words only on failure.
Context = Tuple[str, Optional[str], Any]


def _describe(context: Context) -> str:
    event, command, client = context
    if not event:
        what = repr(command)
    elif command is not None:
        what = f"'{event}' ({command!r})"
    else:
        what = repr(event)
    return what if client is None else f"{what} from {client}"


def _positional_range(func: Callable[..., Any]) -> Tuple[int, float]:
    """How many positional arguments ``func`` needs at least and takes at most."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return 0, float("inf")
    least, most = 0, 0.0
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            most = float("inf")
        elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            most += 1
            if param.default is param.empty:
                least += 1
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            return -1, -1  # can never be called positionally
    return least, most


def _argument_counts(allowed: Tuple[int, ...]) -> str:
    """``(0, 1, 2)`` -> ``"0, 1 or 2 positional arguments"``; ``(1,)`` -> ``"1 positional argument"``."""
    numbers = [str(n) for n in allowed]
    counts = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} or {numbers[-1]}"
    noun = "argument" if tuple(allowed) == (1,) else "arguments"
    return f"{counts} positional {noun}"


class HandlerTable:
    """The handlers registered with ``on()``, keyed by command or reserved event name.

    :param reserved: reserved event name -> allowed argument counts.
    :param unreserved_args: allowed argument counts of an ordinary command handler.
    """

    def __init__(self, reserved: Mapping[str, Tuple[int, ...]], unreserved_args: Tuple[int, ...]):
        self.reserved = reserved
        self.unreserved_args = unreserved_args
        #: HiSock's ``funcs``: command -> registration dict.
        self.funcs: Dict[str, Dict[str, Any]] = {}
        #: What a command message named X runs: kept apart from reserved events so the
        #: per-message lookup is a single dict.get (read it; register with register()).
        self.commands: Dict[str, Dict[str, Any]] = {}
        #: Reserved event -> its (not overridden) registration (read it, likewise).
        self.events: Dict[str, Dict[str, Any]] = {}

    def register(self, command: str, func: Callable[..., Any], threaded: bool, override: bool) -> None:
        """Register ``func`` for ``command`` (replacing an earlier one).

        :raises TypeError: ``func`` cannot take a number of arguments the event passes.
        :raises ValueError: the command has the reserved ``$...$`` form.
        """
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, not {type(command).__name__}")
        if is_reserved_command(command):
            raise ValueError(f'commands of the form "$command$" are reserved for HiSock: {command!r}')
        is_reserved = command in self.reserved and not override
        allowed = self.reserved[command] if is_reserved else self.unreserved_args
        least, most = _positional_range(func)
        fitting = [n for n in allowed if least <= n <= most]
        if not fitting:
            kind = f"reserved event {command!r}" if is_reserved else f"command {command!r}"
            raise TypeError(
                f"handler {getattr(func, '__name__', func)!r} for {kind} must take "
                f"{_argument_counts(allowed)}"
            )
        entry = {
            "func": func,
            "name": getattr(func, "__name__", repr(func)),
            "threaded": bool(threaded),
            "override": bool(override) and command in self.reserved,
            # The most arguments that fit: a handler with optional parameters gets them filled.
            "num_args": max(fitting),
        }
        self.funcs[command] = entry
        if is_reserved:
            self.commands.pop(command, None)
            self.events[command] = entry
        else:
            self.commands[command] = entry
            self.events.pop(command, None)

    def reserved_handler(self, event: str) -> Optional[Dict[str, Any]]:
        """The registration for a reserved event, unless it was overridden or is absent."""
        return self.events.get(event)

    def command_handler(self, command: str) -> Optional[Dict[str, Any]]:
        """The registration that handles a command message named ``command``, if any."""
        return self.commands.get(command)


class HandlerRunner:
    """Calls handlers: inline, or for ``threaded=True`` where blocking cannot stall the loop.

    In a monkey-patched program a greenlet is enough (``time.sleep`` yields); in a plain one
    a blocking handler would freeze the hub, so it runs on a worker thread of the home's
    thread pool instead.  Exceptions go to ``error_handler`` when one was given to
    ``start()``, otherwise to the log; they never reach the serving loop.
    """

    def __init__(self, home: Home, owner: str):
        self.home = home
        self.owner = owner
        self.error_handler: Optional[Callable[[BaseException], Any]] = None
        #: The greenlets that run handlers apart from the caller (``threaded=True`` in a
        #: monkey-patched program; the owner's own, such as a drop that runs ``leave``),
        #: so that the owner can end them when it closes.
        self.greenlets = Group()

    def call(self, entry: Dict[str, Any], args: Tuple[Any, ...], context: Context) -> None:
        """Call a registered handler with the first ``num_args`` of ``args``.

        ``context`` is ``(what, client)``, put into words only if the handler fails.
        """
        func = entry["func"]
        call_args = args[: entry["num_args"]]
        if not entry["threaded"]:
            # _guarded(), inlined: this runs for every message.
            try:
                func(*call_args)
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # a user handler failed: report, keep serving
                self.report(exc, context)
        elif self.home.program_is_patched():
            self.greenlets.spawn(self._guarded, func, call_args, context)
        else:
            self.home.workers().submit(self._on_worker, func, call_args, context)

    def answer(self, entry: Dict[str, Any], args: Tuple[Any, ...], done: Callable[[bool, Any], Any]) -> None:
        """Run a handler for a call (the ``call`` extension) and hand ``done(ok, value)``
        its return value (``ok``) or the exception it raised, on the home hub.

        It never runs in the caller's greenlet: the caller is a connection's reader, which
        must stay free to bring in the replies the handler may itself wait for.  In a plain
        program a ``threaded=True`` handler runs on a worker thread; otherwise a greenlet.
        """
        func = entry["func"]
        call_args = args[: entry["num_args"]]
        if entry["threaded"] and not self.home.program_is_patched():
            self.home.workers().submit(self._answer_on_worker, func, call_args, done)
        else:
            self.greenlets.spawn(self._answer, func, call_args, done)

    def _answer(self, func: Callable[..., Any], args: Tuple[Any, ...], done: Callable[[bool, Any], Any]) -> None:
        try:
            value = func(*args)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # goes back to the caller as a CallError
            done(False, exc)
            return
        done(True, value)

    def _answer_on_worker(self, func: Callable[..., Any], args: Tuple[Any, ...], done: Callable[[bool, Any], Any]) -> None:
        with self.home.worker_thread():
            try:
                outcome: Tuple[bool, Any] = (True, func(*args))
            except Exception as exc:  # goes back to the caller as a CallError
                outcome = (False, exc)
            try:
                self.home.call(done, *outcome)
            except Exception:  # the owner closed meanwhile: nobody is left to answer
                logger.debug("%s: could not answer a call", self.owner, exc_info=True)

    def _on_worker(self, func: Callable[..., Any], args: Tuple[Any, ...], context: Context) -> None:
        # While a worker runs a handler, close() called from it must not wait for the
        # home thread (which in turn waits for its workers): see Home.join_thread.
        with self.home.worker_thread():
            self._guarded(func, args, context)

    def _guarded(self, func: Callable[..., Any], args: Tuple[Any, ...], context: Context) -> None:
        try:
            func(*args)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # a user handler failed: report, keep serving
            self.report(exc, context)

    def report(self, exc: BaseException, context: Context) -> None:
        """Hand an exception to the error handler, or log it with its context.

        When nobody configured logging (only our NullHandler would see it), the traceback
        is printed to stderr instead, as ``threading.excepthook`` does: a handler error
        must never vanish.
        """
        handler = self.error_handler
        if handler is not None:
            try:
                handler(exc)
                return
            except Exception:
                logger.exception("%s: error_handler failed while handling an error in %s", self.owner, _describe(context))
        if _logging_configured():
            logger.error("%s: handler error in %s", self.owner, _describe(context), exc_info=exc)
            return
        print(f"hisock_gevent {self.owner}: handler error in {_describe(context)}:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _logging_configured() -> bool:
    """True when a record of our logger at ERROR reaches some handler other than a NullHandler."""
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler) and handler.level <= logging.ERROR:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False
