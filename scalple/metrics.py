"""Prometheus metrics, read at scrape time.

The relay never touches a metrics library: the proxy and the sink keep plain
integer counters, and this collector reads them when Prometheus asks.  No
label ever carries a person, a query or a value, only states and SQLSTATEs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from scalple.proxy.listener import Proxy
    from scalple.sink.audit import AuditSink

__all__ = ["ProxyCollector", "serve_metrics"]


class ProxyCollector(Collector):
    """Everything a capacity or incident dashboard needs about one proxy."""

    def __init__(self, proxy: Proxy, sink: AuditSink) -> None:
        self._proxy = proxy
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        proxy, sink = self._proxy, self._sink
        yield GaugeMetricFamily(
            "scalple_client_connections", "Open client connections.", value=len(proxy.links)
        )
        yield CounterMetricFamily(
            "scalple_client_connections_accepted",
            "Client connections accepted since start.",
            value=proxy.accepted,
        )
        rejected = CounterMetricFamily(
            "scalple_connections_rejected",
            "Connections that never became sessions, by SQLSTATE.",
            labels=["sqlstate"],
        )
        for sqlstate, count in sorted(proxy.rejected.items()):
            rejected.add_metric([sqlstate], count)
        yield rejected
        yield CounterMetricFamily(
            "scalple_protocol_violations",
            "Client connections closed for malformed protocol messages.",
            value=proxy.protocol_violations,
        )
        yield CounterMetricFamily(
            "scalple_upstream_failures",
            "Sessions ended because the upstream closed or broke.",
            value=proxy.upstream_failures,
        )
        yield CounterMetricFamily(
            "scalple_observation_errors",
            "Failures of the audit observation code (traffic was still relayed).",
            value=proxy.observation_errors,
        )
        statements = CounterMetricFamily(
            "scalple_statements",
            "Statements written to the audit log, by status.",
            labels=["status"],
        )
        for status, count in sorted(sink.statements.items()):
            statements.add_metric([status], count)
        yield statements
        yield CounterMetricFamily(
            "scalple_audit_events_submitted",
            "Audit events handed to the writer.",
            value=sink.submitted,
        )
        yield CounterMetricFamily(
            "scalple_audit_events_written", "Audit events written to the log.", value=sink.written
        )
        yield GaugeMetricFamily(
            "scalple_audit_events_pending",
            "Audit events waiting for the writer.",
            value=sink.pending,
        )
        yield CounterMetricFamily(
            "scalple_audit_write_failures",
            "Failed attempts to write the audit log (retried; nothing is dropped).",
            value=sink.failed_writes,
        )
        yield CounterMetricFamily(
            "scalple_audit_worker_restarts",
            "Times the audit worker process died and was restarted (its batches resent).",
            value=sink.worker_restarts,
        )
        yield GaugeMetricFamily(
            "scalple_audit_congested",
            "1 while client reads are paused because the audit writer is behind.",
            value=1 if sink.congested else 0,
        )
        yield GaugeMetricFamily(
            "scalple_audit_unsynced_records",
            "Records written but not yet fsynced (async durability); with events_pending, "
            "what a power failure would lose.",
            value=sink.unsynced,
        )
        yield GaugeMetricFamily(
            "scalple_audit_sync_interval_seconds",
            "Longest time a written record waits for fsync (async durability's loss window).",
            value=0.0 if sink.strict else proxy.config.log.sync_interval,
        )
        yield CounterMetricFamily(
            "scalple_audit_records_lost",
            "Records the store could not write and gave up ([log] on_failure = continue).",
            value=sink.lost,
        )
        yield GaugeMetricFamily(
            "scalple_audit_store_failing",
            "1 while the audit log cannot be written (block mode refuses statements with 53100).",
            value=1 if sink.failing is not None else 0,
        )


def serve_metrics(address: tuple[str, int], proxy: Proxy, sink: AuditSink) -> None:
    """Serve ``/metrics`` on ``address`` from a daemon thread."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy, sink))
    start_http_server(address[1], addr=address[0], registry=registry)
