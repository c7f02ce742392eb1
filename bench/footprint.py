"""Startup and footprint: how long a start takes, and what the bridge holds
idle.

Starts ``twistd -n icp-bridge`` ``--rounds`` times (TLS OTS API with a
certificate pair made beforehand, the admin endpoint, a users file) and
for each start measures:

- **startup**: wall seconds from exec until the ICP socket exists and the
  OTS API port accepts (polled every millisecond), and the CPU seconds the
  process used until then (steadier than wall time on a shared machine);
- **idle memory**, ``--idle`` seconds after that: the main process's RSS,
  and the PSS of all its serving processes summed (the main process and
  its OTS API workers, see bench.run.serving_processes; PSS counts a page k
  processes share as 1/k in each, so the sum is what they take together
  where RSS would count shared pages once per process).

``--workers N`` sets otsapi_workers (default: the bridge's default).
``--like-ogon-check`` configures what ogon-check's harness does besides:
PAM (``authenticator = "pam"``) and D-Bus notifications (to a bus address
nothing listens on: connecting is the reactor's, after the start, either
way).
``--importtime`` also prints the imports of one start with the most
cumulative time (``python -X importtime``).

usage: python -m bench.footprint [--rounds 5] [--workers N] [--idle 1.5]
                                 [--like-ogon-check] [--importtime] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import ROOT, cpu_seconds, free_port, port_open, serving_processes


def _memory_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            values[name] = int(rest.split()[0])
    return values


def _cpu_seconds(pid: int) -> float:
    """On-CPU seconds of all the process's threads, to the nanosecond
    (schedstat; /proc/PID/stat counts 10 ms ticks, too coarse for a start)."""
    try:
        return sum(int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
                   for task in os.listdir(f"/proc/{pid}/task")) / 1e9
    except (OSError, ValueError):
        return cpu_seconds(pid)


def _wait_listening(process: subprocess.Popen[bytes], sock: Path, port: int) -> None:
    """Until the ICP socket exists and the port accepts, polling every
    millisecond (ogon-check polls every 20 ms: its figure is this one plus
    up to 20 ms)."""
    deadline = time.monotonic() + 60
    while not (sock.exists() and port_open(port)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bridge did not start: see its log")
        time.sleep(0.001)


def _setup(base: Path, workers: int | None, like_ogon_check: bool = False) -> Path:
    """A config, a users file and a TLS pair under ``base``."""
    sys.path.insert(0, str(ROOT))
    from bridge.security.auth import UserEntry, hash_password, write_users
    from bridge.security.tls import ensure_pair

    (base / "tls").mkdir()
    ensure_pair(base / "tls" / "ogon.crt", base / "tls" / "ogon.key")
    write_users(base / "users", [UserEntry("bench", 0x1FF, hash_password("pw", n=1024))])
    config = base / "bridge.toml"
    config.write_text(
        f'pipe_dir = "{base}/pipes"\nbackend_log_dir = "{base}/logs"\n'
        'admin_endpoint = "tcp:0:interface=127.0.0.1"\n'
        + ('authenticator = "pam"\n' f'dbus_address = "unix:path={base}/no-bus"\n'
           if like_ogon_check else 'dbus_address = ""\n')
        + (f"otsapi_workers = {workers}\n" if workers is not None else "")
        + f'[properties]\n"ssl.certificate" = "{base}/tls/ogon.crt"\n'
        f'"ssl.key" = "{base}/tls/ogon.key"\n')
    (base / "pipes").mkdir()
    return config


def one_start(base: Path, config: Path, idle: float, python_args: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    shutil.rmtree(base / "state", ignore_errors=True)
    sock = base / "icp.sock"
    sock.unlink(missing_ok=True)
    port = free_port()
    log = open(base / "bridge.log", "w")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *python_args, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "icp-bridge", "--config", str(config),
         "--icp", f"unix:{sock}:mode=600",
         "--thrift", f"ssl:{port}:interface=127.0.0.1", "--state", str(base / "state"),
         "--users", str(base / "users"), "--token-dir", str(base)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        # Without PYTHONDONTWRITEBYTECODE: an installed bridge starts from its
        # .pyc files (pip writes them); compiling every module again would
        # add ~0.1 s to each start.
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
             "PYTHONPATH": str(ROOT)})
    try:
        _wait_listening(process, sock, port)
        result: dict[str, Any] = {"startup_s": round(time.monotonic() - started, 4),
                                  "startup_cpu_s": round(_cpu_seconds(process.pid), 4)}
        time.sleep(idle)
        processes = serving_processes(process.pid)
        memory = [_memory_kb(pid) for pid in processes]
        result.update(processes=len(processes),
                      main_rss_mb=round(memory[0]["Rss"] / 1024, 1),
                      pss_mb=round(sum(m["Pss"] for m in memory) / 1024, 1),
                      main_private_mb=round((memory[0]["Private_Clean"]
                                             + memory[0]["Private_Dirty"]) / 1024, 1))
        return result
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def import_times(log: Path, top: int = 25) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, module) of a start's -X importtime output,
    by cumulative time."""
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line[len("import time:"):].split("|")
            try:
                rows.append((int(parts[0]), int(parts[1]), parts[2].rstrip()))
            except ValueError:
                continue
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--like-ogon-check", action="store_true")
    parser.add_argument("--idle", type=float, default=1.5)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ib-fp-", dir="/tmp"))
    try:
        config = _setup(base, args.workers, args.like_ogon_check)
        rows = [one_start(base, config, args.idle) for _ in range(args.rounds)]
        print(f"{args.rounds} starts, otsapi_workers "
              f"{'default' if args.workers is None else args.workers}, "
              f"{'PAM and D-Bus, ' if args.like_ogon_check else ''}"
              f"{len(os.sched_getaffinity(0))} cores; median [min..max]")
        for key, what in (("startup_s", "startup until ICP socket + TLS port accept (s)"),
                          ("startup_cpu_s", "CPU until then (s)"),
                          ("processes", "serving processes"),
                          ("main_rss_mb", "idle RSS, main process (MB)"),
                          ("main_private_mb", "idle private memory, main process (MB)"),
                          ("pss_mb", "idle PSS, all serving processes summed (MB)")):
            values = [row[key] for row in rows]
            print(f"  {what:<48} {round(statistics.median(values), 4):>7} "
                  f"[{min(values)}..{max(values)}]")
        if args.importtime:
            one_start(base, config, 0.2, ("-X", "importtime"))
            print("\nimports of one start by cumulative time (µs self, µs cumulative):")
            for own, cumulative, name in import_times(base / "bridge.log"):
                print(f"  {own:>8} {cumulative:>8} {name}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
