"""A tiny run of bench/farm.py, so it cannot rot: every phase ran, nothing
lost or stored twice. It asserts correctness, never speed."""

from __future__ import annotations

import pytest_twisted

from bench.farm import run, show
from tests.farm.pg import Cluster


@pytest_twisted.ensureDeferred
async def test_a_small_farm_bench_runs_every_phase(pg_cluster: Cluster) -> None:
    report = await run(bridges=3, sessions=20, outage=0.5, samples=10, logoffs=2,
                       deadline=60.0, cluster=pg_cluster)
    assert report["shipping"]["in_farm"] == report["shipping"]["events"] == 3 * 20 * 3
    assert report["latency_ms"]["samples"] == 10
    assert report["remote_logoff_ms"]["count"] == 2
    outage = report["outage"]
    assert (outage["lost"], outage["duplicated"], outage["sse_client_duplicated"]) == (0, 0, 0)
    assert outage["sse_client_in_order"]
    assert "outbox shipping" in show(report)
