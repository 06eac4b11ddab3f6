"""The ``hisock-gevent`` command: serve an app, run the chat server, talk to a server.

Subcommands (``hisock-gevent SUBCOMMAND --help`` for each one's options)::

    hisock-gevent serve MODULE:ATTR [--host H] [--port P] ...   serve your server, like ``gunicorn app:app``
    hisock-gevent serve MODULE:ATTR --port P --workers N          N supervised worker processes on one port
    hisock-gevent chat [--host H] [--port P] [--websocket-port W] the chat server in hisock_gevent/chat.py (and its web page)
    hisock-gevent client HOST:PORT [--name N] [--group G]         interactive terminal client (hisock_gevent.console)
    hisock-gevent send HOST:PORT COMMAND [PAYLOAD] [--wait R]     one message, for scripts and health checks

``python -m hisock_gevent`` is the same command.  What ``client`` does with a typed line,
and the payload rule it shares with ``send``, are in :mod:`hisock_gevent.lines`; the
prompt itself is :mod:`hisock_gevent.console`; the chat server is :mod:`hisock_gevent.chat`.

How ``serve`` applies its options
---------------------------------

``serve`` imports the program inside :func:`~hisock_gevent.server.deferred_servers`: a
server the program makes at import neither binds nor serves there (its ``start()``
returns at once), so a program written to run on its own (``server = start_server(("127.0.0.1",
6969))`` ... ``server.start()``) runs unchanged under ``serve`` on the address the command
names, even when 6969 is taken.  ``ATTR`` names either

* a **factory**: a callable returning an unstarted HiSockServer.  Every option the
  factory has a keyword parameter for (``host``, ``port``, ``max_connections``,
  ``header_len``, ``keepalive``, ``certfile``, ``keyfile``, ``backplane``, ``reuse_port``,
  ``listener``; or any of them when it takes ``**kwargs``) is passed to it.  The factory
  builds the server exactly as it wants, and handlers that keep a reference to the
  server (e.g. ``self.server``) keep the right one.
* an **instance**, made at import (or a factory that did not accept some of the given
  options): a new HiSockServer is built from its configuration
  (``dataclasses.replace(server.config, ...)``) changed by the options, every handler in
  ``server.funcs`` is registered on it (same ``threaded``/``override``), and
  ``MODULE.ATTR`` is replaced by the new server, so module-level handlers that look up
  the global (``server.send_client(...)``) use the new one.  Handlers holding a
  reference of their own still point at the old one: use a factory for those.

``reuse_port`` (``--reuse-port``) and ``listener`` (``--listen-fd``, given by ``--workers``)
share a port with other processes, so a factory must take them itself: a factory that
does not would first bind the shared port on its own, which fails.  Instances are
rebuilt with them like with any other option.

``--workers N`` (N > 1) runs N worker processes under a supervisor instead of serving in
this process; see :mod:`hisock_gevent.workers`.  Each worker is this command again with
hidden options (``--reuse-port`` or ``--listen-fd FD``, ``--worker-index I`` and
``--ready-fd FD``, the pipe on which it tells the supervisor it serves and lives).  An
instance target works with either.

Exit status: 0 after a clean stop (SIGINT/SIGTERM close the server gracefully, ``send``
succeeded, the client reached the end of its input); 1 when ``send --wait`` got an
``error`` reply or timed out, or the server closed the connection; 2 for wrong input (bad ``HOST:PORT``, unknown
module or attribute, not a server, cannot bind, a worker that cannot start) or an
unreachable server.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from .client import ThreadedHiSockClient
from .errors import (
    ClientDisconnected,
    ConnectionRejected,
    InvalidTypeCast,
    ServerNotRunning,
    TLSError,
)
from .lines import LineError, format_content, parse_payload, visible
from .server import DEFAULT_BACKLOG, HiSockServer, ThreadedHiSockServer, deferred_servers

__all__ = ["main", "parse_hostport", "parse_payload"]

log = logging.getLogger("hisock_gevent.cli")

PROG = "hisock-gevent"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHAT_PORT = 6969
#: Seconds ``send`` waits for the connection and for ``--wait``'s reply by default.
DEFAULT_SEND_TIMEOUT = 10.0
#: Exit statuses.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: How often a threaded server is checked for having closed itself, in seconds.
_THREADED_POLL_INTERVAL = 0.2
#: How often a worker checks that its supervisor is still there, in seconds.
_ORPHAN_POLL_INTERVAL = 1.0

#: ``serve`` options a factory may accept as keyword arguments (option dest = parameter name).
SERVER_OPTIONS = (
    "host",
    "port",
    "max_connections",
    "header_len",
    "keepalive",
    "certfile",
    "keyfile",
    "backplane",
    "reuse_port",
)
#: Keywords that share the port with other processes: a factory must take them itself.
_SHARING_OPTIONS = ("reuse_port", "listener")
#: ``serve`` options the supervisor sets itself, per worker (the rest are passed on as given).
_SUPERVISOR_OPTIONS = frozenset(
    {
        "target", "workers", "host", "port", "stats_port", "reuse_port", "no_reuse_port", "listen_fd", "worker_index",
        "ready_fd", "worker_timeout", "help",
    }
)
#: HiSockServer settings carried over when an instance is rebuilt with new options.
class UsageError(Exception):
    """Wrong input from the command line's user: reported in one line, exit status 2."""


# ---------------------------------------------------------------------- parsing helpers


def parse_hostport(text: str) -> Tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``.

    :raises argparse.ArgumentTypeError: not of that form, or the port is not 0-65535.
    """
    if text.startswith("[") or text.count(":") > 1:
        raise argparse.ArgumentTypeError(f"IPv6 addresses are not supported (HiSock is IPv4 only): {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:6969), not {text!r}")
    return host, int(port_text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------- serve


def _import_target(spec: str) -> Tuple[ModuleType, str, Any]:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) with the current directory importable.

    :returns: the module holding the last attribute, its name, and the object.
    :raises UsageError: malformed spec, module not importable, attribute missing.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(f"expected MODULE:ATTR (e.g. app:server), not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"no module named {module_name!r} (looked in {cwd} and sys.path)") from exc
        log.debug("importing %s failed", module_name, exc_info=True)
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        log.debug("importing %s failed", module_name, exc_info=True)
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    owner: Any = module
    parts = attr_path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(owner, part):
            where = ".".join([module_name] + parts[:i])
            raise UsageError(f"{where!r} has no attribute {part!r}")
        if i < len(parts) - 1:
            owner = getattr(owner, part)
    return owner, parts[-1], getattr(owner, parts[-1])


def _accepted_keywords(factory: Callable[..., Any]) -> Optional[set]:
    """Names ``factory`` accepts as keywords; None when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    names = set()
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return names


def _rebuild(old: HiSockServer, options: Dict[str, Any]) -> HiSockServer:
    """A new HiSockServer with ``old``'s configuration and handlers, changed by ``options``.

    Every option of ``old.config`` is carried (``dataclasses.replace``), so a new option
    needs nothing here.  ``old`` is closed first, so the new one may bind the same port.
    """
    changes = dict(options)
    host = changes.pop("host", None) or old.addr[0]
    port = changes.pop("port", None)
    if port is None:
        port = old.addr[1]
    if changes.get("certfile") is not None:
        changes["ssl_context"] = None  # made again from the new files
    config = dataclasses.replace(old.config, **changes)
    handlers = [(command, dict(entry)) for command, entry in old.funcs.items()]
    old.close()
    new = HiSockServer.from_config((host, port), config)
    for command, entry in handlers:
        new.on(command, threaded=entry.get("threaded", False), override=entry.get("override", False))(entry["func"])
    log.debug("rebuilt the server on %s:%s with %d handler(s)", host, port, len(handlers))
    return new


def _given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The server keywords the command line gives; ``--listen-fd`` becomes ``listener``.

    :raises UsageError: ``--listen-fd`` is not an open socket.
    """
    options = {name: getattr(args, name) for name in SERVER_OPTIONS if getattr(args, name) is not None}
    if args.listen_fd is not None:
        try:
            options["listener"] = socket.socket(fileno=args.listen_fd)
        except OSError as exc:
            raise UsageError(f"--listen-fd {args.listen_fd} is not a usable socket: {exc}") from exc
    return options


def _build_server(spec: str, options: Dict[str, Any], worker: bool = False) -> HiSockServer:
    """The server ``MODULE:ATTR`` names, with ``options`` applied (see the module docstring).

    :param worker: we are one of ``--workers``' processes: with an inherited socket the
        target must be a factory.
    """
    # A server the program makes (and starts) at import neither binds nor serves: it is
    # rebuilt below on the address the command names, and served by us.
    with deferred_servers():
        owner, attr, target = _import_target(spec)
    if isinstance(target, HiSockServer):
        server = target
        rest = dict(options)
    elif callable(target):
        accepted = _accepted_keywords(target)
        passed = {k: v for k, v in options.items() if accepted is None or k in accepted}
        rest = {k: v for k, v in options.items() if k not in passed}
        missing = [name for name in _SHARING_OPTIONS if name in rest]
        if missing:
            needed = " and ".join(missing)
            raise UsageError(
                f"{spec}() does not take {needed}: to share the port with other processes "
                f"(--workers, --reuse-port) it must accept {needed} (or **kwargs) and pass it on to HiSockServer"
            )
        try:
            server = target(**passed)
        except OSError as exc:
            raise UsageError(f"{spec}() could not serve: {exc}") from exc
        except Exception as exc:
            log.debug("%s() failed", spec, exc_info=True)
            raise UsageError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(server, HiSockServer):
            raise UsageError(f"{spec}() returned {type(server).__name__}, not a HiSockServer")
        if rest:
            log.info("%s() does not take %s; rebuilding its server with them", spec, ", ".join(sorted(rest)))
    else:
        raise UsageError(f"{spec} is a {type(target).__name__}, not a HiSockServer or a factory returning one")
    if server.closed:
        raise UsageError(f"{spec}: the server is already closed")
    if rest or server.deferred:
        if isinstance(server, ThreadedHiSockServer) and not server.deferred:
            raise UsageError(f"{spec}: options cannot be applied to a ThreadedHiSockServer; use a factory taking them")
        try:
            server = _rebuild(server, rest)
        except OSError as exc:
            host, port = options.get("host") or server.addr[0], options.get("port", server.addr[1])
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UsageError(f"cannot serve on {host}:{port}: {reason}") from exc
        except (TypeError, ValueError) as exc:
            raise UsageError(f"cannot build the server: {exc}") from exc
        if getattr(owner, attr, None) is target:
            setattr(owner, attr, server)
    return server


def _start_stats(server: HiSockServer, args: argparse.Namespace) -> None:
    """Serve ``server.stats()`` over HTTP when ``--stats-port`` was given (until the server closes)."""
    if args.stats_port is None:
        return
    try:
        server.serve_stats(args.stats_host, args.stats_port)
    except OSError as exc:
        server.close()
        raise UsageError(f"cannot serve stats on {args.stats_host}:{args.stats_port}: {exc}") from exc


def _serve(server: HiSockServer, args: argparse.Namespace, supervisor_pid: Optional[int] = None) -> int:
    """Serve until SIGINT/SIGTERM (or until a handler closes the server).

    :param supervisor_pid: we are a worker of this supervisor: serve until SIGTERM (SIGINT
        is the supervisor's to act on) or until the supervisor is gone.
    """
    import gevent

    _start_stats(server, args)
    signums = (signal.SIGTERM,) if supervisor_pid is not None else (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        # Runs in a new greenlet on this hub, where close() may block while it drains.
        gevent.signal_handler(signum, _close_logged, server, signum)
    if supervisor_pid is not None:
        gevent.spawn(_close_when_orphaned, server, supervisor_pid)
    ready_fd = getattr(args, "ready_fd", None)  # only serve --workers gives it
    if ready_fd is not None:
        from .workers import report_liveness

        report_liveness(ready_fd, server)  # runs once the server serves
    host, port = server.get_addr()
    tls = " (TLS)" if getattr(server, "ssl_context", None) is not None else ""
    if isinstance(server, ThreadedHiSockServer):
        server.start()
        log.info("serving on %s:%s%s", host, port, tls)
        while not server.closed:
            gevent.sleep(_THREADED_POLL_INTERVAL)
        server.join(timeout=10)
    else:
        # The socket is already listening (bound in the constructor): connections wait in its backlog.
        log.info("serving on %s:%s%s", host, port, tls)
        try:
            server.start()
        except KeyboardInterrupt:
            server.close()
    log.info("stopped")
    return EXIT_OK


def _close_logged(server: HiSockServer, signum: int) -> None:
    log.info("%s: closing the server", signal.Signals(signum).name)
    server.close()


def _close_when_orphaned(server: HiSockServer, supervisor_pid: int) -> None:
    """A worker's watch: close the server once its supervisor is gone (killed, crashed)."""
    import gevent

    while not server.closed:
        gevent.sleep(_ORPHAN_POLL_INTERVAL)
        if os.getppid() != supervisor_pid:
            log.warning("the supervisor (pid %d) is gone: closing the server", supervisor_pid)
            server.close()
            return


def _worker_options(args: argparse.Namespace) -> List[str]:
    """The ``serve`` options given, as arguments again, minus those the supervisor sets.

    Read from the parser's own actions, so an option added to ``serve`` later reaches the
    workers without being listed here.
    """
    argv: List[str] = []
    for action in args.command_parser._actions:
        if not action.option_strings or action.dest in _SUPERVISOR_OPTIONS:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        argv += [flag] if action.nargs == 0 else [flag, str(value)]
    return argv


def _supervise(args: argparse.Namespace) -> int:
    """``serve --workers N``: hand over to the supervisor in :mod:`hisock_gevent.workers`."""
    from .workers import CannotStart, Supervisor

    if args.listen_fd is not None or args.worker_index is not None:
        raise UsageError("--workers cannot be combined with --listen-fd or --worker-index")
    if args.port is None:
        raise UsageError("--workers needs --port (0 picks a free one): the supervisor binds it before any worker starts")
    if args.stats_port and args.stats_port + args.workers - 1 > 65535:
        raise UsageError(f"--stats-port {args.stats_port} with {args.workers} workers goes past port 65535")
    _require_backplane(args.backplane, args.backplane_optional)
    options = _worker_options(args)
    if args.backplane and not args.backplane_optional:
        # Checked here once: a worker restarted while Redis is away serves alone meanwhile.
        options.append("--backplane-optional")
    supervisor = Supervisor(
        args.target,
        options,
        args.host or DEFAULT_HOST,
        args.port,
        args.workers,
        reuse_port=not args.no_reuse_port,
        stats_port=args.stats_port,
        backlog=DEFAULT_BACKLOG,
        worker_timeout=args.worker_timeout,
    )
    try:
        return supervisor.run()
    except CannotStart as exc:
        raise UsageError(str(exc)) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers > 1:
        return _supervise(args)
    supervisor_pid = None
    if args.worker_index is not None:
        supervisor_pid = os.getppid()
        # The supervisor stops its workers with SIGTERM; a Ctrl-C reaches the whole process
        # group, and only the supervisor acts on it (even while this worker is importing).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _require_backplane(args.backplane, args.backplane_optional)
    server = _build_server(args.target, _given_options(args), worker=supervisor_pid is not None)
    return _serve(server, args, supervisor_pid)


# ---------------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import make_server

    options: Dict[str, Any] = {}
    if args.max_connections is not None:
        options["max_connections"] = args.max_connections
    if args.keepalive:
        options["keepalive"] = True
    if args.websocket_port is not None:
        options["websocket"] = (args.host, args.websocket_port)
        if args.websocket_origin:
            options["websocket_origins"] = args.websocket_origin
    elif args.websocket_origin:
        raise UsageError("--websocket-origin needs --websocket-port")
    try:
        server = make_server(args.host, args.port, **options)
    except OSError as exc:
        raise UsageError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    if server.websocket_addr is not None:
        log.info("chat page at http://%s:%s/", *server.websocket_addr)
    return _serve(server, args)


# ---------------------------------------------------------------------- client


def _connect(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    host, port = args.address
    kwargs: Dict[str, Any] = dict(extra)
    if args.cafile:
        kwargs["cafile"] = args.cafile
    try:
        return cls((host, port), name=args.name, group=args.group, **kwargs)
    except (ServerNotRunning, ConnectionRejected, TLSError, OSError) as exc:
        raise UsageError(f"cannot connect to {host}:{port}: {exc}") from exc


def cmd_client(args: argparse.Namespace) -> int:
    from .console import Console

    client = _connect(ThreadedHiSockClient, args)
    host, port = args.address
    print(f"{PROG}: connected to {host}:{port}; type `command [payload]`, /help for more, Ctrl-D leaves", file=sys.stderr)
    return Console(client, json_mode=args.json).run()


# ---------------------------------------------------------------------- send


#: The command a server answers with when it refuses a request (the chat server's
#: convention): ``send --wait`` stops at it and exits 1 with its content as the reason.
ERROR_COMMAND = "error"
#: How many of the other replies a failed ``send --wait`` lists.
_REPLIES_LISTED = 5
#: Put in the reply queue when the connection has ended.
_ENDED = ("", None)


def _one_line(content: Any, limit: int = 200) -> str:
    text = visible(content if isinstance(content, str) else format_content(content))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_send(args: argparse.Namespace) -> int:
    try:
        content = parse_payload(args.payload, args.json)
    except LineError as exc:
        raise UsageError(f"PAYLOAD {args.payload!r} is {exc}") from exc
    replies: queue.Queue[Tuple[str, Any]] = queue.Queue()
    client: ThreadedHiSockClient = _connect(
        ThreadedHiSockClient, args, connect_timeout=args.timeout, answer_timeout=args.timeout
    )
    try:
        if args.wait is not None:
            client.on("*")(lambda command, content: replies.put((command, content)))

            def watch() -> None:
                client.join()
                replies.put(_ENDED)

            client.start()
            threading.Thread(target=watch, name="hisock-send-watch", daemon=True).start()
        try:
            client.send(args.command, content)
        except (ValueError, TypeError, InvalidTypeCast) as exc:
            raise UsageError(f"cannot send {args.command!r}: {exc}") from exc
        except ClientDisconnected as exc:
            print(f"{PROG}: the server closed the connection: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if args.wait is None:
            return EXIT_OK
        return _wait_for_reply(replies, args.wait, args.timeout)
    finally:
        client.close()


def _wait_for_reply(replies: queue.Queue[Tuple[str, Any]], wanted: str, timeout: float) -> int:
    """Print the content of the first ``wanted`` reply; report an error reply, a timeout or the end."""
    deadline = time.monotonic() + timeout
    others: List[str] = []
    while True:
        try:
            command, content = replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            failure = f"no {wanted!r} within {timeout:g} s"
            break
        if (command, content) == _ENDED:
            failure = f"the server closed the connection before {wanted!r} came"
            break
        if command == wanted:
            sys.stdout.write(format_content(content) + "\n")
            sys.stdout.flush()
            return EXIT_OK
        if command == ERROR_COMMAND:
            print(f"{PROG}: the server answered {ERROR_COMMAND}: {_one_line(content)}", file=sys.stderr)
            return EXIT_FAILED
        others.append(f"{_one_line(command, 40)} {_one_line(content, 100)}")
    if others:
        listed = "; ".join(others[:_REPLIES_LISTED]) + ("; ..." if len(others) > _REPLIES_LISTED else "")
        failure += f" (it sent {len(others)} other message(s): {listed})"
    print(f"{PROG}: {failure}", file=sys.stderr)
    return EXIT_FAILED


# ---------------------------------------------------------------------- the parser


def _worker_timeout(text: str) -> float:
    from .workers import LIVENESS_INTERVAL

    value = _seconds(text)
    if value < 2 * LIVENESS_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at least {2 * LIVENESS_INTERVAL:g} seconds")
    return value


def _backplane_url(text: str) -> str:
    from .backplane import check_url

    try:
        check_url(text)
    except (ValueError, ImportError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _require_backplane(url: Optional[str], optional: bool) -> None:
    """Check once that ``--backplane``'s Redis answers (before anything is built or started).

    :raises UsageError: it does not, and it is not ``optional`` (then it is logged).
    """
    from .backplane import check_reachable
    from .errors import BackplaneUnreachable

    if not url:
        return
    try:
        check_reachable(url)
    except BackplaneUnreachable as exc:
        if not optional:
            raise UsageError(f"{exc} (with --backplane-optional the server would start without it)") from None
        log.warning("%s; serving without the other workers until it answers (--backplane-optional)", exc)


def _add_cluster_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s options for supervised workers and their backplane."""
    from .workers import DEFAULT_WORKER_TIMEOUT

    serve.add_argument(
        "--backplane-optional", action="store_true",
        help="with --backplane: start even when its Redis does not answer, serving this process's clients "
        "alone until it does (by default the command fails with exit status 2)",
    )
    serve.add_argument(
        "--worker-timeout", metavar="SECONDS", type=_worker_timeout, default=DEFAULT_WORKER_TIMEOUT,
        help="with --workers: a worker whose hub has not answered the supervisor for this long "
        f"(a blocking handler, a stopped process) is killed and restarted (default {DEFAULT_WORKER_TIMEOUT:g})",
    )
    # Set by the supervisor: the pipe on which the worker says it serves, then that it lives.
    serve.add_argument("--ready-fd", type=_non_negative_int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level", default=None, type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging threshold for diagnostics on stderr (default: INFO for serve/chat, WARNING otherwise)",
    )
    parser = _Parser(
        prog=PROG,
        description="HiSock's server and client on gevent, from the command line.",
        epilog="Exit status: 0 ok; 1 send --wait got an error reply or timed out, or the server closed the connection; "
        "2 wrong input or server unreachable.  `%(prog)s SUBCOMMAND --help` for details.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
    sub.required = True

    def add_stats_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--stats-port", type=_port, default=None,
            help="also serve live statistics over HTTP on this port (0 picks one): a page at /, JSON at "
            "/stats, Prometheus text at /metrics (needs prometheus_client); logs 'stats at http://HOST:PORT/'",
        )
        p.add_argument("--stats-host", default=DEFAULT_HOST, help=f"address for --stats-port (default {DEFAULT_HOST})")

    serve = sub.add_parser(
        "serve", parents=[common], help="serve MODULE:ATTR, a HiSockServer or a factory returning one",
        description="Import MODULE (the current directory is importable) and serve ATTR: a HiSockServer "
        "instance, or a callable returning an unstarted one.  Options the factory takes as keyword "
        "arguments (host, port, max_connections, header_len, keepalive, certfile, keyfile, backplane, "
        "reuse_port) are passed to it; other given options rebuild the server on a new socket with its "
        "handlers copied over (and replace MODULE.ATTR).  SIGINT/SIGTERM close the server gracefully "
        "(exit status 0).  Logs 'serving on HOST:PORT' once listening.  With --workers N, N worker "
        "processes serve the port under a supervisor that restarts any that dies; ATTR may be a server "
        "made at import (it binds nothing at import: each worker rebuilds it on the shared port) or a "
        "factory taking reuse_port and listener (or **kwargs).",
    )
    serve.add_argument("target", metavar="MODULE:ATTR", help="e.g. app:server or app:make_server")
    serve.add_argument("--host", default=None, help="address to serve at (default: the server's own)")
    serve.add_argument("--port", type=_port, default=None, help="port to serve at; 0 picks a free one")
    serve.add_argument("--max-connections", type=_non_negative_int, default=None, help="clients at once; 0 = no limit")
    serve.add_argument("--header-len", type=_positive_int, default=None, help="frame header width (clients must match)")
    serve.add_argument("--keepalive", action="store_true", default=None, help="drop clients that stop answering keepalives")
    serve.add_argument("--certfile", default=None, help="serve TLS with this certificate (PEM)")
    serve.add_argument("--keyfile", default=None, help="the certificate's private key (PEM), if not in --certfile")
    serve.add_argument(
        "--backplane", metavar="URL", default=None, type=_backplane_url,
        help="share clients, groups and sends with the other servers on this backplane (e.g. redis://localhost:6379/0)",
    )
    serve.add_argument(
        "--workers", metavar="N", type=_positive_int, default=1,
        help="serve with N worker processes on one port, supervised: a worker that dies is restarted "
        "(default 1: serve in this process).  Needs --port.  MODULE:ATTR may be a server made at import "
        "(it is rebuilt on the shared port with its handlers) or a factory taking reuse_port and "
        "listener (or **kwargs)",
    )
    serve.add_argument(
        "--reuse-port", action="store_true", default=None,
        help="bind with SO_REUSEPORT, so several servers serve the same port (Linux, BSD)",
    )
    serve.add_argument(
        "--no-reuse-port", action="store_true",
        help="with --workers: the workers serve one listening socket inherited from the supervisor "
        "instead of each binding the port with SO_REUSEPORT (the default where available)",
    )
    # Set by the supervisor for its workers.
    serve.add_argument("--listen-fd", type=_non_negative_int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=_non_negative_int, default=None, help=argparse.SUPPRESS)
    _add_cluster_options(serve)
    add_stats_options(serve)
    serve.set_defaults(func=cmd_serve, default_level="INFO", command_parser=serve)

    chat = sub.add_parser(
        "chat", parents=[common], help="run the chat server (rooms, names, whispers)",
        description="Serve the chat server that ships in the package (hisock_gevent.chat, the same rules as "
        "examples/chat_server.py).  SIGINT/SIGTERM close it gracefully.  "
        "Talk to it with `client HOST:PORT` (commands: say TEXT, who, whisper {\"to\":..,\"text\":..}).",
    )
    chat.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve at (default {DEFAULT_HOST})")
    chat.add_argument("--port", type=_port, default=DEFAULT_CHAT_PORT, help=f"port; 0 picks a free one (default {DEFAULT_CHAT_PORT})")
    chat.add_argument("--max-connections", type=_non_negative_int, default=None, help="clients at once; 0 = no limit")
    chat.add_argument("--keepalive", action="store_true", help="drop clients that stop answering keepalives")
    chat.add_argument(
        "--websocket-port", type=_port, default=None,
        help="also serve browsers on this port (0 picks one): the chat page at http://HOST:PORT/, WebSocket "
        "clients at ws://HOST:PORT/hisock (needs pip install 'hisock_gevent[websocket]'); logs 'chat page at ...'",
    )
    chat.add_argument(
        "--websocket-origin", metavar="ORIGIN", action="append", default=None,
        help="with --websocket-port: a web page allowed to connect, e.g. https://example.com (repeatable; "
        "default: only the chat page itself, from the same host and port; '*' for any)",
    )
    add_stats_options(chat)
    chat.set_defaults(func=cmd_chat, default_level="INFO")

    def add_connect_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("address", metavar="HOST:PORT", type=parse_hostport, help="the server, e.g. 127.0.0.1:6969")
        p.add_argument("--name", default=None, help="the name to connect with")
        p.add_argument("--group", default=None, help="the group to join")
        p.add_argument("--cafile", default=None, help="connect with TLS, trusting this CA certificate (PEM)")

    payload_rule = (
        "Payloads are sent as text (`say 42` sends the string \"42\"), except a JSON object or array "
        "({...} or [...]), which is sent as a dict or list.  With --json every payload is JSON "
        "(42 is an int, \"42\" a string, null None) and one that is not JSON is refused."
    )
    client = sub.add_parser(
        "client", parents=[common], help="interactive terminal client (like wscat)",
        description="Each line you type is `command [payload]`, sent to the server.  " + payload_rule + "  "
        "Lines starting with / are for the client itself: /help, /name NAME, /group GROUP, /json (switch "
        "JSON mode), /quit.  On a terminal the prompt has line editing and a history (up/down), and what "
        "arrives (commands, joins, leaves, force disconnects) is printed with a timestamp above the line "
        "being typed.  With stdin from a pipe or file, each line is read and sent the same way.  End of "
        "input (Ctrl-D) leaves cleanly, exit status 0; exit status 1 when the server closes the connection.",
    )
    add_connect_options(client)
    client.add_argument("--json", action="store_true", help="start in JSON mode: every payload is JSON")
    client.set_defaults(func=cmd_client, default_level="WARNING")

    send = sub.add_parser(
        "send", parents=[common], help="send one message (optionally wait for a reply)",
        description="Connect, send COMMAND with PAYLOAD, optionally wait for REPLY_COMMAND and print its "
        "content as JSON (repr when JSON cannot carry it).  " + payload_rule + "  While waiting, an "
        f"{ERROR_COMMAND!r} reply from the server ends the wait: its content is printed on stderr as the "
        "reason, exit status 1.  Exit status 0 on success; 1 on an error reply, a timeout (the message "
        "lists what else the server sent) or a closed connection; 2 for wrong input or an unreachable server.",
    )
    add_connect_options(send)
    send.add_argument("command", metavar="COMMAND", help="the command to send")
    send.add_argument("payload", metavar="PAYLOAD", nargs="?", default=None, help="its content (default: none)")
    send.add_argument("--json", action="store_true", help="PAYLOAD is JSON, whatever it looks like")
    send.add_argument(
        "--wait", metavar="REPLY_COMMAND", default=None,
        help=f"wait for this command and print its content; an {ERROR_COMMAND!r} reply fails at once",
    )
    send.add_argument("--timeout", type=_seconds, default=DEFAULT_SEND_TIMEOUT, help=f"seconds to connect and to wait (default {DEFAULT_SEND_TIMEOUT:g})")
    send.set_defaults(func=cmd_send, default_level="WARNING")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``hisock-gevent`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    level = args.log_level or args.default_level
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
