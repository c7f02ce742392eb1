"""A connection storm: N WTSAPI clients connecting at once (after a network
blip or a bridge restart), each sending one framed ``ping`` and waiting for
its answer.

Runs a real ``twistd -n icp-bridge`` with its default listener settings
(only the port and the state are the test's; ``--tls`` keeps the default
TLS endpoint) and N concurrent asyncio clients in another process, and
prints how long until every client was answered, how many failed or were
refused, and the bridge's peak RSS and descriptors. ``--max-connections``
shows the cap: over it, connections are refused at once, not queued.

usage: python -m bench.storm [--clients N] [--tls] [--max-connections N]
                             [--bridge-root DIR] [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import ROOT, encode_call, free_port, open_fds, peak_rss_mb, port_open, wait_for

PING = bytes.fromhex(encode_call("ping", input=7))


async def one_client(port: int, context: ssl.SSLContext | None, deadline: float) -> str:
    """"ok", "refused" (closed before answering) or "error: ..."."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context,
                                    server_hostname="localhost" if context else None),
            timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        return "error: connect timed out"
    except (ConnectionError, ssl.SSLError, OSError) as e:
        return f"error: connect {type(e).__name__}"
    try:
        writer.write(PING)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(4),
                                        timeout=max(0.1, deadline - time.monotonic()))
        (length,) = struct.unpack("!i", header)
        await reader.readexactly(length)
        return "ok"
    except asyncio.IncompleteReadError:
        return "refused"
    except TimeoutError:
        return "error: answer timed out"
    except (ConnectionError, ssl.SSLError, OSError) as e:
        return f"refused ({type(e).__name__})"
    finally:
        writer.close()


async def storm(port: int, clients: int, tls: bool, timeout: float) -> dict[str, Any]:
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # as ogon's WTSAPI provider
    started = time.monotonic()
    deadline = started + timeout
    finished: list[float] = []

    async def timed() -> str:
        outcome = await one_client(port, context, deadline)
        finished.append(time.monotonic() - started)
        return outcome

    outcomes = await asyncio.gather(*(timed() for _ in range(clients)))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    ok_times = sorted(t for t, o in zip(finished, outcomes, strict=False) if o == "ok")
    return {"clients": clients, "outcomes": counts,
            "all_answered_s": round(max(finished), 2) if counts.get("ok") == clients else None,
            "p50_s": round(ok_times[len(ok_times) // 2], 2) if ok_times else None,
            "p90_s": round(ok_times[len(ok_times) * 9 // 10], 2) if ok_times else None,
            "p99_s": round(ok_times[len(ok_times) * 99 // 100], 2) if ok_times else None,
            "last_ok_s": round(ok_times[-1], 2) if ok_times else None}


def client_main(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(storm(args.port, args.clients, args.tls, args.timeout))
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--tls", action="store_true", help="the default TLS endpoint")
    parser.add_argument("--max-connections", type=int, help="max_connections for the bridge")
    parser.add_argument("--bridge-root", type=Path, default=ROOT,
                        help="run the bridge of this checkout (to compare with an older one)")
    parser.add_argument("--timeout", type=float, default=65.0)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    base = Path(tempfile.mkdtemp(prefix="ib-storm-", dir="/tmp"))
    port = free_port()
    config = base / "bridge.toml"
    lines = ['admin_endpoint = "tcp:0:interface=127.0.0.1"', 'dbus_address = ""']
    if args.max_connections:
        lines.append(f"max_connections = {args.max_connections}")
    if args.tls:
        lines.append(f'[properties]\n"ssl.certificate" = "{base}/ogon.crt"\n'
                     f'"ssl.key" = "{base}/ogon.key"')
    config.write_text("\n".join(lines) + "\n")
    thrift = f"ssl:{port}:interface=127.0.0.1" if args.tls else f"tcp:{port}:interface=127.0.0.1"
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "icp-bridge", "--icp", f"unix:{base}/icp.sock",
            "--thrift", thrift, "--state", str(base / "state"), "--users", str(base / "users"),
            "--token-dir", str(base)]
    root = args.bridge_root
    if (root / "bridge" / "admin.py").exists() or (root / "bridge" / "watch").is_dir():
        # older ones lack these keys
        argv += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(args.bridge_root)}
    log = open(base / "bridge.log", "w")
    bridge = subprocess.Popen(argv, cwd=args.bridge_root, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(port), "the bridge", timeout=30)
        fds_before = open_fds(bridge.pid)
        client = subprocess.run(
            [sys.executable, "-m", "bench.storm", "--client", "--port", str(port),
             "--clients", str(args.clients), "--timeout", str(args.timeout),
             *(["--tls"] if args.tls else [])],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if client.returncode != 0:
            print(client.stderr, file=sys.stderr)
            return 1
        result = json.loads(client.stdout)
        time.sleep(1)  # let the bridge close what the clients left
        result.update({"bridge_peak_rss_mb": round(peak_rss_mb(bridge.pid), 1),
                       "bridge_fds_before": fds_before, "bridge_fds_after": open_fds(bridge.pid),
                       "tls": args.tls, "max_connections": args.max_connections,
                       "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text())})
        text = (base / "bridge.log").read_text()
        refused_lines = [line for line in text.splitlines()
                         if "refusing OTS API connections" in line]
        result["refusal_log_lines"] = len(refused_lines)
        closes: dict[str, int] = {}
        for line in text.splitlines():
            if "closing OTS API connection" in line:
                reason = line.split(": ", 2)[-1]
                closes[reason] = closes.get(reason, 0) + 1
        result["closed_by_bridge"] = closes
        print(json.dumps(result, indent=2))
    finally:
        bridge.terminate()
        bridge.wait(timeout=30)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
