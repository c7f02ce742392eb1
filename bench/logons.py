"""Logons over ICP: how long the RDP server waits for LogonUser, alone and in a
storm.

Runs a real ``twistd -n icp-bridge`` (its default OTS API workers included, if any)
whose desktop and greeter modules start the stand-in backend
(``bridge/backends/standin.py``, a Python program that makes its socket and
waits, as ogon-check's stand-in does), and an RDP server stand-in in another
process that sends LogonUser and times each answer:

1. ``--sequential`` desktop logons, one after the other, each a new user
   (authenticated, a new session, its desktop started and ready);
2. as many greeter logons (no credentials: a greeter started and ready);
3. a storm: ``--storm`` users log on one every ``--interval`` ms without
   waiting for answers (an RDP server with that many clients arriving), each
   getting a new session and desktop. Every one must be answered with its
   desktop: nothing refused, nothing answered with the greeter.

Users are in a users file with a cheap scrypt cost (n=2^10), so that the
bench measures the bridge rather than scrypt (the side-by-side run with
ogon uses PAM); backends run as the bench's own user, so no system
accounts are needed.

usage: python -m bench.logons [--sequential 20] [--storm 200] [--interval 50]
                              [--bridge-root DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import ROOT, cpu_seconds, free_port, port_open, serving_processes, wait_for

PASSWORD = "bench-pw"


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of the bridge and its OTS API workers (its serving
    processes), not of the backends it started."""
    return sum(cpu_seconds(p) for p in serving_processes(pid))


def summary(latencies: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    if not ms:
        return {}
    return {"p50_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[min(len(ms) - 1, len(ms) * 9 // 10)], 1),
            "max_ms": round(ms[-1], 1)}


# -- the RDP server side (run in its own process: --client) -------------------

def client_main(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred

    from bridge.rdp.standin import StandInRdpServer

    result: dict[str, Any] = {}

    async def logon(peer: StandInRdpServer, connection_id: int, user: str,
                    password: str) -> tuple[float, str]:
        started = time.monotonic()
        try:
            answer = await peer.logon(connection_id, user, password, timeout=120)
        except Exception as e:  # counted, not fatal
            return time.monotonic() - started, f"failed: {type(e).__name__}"
        return time.monotonic() - started, answer.serviceEndpoint

    def kind(endpoint: str) -> str:
        return ("desktop" if endpoint.endswith("_X11") else
                "greeter" if endpoint.endswith("_Qt") else endpoint)

    async def run() -> None:
        peer = StandInRdpServer(reactor)
        await peer.connect(f"unix:{args.icp}")
        connection = 1
        for phase, user_of in (("desktop", lambda k: f"seq{k:03d}"), ("greeter", lambda k: "")):
            times, kinds = [], []
            for k in range(args.sequential):
                seconds, endpoint = await logon(peer, connection, user_of(k),
                                                PASSWORD if phase == "desktop" else "")
                connection += 1
                times.append(seconds)
                kinds.append(kind(endpoint))
            result[f"{phase}_logon"] = {**summary(times), "count": len(times),
                                        "answered_as_wanted": kinds.count(phase)}
        if args.storm:
            started = time.monotonic()
            pending: list[Deferred[tuple[float, str]]] = []
            for k in range(args.storm):
                due = started + k * args.interval / 1000
                delay = due - time.monotonic()
                if delay > 0:
                    wait: Deferred[None] = Deferred()
                    reactor.callLater(delay, wait.callback, None)
                    await wait
                pending.append(ensureDeferred(logon(peer, connection + k, f"storm{k:03d}",
                                                    PASSWORD)))
            answers = [await d for d in pending]
            ends = [a[0] for a in answers]
            kinds = [kind(a[1]) for a in answers]
            result["storm"] = {
                "logons": args.storm, "interval_ms": args.interval,
                "desktop": kinds.count("desktop"), "greeter": kinds.count("greeter"),
                "failed": sum(1 for k in kinds if k.startswith("failed")),
                "first_to_last_answer_s": round(time.monotonic() - started, 3),
                **summary(ends)}
        peer.close()

    def done(_: object) -> None:
        print(json.dumps(result))
        reactor.stop()

    def failed(failure: Any) -> None:
        print(json.dumps({"error": failure.getErrorMessage()}))
        reactor.stop()

    ensureDeferred(run()).addCallbacks(done, failed)
    reactor.run()
    return 0


# -- the bridge ------------------------------------------------------------------

def write_config(base: Path, users: list[str]) -> Path:
    from bridge.security.auth import UserEntry, hash_password, write_users
    from bridge.security.permissions import USER

    cheap = hash_password(PASSWORD, n=2**10)
    write_users(base / "users", [UserEntry(name, int(USER), cheap) for name in users])
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    standin = str(ROOT / "bridge" / "backends" / "standin.py")
    me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    command = json.dumps([python, standin, "--socket", "{pipe_dir}/{endpoint}"])
    config = base / "bridge.toml"
    config.write_text(f"""
admin_endpoint = ""
dbus_address = ""
pipe_dir = "{base}/pipes"
[properties]
"ssl.certificate" = "{base}/tls/ogon.crt"
"ssl.key" = "{base}/tls/ogon.key"
[modules.greeter]
command = {command}
endpoint = "ogon_{{session_id}}_Qt"
user = "{me}"
[modules.xsession]
command = {command}
endpoint = "ogon_{{session_id}}_X11"
user = "{me}"
""")
    return config


def backends_of(pid: int) -> list[int]:
    """The stand-in backends the bridge started (its children running standin.py)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if ppid == pid and b"standin.py" in command:
            found.append(int(entry))
    return found


def end_backends(pids: list[int]) -> None:
    """Backends outlive the bridge by design: the bench ends its own (each
    leads its process group)."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--storm", type=int, default=200)
    parser.add_argument("--interval", type=float, default=50.0, help="ms between storm logons")
    parser.add_argument("--bridge-root", type=Path, default=ROOT)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--icp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    base = Path(tempfile.mkdtemp(prefix="ib-logons-", dir="/tmp"))
    users = [f"seq{k:03d}" for k in range(args.sequential)] + \
        [f"storm{k:03d}" for k in range(args.storm)]
    config = write_config(base, users)
    port = free_port()
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "icp-bridge", "--config", str(config), "--icp", f"unix:{base}/icp.sock",
            "--thrift", f"ssl:{port}:interface=127.0.0.1", "--state", str(base / "state"),
            "--users", str(base / "users"), "--token-dir", str(base)]
    log = open(base / "bridge.log", "w")
    bridge = subprocess.Popen(argv, cwd=args.bridge_root, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(args.bridge_root)})
    try:
        wait_for(lambda: port_open(port) and (base / "icp.sock").exists(), "the bridge",
                 timeout=30)
        time.sleep(1.0)  # what the start loads after it (libpam, inotify) is loaded
        cpu_before = tree_cpu_seconds(bridge.pid)
        client = subprocess.run(
            [sys.executable, "-m", "bench.logons", "--client", "--icp", str(base / "icp.sock"),
             "--sequential", str(args.sequential), "--storm", str(args.storm),
             "--interval", str(args.interval)],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        result = json.loads(client.stdout.strip().splitlines()[-1]) if client.stdout else {
            "error": client.stderr[-2000:]}
        result["bridge_cpu_s"] = round(tree_cpu_seconds(bridge.pid) - cpu_before, 2)
    finally:
        backends = backends_of(bridge.pid)
        bridge.terminate()
        bridge.wait(timeout=30)
        log.close()
        end_backends(backends)
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    storm = result.get("storm", {})
    ok = "error" not in result and (not args.storm or (
        storm.get("desktop") == args.storm and not storm.get("failed")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
