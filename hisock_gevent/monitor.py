"""Serve a server's :meth:`~hisock_gevent.server.HiSockServer.stats` over HTTP.

:func:`stats_app` is a WSGI application with four pages: ``/stats`` (the stats dict as
JSON), ``/metrics`` (the same numbers in Prometheus' text format, written by
prometheus_client), ``/history`` (the last few minutes, one sample a second, as JSON; see
:mod:`hisock_gevent.history`) and ``/`` (a page showing it all, with charts of the history,
that polls ``/stats`` and ``/history`` every second).  The page comes with the figures of
the moment it was served, so it shows numbers before its first poll.

:func:`serve_stats` runs the app on gevent's pywsgi in the calling hub, beside the HiSock
server, so it costs no thread; with it runs the sampler greenlet that feeds the history,
and both stop together.

prometheus_client is only needed for ``/metrics``: ``pip install 'hisock_gevent[stats]'``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from importlib import resources
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs

import gevent
from gevent.pywsgi import WSGIServer

from .history import DEFAULT_HISTORY_INTERVAL, DEFAULT_HISTORY_POINTS, StatsHistory

__all__ = [
    "StatsPages","stats_app", "serve_stats", "prometheus_text", "StatsHTTPServer", "page_data_json"]

logger = logging.getLogger("hisock_gevent")

StatsSource = Callable[[], Dict[str, Any]]
StartResponse = Callable[[str, List[Tuple[str, str]]], Any]

_PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: What a 405 answer allows (its ``Allow`` header).
_ALLOWED_METHODS = "GET, HEAD"
#: The element of stats_page.html that the app fills with the figures of the moment.
_PAGE_DATA_SLOT = b'<script id="initial-data" type="application/json">null</script>'
_PAGE_DATA_OPEN = b'<script id="initial-data" type="application/json">'


@functools.lru_cache(maxsize=1)
def _page_parts() -> Tuple[bytes, bytes]:
    """stats_page.html, split around its data slot (read once per process)."""
    page = resources.files("hisock_gevent").joinpath("stats_page.html").read_bytes()
    before, slot, after = page.partition(_PAGE_DATA_SLOT)
    if not slot:
        raise RuntimeError("stats_page.html has lost its initial-data slot")
    return before, after


def page_data_json(data: Any) -> bytes:
    """``data`` as JSON that is safe inside an HTML ``<script>`` element.

    Group and client names come from clients, so a name like ``</script><img ...>`` must
    not end the element: every ``<``, ``>`` and ``&`` is written as a ``\\u`` escape, which
    ``JSON.parse`` reads back as the same character, and everything outside ASCII is
    escaped too.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("ascii")


def _page(initial: Any) -> bytes:
    before, after = _page_parts()
    return before + _PAGE_DATA_OPEN + page_data_json(initial) + b"</script>" + after


def prometheus_text(stats: StatsSource) -> bytes:
    """The numbers of one ``stats()`` call in Prometheus' text exposition format.

    :raises ImportError: prometheus_client is not installed.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        """Reads ``stats()`` at scrape time, so nothing is counted twice."""

        def collect(self) -> Iterator[Any]:
            snap = stats()
            conns, clients = snap["connections"], snap["clients"]

            def gauge(name: str, doc: str, value: float) -> Any:
                return GaugeMetricFamily(f"hisock_{name}", doc, value=value)

            def counter(name: str, doc: str, value: float) -> Any:
                return CounterMetricFamily(f"hisock_{name}", doc, value=value)

            def by(name: str, doc: str, label: str, values: Dict[str, int], kind: Any = CounterMetricFamily) -> Any:
                family = kind(f"hisock_{name}", doc, labels=[label])
                for key, value in values.items():
                    family.add_metric([key], value)
                return family

            yield gauge("connections", "Connections open now (joined or in their handshake).", conns["now"])
            yield gauge("connections_peak", "Most connections open at once.", conns["peak"])
            yield counter("connections_accepted", "Connections accepted.", conns["accepted"])
            yield by("connections_refused", "Connections closed before joining, by reason.", "reason", conns["refused"])
            yield gauge("clients", "Clients joined now.", clients["joined"])
            yield by("group_clients", "Clients in each group.", "group", clients["groups"], GaugeMetricFamily)
            yield counter("clients_left", "Clients that left cleanly.", clients["left"])
            yield by("clients_dropped", "Clients dropped, by reason.", "reason", clients["dropped"])
            yield counter("messages_received", "Frames received from clients.", snap["messages"]["in"])
            yield counter("messages_sent", "Frames queued to clients.", snap["messages"]["out"])
            yield counter("bytes_received", "Bytes received from clients.", snap["bytes"]["in"])
            yield counter("bytes_sent", "Bytes written to clients.", snap["bytes"]["out"])
            yield by("frames_rejected", "Connections closed for breaking the protocol, by error.", "reason", snap["rejected"])
            yield gauge("uptime_seconds", "Seconds since the server was made.", snap["uptime_s"])
            cluster = snap.get("cluster")
            if cluster:
                yield from _cluster_families(cluster, gauge, counter, by)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def _cluster_families(cluster: Dict[str, Any], gauge: Any, counter: Any, by: Any) -> Iterator[Any]:
    """The metrics of a cluster worker's backplane (``stats()["cluster"]``)."""
    yield gauge("backplane_up", "1 while the backplane reaches Redis.", 1 if cluster["redis"] == "up" else 0)
    yield gauge(
        "backplane_down_seconds", "Seconds this worker has been serving without its backplane (0 while up).",
        cluster.get("down_s", 0.0),
    )
    yield gauge("backplane_remote_clients", "Clients held by the other workers.", cluster["remote_clients"])
    yield counter("backplane_published", "Messages published to the other workers.", cluster["published"])
    yield counter("backplane_received", "Messages received from the other workers.", cluster["received"])
    yield counter("backplane_dropped", "Messages for other workers lost while Redis was away.", cluster["dropped"])
    yield counter("backplane_malformed", "Messages or entries in Redis that were not ours.", cluster["malformed"])
    yield by(
        "backplane_applied", "Messages from the other workers acted on, by kind (join, group, to, ...).",
        "kind", cluster.get("received_by_kind", {}),
    )


def stats_app(
    stats: StatsSource, history: Optional[StatsHistory] = None
) -> Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app serving ``stats()`` (normally a server's bound ``stats`` method) and,
    when given, ``history`` (which someone else feeds: :func:`serve_stats` does).

    Pages: ``/`` (HTML), ``/stats`` (JSON), ``/metrics`` (Prometheus text), ``/history``
    (JSON; ``?since=SEQ`` for only the samples after that one; 404 without a history).
    Anything but GET or HEAD is answered ``405`` with an ``Allow`` header.  The app keeps no
    lock: call it from the hub that feeds ``history``, as pywsgi in :func:`serve_stats` does.
    """

    def reply(
        start_response: StartResponse, status: str, content_type: str, body: bytes, *extra: Tuple[str, str]
    ) -> List[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        start_response(status, headers + list(extra))
        return [body]

    def first_figures() -> Dict[str, Any]:
        """What the page shows before its first poll."""
        try:
            figures = stats()
        except Exception:  # the page still loads; its polls say what is wrong
            logger.exception("stats page: stats() failed; serving the page without figures")
            figures = None
        return {
            "stats": figures,
            "history": history.as_dict() if history is not None else None,
            "served_at": round(time.time(), 3),
        }

    def history_page(start_response: StartResponse, query: str) -> List[bytes]:
        if history is None:
            return reply(start_response, "404 Not Found", "text/plain", b"no history is kept here (serve_stats keeps one)\n")
        since_values = parse_qs(query, keep_blank_values=True).get("since", ["0"])
        try:
            since = int(since_values[-1])
        except ValueError:
            return reply(start_response, "400 Bad Request", "text/plain", b"since must be a sample number (an integer)\n")
        return reply(start_response, "200 OK", "application/json", json.dumps(history.as_dict(since)).encode())

    def app(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return reply(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n", ("Allow", _ALLOWED_METHODS))
        if path == "/stats":
            return reply(start_response, "200 OK", "application/json", json.dumps(stats()).encode())
        if path == "/metrics":
            try:
                body = prometheus_text(stats)
            except ImportError:
                return reply(
                    start_response, "501 Not Implemented", "text/plain",
                    b"/metrics needs prometheus_client: pip install 'hisock_gevent[stats]'\n",
                )
            return reply(start_response, "200 OK", _PROMETHEUS_CONTENT_TYPE, body)
        if path == "/history":
            return history_page(start_response, environ.get("QUERY_STRING", ""))
        if path in ("/", "/index.html"):
            return reply(start_response, "200 OK", "text/html; charset=utf-8", _page(first_figures()))
        return reply(start_response, "404 Not Found", "text/plain", b"not found: try /, /stats, /history or /metrics\n")

    return app


class StatsHTTPServer(WSGIServer):
    """gevent's pywsgi server for :func:`stats_app`, with the greenlet that samples
    ``stats()`` into :attr:`history` every ``history.interval`` seconds.

    The sampler starts with :meth:`start` and is killed by :meth:`close` (which
    :meth:`stop` calls), so it lives exactly as long as the pages.  It sleeps without
    holding the event loop open (``ref=False``): it never keeps a program alive on its own.
    A failing ``stats()`` is logged once per run of failures, not once a second.
    """

    def __init__(self, listener: Any, stats: StatsSource, history: StatsHistory, **kwargs: Any):
        super().__init__(listener, stats_app(stats, history), **kwargs)
        self.stats_source = stats
        self.history = history
        #: The sampler greenlet while the server serves; None before start and after close.
        self.sampler: Optional[gevent.Greenlet] = None

    def start(self) -> None:
        super().start()
        if self.sampler is None:
            self.sampler = gevent.spawn(self._sample_forever)

    def close(self) -> None:
        sampler, self.sampler = self.sampler, None
        try:
            super().close()
        finally:
            if sampler is not None:
                sampler.kill(block=True, timeout=1)

    def _sample_forever(self) -> None:
        history, stats = self.history, self.stats_source
        failing = False
        while True:
            try:
                history.record(stats(), time.monotonic(), time.time())
                failing = False
            except Exception:
                if not failing:
                    logger.exception("stats history: stats() failed; sampling on")
                failing = True
            gevent.sleep(history.interval, ref=False)


def serve_stats(
    stats: StatsSource,
    host: str = "127.0.0.1",
    port: int = 0,
    listener: Any = None,
    history_points: int = DEFAULT_HISTORY_POINTS,
    history_interval: float = DEFAULT_HISTORY_INTERVAL,
) -> StatsHTTPServer:
    """Start serving :func:`stats_app` at ``(host, port)`` (or on ``listener``, a bound,
    listening socket) in this hub, and sampling ``stats()`` into a history of
    ``history_points`` samples every ``history_interval`` seconds (served at ``/history``
    and charted on ``/``).  Returns the started server: ``server.address`` is the real
    address, ``server.history`` the history, and ``server.stop()`` ends the pages and the
    sampling.

    Requests are not logged one by one: a page polling every second would fill the log.

    :raises ValueError: ``history_points`` below 1 or ``history_interval`` not above 0.
    """
    history = StatsHistory(history_points, history_interval)
    server = StatsHTTPServer(
        listener if listener is not None else (host, port), stats, history, log=None, error_log=logger
    )
    server.start()
    if listener is None:
        address: Optional[Tuple[str, int]] = server.address
        assert address is not None
        logger.info("stats at http://%s:%s/", address[0], address[1])
    return server


class StatsPages:
    """The stats pages of one server: given listening sockets from any thread, served on
    the server's hub once it serves (:meth:`start`), stopped with it (:meth:`stop`)."""

    def __init__(self, stats: StatsSource):
        self._stats = stats
        self._waiting: List[Any] = []  # listeners given before the server served
        self._serving: List[StatsHTTPServer] = []
        self._started = False

    def add(self, listener: Any, run_on_hub: Callable[..., Any]) -> None:
        """Serve the pages on ``listener`` (now if the server serves, else at :meth:`start`);
        ``run_on_hub(func, *args)`` runs a call on the server's hub."""
        if self._started:
            run_on_hub(self._serve, listener)
        else:
            self._waiting.append(listener)

    def start(self) -> None:
        """The server serves (called on its hub): serve the pages given so far."""
        self._started = True
        waiting, self._waiting = self._waiting, []
        for listener in waiting:
            self._serve(listener)

    def _serve(self, listener: Any) -> None:
        self._serving.append(serve_stats(self._stats, listener=listener))

    def stop(self) -> None:
        """The server closed: stop every page and close the sockets never served."""
        for server in self._serving:
            server.stop(timeout=0.2)
        for listener in self._waiting:
            listener.close()
        self._waiting.clear()
