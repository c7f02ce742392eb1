"""A tiny run of the benchmark, so bench/ cannot rot. It asserts that every
call was answered correctly, never how fast: speed lives in bench/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.hotpath import HotPath
from bench.run import ROOT, goals, run
from bench.state_writes import measure


@pytest.mark.skipif(shutil.which("g++") is None, reason="the load generator needs g++")
def test_quick_bench_runs_and_answers_every_call() -> None:
    report = run(quick=True)
    for side in ("baseline", "bridge"):
        for connections, result in report[side].items():
            assert result["errors"] == 0 and result["calls"] > 0, (side, connections)
        assert report[f"{side}_latency"]["errors"] == 0
    inflight = report["inflight"]
    assert inflight["errors"] == 0 and inflight["calls"] == inflight["connections"]
    assert inflight["fds_after"] <= inflight["fds_before"]
    assert [name[:2] for name, *_ in goals(report)] == ["1.", "2.", "3."]


def test_state_write_timing_runs(tmp_path: Path) -> None:
    results = measure(str(tmp_path), sessions=5, writes=10)
    assert len(results) == 4 and all(len(d) == 10 for d in results.values())


def test_hot_path_harness_runs_real_bridged_calls(tmp_path: Path) -> None:
    path = HotPath(tmp_path)
    path.check()  # one call: the ICP request went out, the Thrift reply came back right
    answers = path.answers(20)
    assert path.run(answers) > 0
    assert path.icp.pending_calls == 0, "every call was answered"


def test_hot_path_harness_runs_the_worker_paths(tmp_path: Path) -> None:
    """The paths of a call answered by an OTS API worker (each checks that
    its calls were answered where they should be)."""
    path = HotPath(tmp_path)
    path.check()
    assert path.run_relayed(path.answers(5)) > 0
    assert path.run_forwarded(path.answers(5)) > 0
    assert path.run_worker_vc(5) > 0
    assert path.run_local(5) > 0
    assert path.icp.pending_calls == 0


def test_a_short_soak_runs_every_load_without_errors(tmp_path: Path) -> None:
    """A few seconds of bench.soak: every kind of load ran, nothing failed."""
    summary_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "0.12", "--sample", "3",
         "--lanes", "2", "--rdp-every", "3", "--storm", "50", "--storm-every", "2",
         "--json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(summary_path.read_text())
    assert summary["errors"] == {} and summary["bridge_tracebacks"] == 0
    counts = summary["counts"]
    for load in ("bridged", "logon", "churn", "storm", "rdp reconnect"):
        assert counts.get(load, 0) > 0, (load, counts)


def test_footprint_measures_a_real_start(tmp_path: Path) -> None:
    """bench.footprint starts a real twistd and reads its startup and idle
    memory (values checked for sense, never for speed)."""
    from bench.footprint import _setup, one_start

    config = _setup(tmp_path, workers=0)
    row = one_start(tmp_path, config, idle=0.0)
    assert row["processes"] == 1
    assert row["startup_s"] > 0 and row["startup_cpu_s"] > 0
    assert 0 < row["main_private_mb"] <= row["main_rss_mb"] and row["pss_mb"] > 0
