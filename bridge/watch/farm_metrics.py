"""The farm's Prometheus metrics, beside the bridge's own on /metrics:
whether the farm database answers, what is shipped and what waits, the
commands run here."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.farm.service import FarmService


class FarmCollector(Collector):
    """Read when Prometheus scrapes; the farm's parts keep plain counters."""

    def __init__(self, farm: FarmService) -> None:
        self.farm = farm

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        shipper = self.farm.shipper
        yield GaugeMetricFamily("icp_bridge_farm_connected",
                                "1 while the farm database takes this host's shipments",
                                value=1 if shipper.connected else 0)
        yield GaugeMetricFamily("icp_bridge_farm_listening",
                                "1 while the farm's notifications arrive",
                                value=1 if self.farm.listening else 0)
        yield CounterMetricFamily("icp_bridge_farm_events_shipped",
                                  "journal events shipped to the farm",
                                  value=shipper.events_shipped)
        yield GaugeMetricFamily("icp_bridge_farm_backlog_events",
                                "journal events not yet in the farm", value=shipper.backlog)
        yield GaugeMetricFamily("icp_bridge_farm_outbox_rows",
                                "failed-logon counts and command results owed to the farm",
                                value=self.farm.outbox.count())
        yield CounterMetricFamily("icp_bridge_farm_commands_run",
                                  "farm commands this host ran", value=self.farm.runner.ran)
        yield GaugeMetricFamily("icp_bridge_farm_event_id",
                                "the newest farm journal id this host has read",
                                value=self.farm.events.last_id)
