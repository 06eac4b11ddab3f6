"""Serve a server's :meth:`~hisock_gevent.server.HiSockServer.stats` over HTTP.

:func:`stats_app` is a WSGI application with three pages: ``/stats`` (the stats dict as
JSON), ``/metrics`` (the same numbers in Prometheus' text format, written by
prometheus_client) and ``/`` (a small page that polls ``/stats`` every second and shows
connections, message rates and groups).  :func:`serve_stats` runs it on gevent's pywsgi in
the calling hub, beside the HiSock server, so it costs no thread.

prometheus_client is only needed for ``/metrics``: ``pip install 'hisock_gevent[stats]'``.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from gevent.pywsgi import WSGIServer

__all__ = ["stats_app", "serve_stats", "prometheus_text"]

logger = logging.getLogger("hisock_gevent")

StatsSource = Callable[[], Dict[str, Any]]
StartResponse = Callable[[str, List[Tuple[str, str]]], Any]

_PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _page() -> bytes:
    return resources.files("hisock_gevent").joinpath("stats_page.html").read_bytes()


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


def stats_app(stats: StatsSource) -> Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app serving ``stats()`` (normally a server's bound ``stats`` method)."""

    def reply(start_response: StartResponse, status: str, content_type: str, body: bytes) -> List[bytes]:
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def app(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return reply(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n")
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
        if path in ("/", "/index.html"):
            return reply(start_response, "200 OK", "text/html; charset=utf-8", _page())
        return reply(start_response, "404 Not Found", "text/plain", b"not found: try /, /stats or /metrics\n")

    return app


def serve_stats(stats: StatsSource, host: str = "127.0.0.1", port: int = 0, listener: Any = None) -> WSGIServer:
    """Start serving :func:`stats_app` at ``(host, port)`` (or on ``listener``, a bound,
    listening socket) in this hub; returns the started server (``server.address`` is the
    real address; ``server.stop()`` ends it).

    Requests are not logged one by one: a page polling every second would fill the log.
    """
    server = WSGIServer(listener if listener is not None else (host, port), stats_app(stats), log=None, error_log=logger)
    server.start()
    if listener is None:
        address: Optional[Tuple[str, int]] = server.address
        assert address is not None
        logger.info("stats at http://%s:%s/", address[0], address[1])
    return server
