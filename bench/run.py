"""icp-bridge benchmark: the bridge against Apache Thrift's own Twisted
server, side by side, with the same C++ load generator.

Prints a table (throughput and p50/p99 latency at 1, 8, 64, 512 connections)
and the three goal ratios of the performance issue, with the CPU each process
used. ``--quick`` is a tiny run for the test suite.

usage: python -m bench.run [--quick] [--json FILE] [--python-peer]
                          [--baseline-reactor default|bridge]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType
from thrift.transport import TSocket, TTransport
from thrift.transport.TTransport import TMemoryBuffer

from protocols import icp
from protocols.generated import ICP_pb2, pbRPC_pb2
from protocols.generated.otsapi_blocking import otsapi

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def serving_processes(pid: int) -> list[int]:
    """``pid`` and the processes it forked to serve (the bridge's OTS API
    workers): its children running the same program in its session. The
    backends it starts lead sessions of their own and are left out."""
    def stat(p: int | str) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    try:
        exe, session = os.readlink(f"/proc/{pid}/exe"), stat(pid)[3]
    except (OSError, IndexError):
        return [pid]
    found = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            fields = stat(entry)
            if int(fields[1]) == pid and fields[3] == session \
                    and os.readlink(f"/proc/{entry}/exe") == exe:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def build(directory: Path, name: str) -> Path:
    """Compile bench/NAME.cpp (the load generator, the fast stand-in)."""
    binary = directory / name
    subprocess.run(["g++", "-O2", "-std=c++17", "-o", str(binary), str(HERE / f"{name}.cpp")],
                   check=True)
    return binary


def frame(message: Any) -> bytes:
    body = message.SerializeToString()
    return len(body).to_bytes(4, "big") + body


def fast_peer_argv(binary: Path, sock: Path, answer_delay: float) -> list[str]:
    """The C++ stand-in's command line: its first frames (handshake, a
    LogonUser for the bench user) and the answer payload per msgType, all
    encoded with the generated classes so they follow the IDL."""
    handshake = pbRPC_pb2.RPCBase(
        tag=1, isResponse=False, status=pbRPC_pb2.RPCBase.SUCCESS,
        msgType=icp.HANDSHAKE_MSG_TYPE, versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1))
    logon = pbRPC_pb2.RPCBase(
        tag=2, isResponse=False, status=pbRPC_pb2.RPCBase.SUCCESS, msgType=icp.MSG_LOGON_USER,
        payload=ICP_pb2.LogonUserRequest(
            connectionId=1, username="bench", password=PASSWORD, domain="", width=1920,
            height=1080, colorDepth=32, clientHostName="bench", clientAddress="192.0.2.10",
            clientBuildNumber=19041, clientProductId=1, clientHardwareId=0,
            clientProtocolType=2).SerializeToString())
    answers = {
        icp.MSG_PING: ICP_pb2.PingResponse(pong=True),
        icp.MSG_VIRTUAL_CHANNEL_OPEN: ICP_pb2.OtsApiVirtualChannelOpenResponse(
            connectionString="\\\\.\\pipe\\ogon_1_svc_CLIPRDR_1", instance=1),
        icp.MSG_VIRTUAL_CHANNEL_CLOSE: ICP_pb2.OtsApiVirtualChannelCloseResponse(success=True),
    }
    return [str(binary), str(sock), frame(handshake).hex(), frame(logon).hex(),
            str(answer_delay),
            *(f"{msg_type}={m.SerializeToString().hex()}" for msg_type, m in answers.items())]


def bench_config(base: Path, backend_logs: bool = True, workers: int | None = None) -> Path:
    """A config whose sessions run the stand-in backend (a logon starts one).
    ``backend_logs``: the backends' output goes under ``base`` too (older
    checkouts do not know the key); ``workers``: otsapi_workers (None: the
    default)."""
    backend = [sys.executable, str(ROOT / "bridge" / "backends" / "standin.py"), "--socket",
               "{pipe_dir}/{endpoint}"]
    user = pwd.getpwuid(os.geteuid()).pw_name
    path = base / "bridge.toml"
    path.write_text(
        f'pipe_dir = "{base}/pipes"\nadmin_endpoint = "tcp:0:interface=127.0.0.1"\n'
        'dbus_address = ""\n'
        + (f'backend_log_dir = "{base}/logs"\n' if backend_logs else "")
        + (f"otsapi_workers = {workers}\n" if workers is not None else "")
        + "".join(f'[modules.{name}]\ncommand = {json.dumps(backend)}\n'
                  f'endpoint = "ogon_{{session_id}}_{name}"\nuser = "{user}"\n'
                  for name in ("greeter", "xsession")))
    return path


def encode_call(name: str, **args: Any) -> str:
    buffer = TMemoryBuffer()
    oprot = TBinaryProtocol.TBinaryProtocol(buffer)
    oprot.writeMessageBegin(name, TMessageType.CALL, 1)
    getattr(otsapi, f"{name}_args")(**args).write(oprot)
    oprot.writeMessageEnd()
    body = buffer.getvalue()
    return (len(body).to_bytes(4, "big") + body).hex()


class Process:
    """A child process we measure; ended by pid."""

    def __init__(self, name: str, argv: list[str], stdin: str | None = None,
                 log: Path | None = None) -> None:
        self.name = name
        out = open(log, "w") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=raise_fd_limit,
        )
        if stdin is not None:
            self.popen.stdin.write(stdin.encode())
        self.popen.stdin.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        """CPU seconds of the process and its serving processes (workers)."""
        return sum(cpu_seconds(pid) for pid in serving_processes(self.pid))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def loadgen(binary: Path, port: int, request_hex: str, mode: str, connections: int,
            amount: float, warmup: int = 0) -> dict[str, Any]:
    result = subprocess.run(
        [str(binary), "127.0.0.1", str(port), request_hex, mode, str(connections), str(amount),
         str(warmup)], capture_output=True, text=True, preexec_fn=raise_fd_limit, timeout=120)
    if not result.stdout.strip():
        raise RuntimeError(f"loadgen failed: {result.stderr}")
    data = json.loads(result.stdout)
    data["stderr"] = result.stderr.strip()
    return data


@contextmanager
def baseline(workdir: Path, bridge_reactor: bool = False) -> Iterator[tuple[int, list[Process]]]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.baseline_server", str(port)]
    server = Process("baseline", [*argv, "--bridge-reactor"] if bridge_reactor else argv,
                     log=workdir / "baseline.log")
    try:
        wait_for(lambda: port_open(port), "the baseline server")
        yield port, [server]
    finally:
        server.stop()


@contextmanager
def bridge(workdir: Path, fast_peer: Path | None, answer_delay: float = 0.0,
           workers: int | None = None) -> Iterator[tuple[int, list[Process], str, int]]:
    """The bridge under twistd, a stand-in RDP server (the C++ one unless
    ``fast_peer`` is None) with one logged-on user, and a token: yields
    (port, [bridge, peer], token, session id)."""
    base = Path(tempfile.mkdtemp(prefix="ib-bench-", dir="/tmp"))
    port = free_port()
    users = base / "users"
    subprocess.run([sys.executable, "-m", "bridge.cli", "users", "add", "bench",
                    "--permission", "full", "--users", str(users), "--scrypt-n", "1024"],
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sock = base / "icp.sock"
    server = Process("bridge", [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
        "--pidfile=", "icp-bridge", "--config", str(bench_config(base, workers=workers)),
        "--icp", f"unix:{sock}:mode=600",
        "--thrift", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--state", str(base / "state"), "--users", str(users), "--token-dir", str(base),
    ], log=workdir / "bridge.log")
    processes = [server]
    try:
        wait_for(lambda: port_open(port) and sock.exists(), "the bridge")
        if fast_peer is not None:
            peer = Process("peer", fast_peer_argv(fast_peer, sock, answer_delay),
                           log=workdir / "peer.log")
        else:
            peer = Process("peer", [sys.executable, "-m", "bridge.cli", "peer", "--socket",
                                    str(sock), "--user", "bench", "--direct", "--pipe-dir", "",
                                    "--delay", str(answer_delay), "--quiet"],
                           stdin=PASSWORD + "\n", log=workdir / "peer.log")
        processes.append(peer)
        wait_for(lambda: "answering" in (workdir / "peer.log").read_text(), "the stand-in")
        transport = TTransport.TFramedTransport(TSocket.TSocket("127.0.0.1", port))
        client = otsapi.Client(TBinaryProtocol.TBinaryProtocol(transport))
        transport.open()
        token = client.logonConnection("bench", PASSWORD, "").authToken
        session_id = client.enumerateSessions(token, 1).sessionInfoList[0].sessionId
        transport.close()
        yield port, processes, token, session_id
    finally:
        for process in reversed(processes):
            process.stop()
        kill_backends(base)
        shutil.rmtree(base, ignore_errors=True)


def kill_backends(base: Path) -> None:
    """Stand-in backends a bridge under ``base`` started: they outlive the
    bridge by design (a restart adopts them), so the bench ends them, by the
    process group each leads (their command line names ``base``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and b"backends/standin.py" in cmdline:
            try:
                os.killpg(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def measure(binary: Path, port: int, processes: list[Process], request_hex: str, mode: str,
            connections: int, amount: float, warmup: int) -> dict[str, Any]:
    before = {p.name: p.cpu() for p in processes}
    result = loadgen(binary, port, request_hex, mode, connections, amount, warmup)
    result["cpu"] = {p.name: round(p.cpu() - before[p.name], 2) for p in processes}
    result["cpu"]["loadgen"] = result.pop("cpu_s")
    result["throughput"] = result["calls"] / result["seconds"] if result["seconds"] else 0.0
    return result


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from interleaved rounds: calls and seconds summed, the
    median of the rounds' percentiles, CPU summed per process."""
    calls = sum(r["calls"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu: dict[str, float] = {}
    for r in rounds:
        for name, value in r["cpu"].items():
            cpu[name] = round(cpu.get(name, 0.0) + value, 2)
    return {
        "calls": calls, "seconds": round(seconds, 3),
        "errors": sum(r["errors"] for r in rounds),
        "throughput": calls / seconds if seconds else 0.0,
        "p50_us": statistics.median(r["p50_us"] for r in rounds),
        "p99_us": statistics.median(r["p99_us"] for r in rounds),
        "cpu": cpu, "rounds": len(rounds),
    }


def run(quick: bool, python_peer: bool = False, baseline_reactor: str = "default",
        workers: int | None = None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ib-bench-run-"))
    binary = build(workdir, "loadgen")
    fast_peer = None if python_peer else build(workdir, "fast_peer")
    connection_counts = [1, 8] if quick else [1, 8, 64, 512]
    rounds = 1 if quick else 4
    seconds = 0.5 if quick else 1.0
    latency_calls, warmup = (500, 100) if quick else (5000, 500)
    inflight = 200 if quick else 10000
    hold = 0.2 if quick else 2.0
    report: dict[str, Any] = {"baseline": {}, "bridge": {},
                              "peer": "Python" if python_peer else "C++",
                              "baseline_reactor": baseline_reactor, "workers": workers}

    # Both servers run at once and the measurements alternate in short
    # rounds, so that the machine's drift (large on a shared VM) hits both
    # sides alike. Only the side being measured has any load.
    with baseline(workdir, baseline_reactor == "bridge") as (base_port, base_processes), \
            bridge(workdir, fast_peer, workers=workers) as (bridge_port, bridge_processes, token,
                                                            session_id):
        sides = {
            "baseline": (base_port, base_processes, encode_call("ping", input=7)),
            "bridge": (bridge_port, bridge_processes, encode_call(
                "virtualChannelOpen", authToken=token, sessionId=session_id,
                virtualName="CLIPRDR", isDynChannel=False, flags=0)),
        }
        latency: dict[str, list[dict[str, Any]]] = {"baseline": [], "bridge": []}
        for _ in range(rounds):
            for side, (port, processes, request) in sides.items():
                latency[side].append(measure(binary, port, processes, request, "latency", 1,
                                             latency_calls, warmup))
        for side in sides:
            report[f"{side}_latency"] = combine(latency[side])
        for n in connection_counts:
            results: dict[str, list[dict[str, Any]]] = {"baseline": [], "bridge": []}
            for _ in range(rounds):
                for side, (port, processes, request) in sides.items():
                    results[side].append(measure(binary, port, processes, request,
                                                 "duration", n, seconds, warmup))
            for side in sides:
                report[side][n] = combine(results[side])

    with bridge(workdir, fast_peer, answer_delay=hold, workers=workers) as (
            port, processes, token, session_id):
        vc_open = encode_call("virtualChannelOpen", authToken=token, sessionId=session_id,
                              virtualName="CLIPRDR", isDynChannel=False, flags=0)
        server = processes[0]
        fds_before = open_fds(server.pid)
        rss_before = peak_rss_mb(server.pid)
        started = time.monotonic()
        result = loadgen(binary, port, vc_open, "inflight", inflight, 0)
        result["wall_s"] = round(time.monotonic() - started, 2)
        result["peak_rss_mb"] = round(peak_rss_mb(server.pid), 1)
        result["rss_before_mb"] = round(rss_before, 1)
        result["fds_before"] = fds_before
        try:
            wait_for(lambda: open_fds(server.pid) <= fds_before, "connections to close", 10)
        except RuntimeError:
            pass
        result["fds_after"] = open_fds(server.pid)
        result["connections"] = inflight
        result["hold_s"] = hold
        report["inflight"] = result
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def goals(report: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    base_lat = report["baseline_latency"]["p50_us"]
    bridge_lat = report["bridge_latency"]["p50_us"]
    counts = sorted(report["bridge"])
    top = 64 if 64 in report["bridge"] else counts[-1]
    throughput_ratio = report["bridge"][top]["throughput"] / report["baseline"][top]["throughput"]
    inflight = report["inflight"]
    ok_inflight = (inflight["errors"] == 0 and inflight["calls"] == inflight["connections"]
                   and inflight["peak_rss_mb"] <= 300
                   and inflight["fds_after"] <= inflight["fds_before"])
    return [
        ("1. latency, 1 connection: bridged vc-open p50 / bare ping p50",
         bridge_lat / base_lat, "<= 1.25", bridge_lat / base_lat <= 1.25),
        (f"2. throughput, {top} connections: bridged vc-open / bare ping",
         throughput_ratio, ">= 1.00", throughput_ratio >= 1.0),
        (f"3. {inflight['connections']} calls in flight, answers held "
         f"{inflight['hold_s']} s: peak RSS MB",
         inflight["peak_rss_mb"], "<= 300, 0 errors, no fd leak", ok_inflight),
    ]


def print_report(report: dict[str, Any]) -> bool:
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{report['peer']} stand-in RDP server, baseline on the "
          f"{report['baseline_reactor']} reactor, otsapi_workers "
          f"{'default' if report.get('workers') is None else report['workers']}")
    print()
    print("side      conns   calls/s     p50 us    p99 us    CPU s (server / peer / loadgen)")
    for side in ("baseline", "bridge"):
        for n, r in sorted(report[side].items()):
            cpu = r["cpu"]
            print(f"{side:<9} {n:>5} {r['throughput']:>9.0f} {r['p50_us']:>10.1f} "
                  f"{r['p99_us']:>9.1f}    {cpu.get('baseline', cpu.get('bridge', 0)):.2f} / "
                  f"{cpu.get('peer', 0):.2f} / {cpu['loadgen']:.2f}")
    for side in ("baseline", "bridge"):
        r = report[f"{side}_latency"]
        print(f"sequential latency, 1 connection, {side}: p50 {r['p50_us']:.1f} us, "
              f"p99 {r['p99_us']:.1f} us ({r['calls']} calls in {r['rounds']} rounds)")
    i = report["inflight"]
    print(f"in flight: {i['calls']}/{i['connections']} answered, {i['errors']} errors, "
          f"{i['wall_s']} s wall, bridge peak RSS {i['peak_rss_mb']} MB "
          f"(before: {i['rss_before_mb']} MB), fds {i['fds_before']} -> {i['fds_after']}")
    print()
    all_ok = True
    for name, value, target, ok in goals(report):
        all_ok &= ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} (goal {target})")
    return all_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (for the tests)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--python-peer", action="store_true",
                        help="use the Python stand-in (icp-bridge peer) instead of the C++ one")
    parser.add_argument("--baseline-reactor", choices=("default", "bridge"), default="default",
                        help="run the baseline on Twisted's default reactor (as users would) "
                             "or on the bridge's BridgeReactor")
    parser.add_argument("--workers", type=int, default=None,
                        help="the bridge's otsapi_workers (default: its default; the CPU "
                             "figures count the workers' CPU too)")
    args = parser.parse_args()
    started = time.monotonic()
    report = run(args.quick, args.python_peer, args.baseline_reactor, args.workers)
    ok = print_report(report)
    print(f"\nbench took {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
