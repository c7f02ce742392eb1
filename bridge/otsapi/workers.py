"""OTS API worker processes, from the main process's side: the OTS API on
more than one core.

The main process binds the OTS API's listening socket and forks
``otsapi_workers`` workers (``bridge.otsapi.worker``) that accept on it
too; while at least one serves, the main process stops accepting. A worker
does a connection's TLS and framing and answers the read-only methods from
its copy of the sessions and tokens; it forwards every other call (and any
it would refuse) here, where ``ForwardedCalls`` serves it exactly as a
connection of this process is served and sends the reply back.

Keeping the copies current, and never wrong:

- Every change of a session (registry observer) and of a token (issued,
  slid, revoked, expired) goes to every worker with a position that grows
  by one per change; a worker acknowledges the positions it has applied.
- Every OTS API answer of this process waits (``WorkerPool`` is the
  factories' ``ReplyGate``) until every live worker has acknowledged every
  change made before it. So once logoffConnection has answered, no worker
  honours the token; once logonConnection has answered, every worker knows
  it; a client never sees an answer and then older state from a worker.
  While nothing changes, the gate is one comparison.
- A worker that does not acknowledge within ACK_TIMEOUT is killed: a dead
  worker answers nothing, and the others go on.
- A worker that dies is forked again (after RESTART_DELAY, doubling while
  it keeps dying); its clients lose their connection, as at any restart,
  and connect again to the others. With none serving, this process accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from bridge.otsapi import channel as wire
from bridge.otsapi.forwarding import ForwardedCalls, IcpRelay
from bridge.otsapi.worker import serve
from bridge.security.tokens import TokenListener, TokenRecord, TokenStore
from bridge.sessions.model import SessionChange, SessionEvent
from bridge.sessions.properties import ChannelPolicy
from bridge.sessions.registry import SessionRegistry
from protocols.listening import SharedConnectionCount
from protocols.thrift_server import ConnectionLimits, ThriftServerFactory

#: Seconds a worker has to acknowledge a change (or answer a SYNC, sent as
#: a heartbeat this often) before it is taken for hung and killed.
ACK_TIMEOUT = 5.0
#: Seconds before a dead worker is forked again; doubles up to the maximum
#: while workers die within RESTART_RESET of their start.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
RESTART_RESET = 60.0
#: Seconds /metrics and the token sweep wait for the workers' counts.
SYNC_TIMEOUT = 1.0
#: Seconds a stopping worker has between SIGTERM and SIGKILL.
STOP_TIMEOUT = 5.0


def default_worker_count() -> int:
    """``otsapi_workers = -1``: one worker per core this process may run on
    but two (none with one or two). A call a worker forwards or relays costs
    ~50% more CPU in all than one the main process answers alone (IPC;
    bench/README.md): a gain only with cores to spare beyond the main
    process's (relay, state writes) and the RDP server's own."""
    return max(0, len(os.sched_getaffinity(0)) - 2)


class Accepting:
    """Whether the main process accepts OTS API connections on its listener:
    not while workers serve them, nor while a storm of TLS handshakes waits
    (ThriftServerFactory's pause_accepting/resume_accepting)."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self._handshakes_allow = True
        self._workers_serve = False

    def handshakes_allow(self, on: bool) -> None:
        self._handshakes_allow = on
        self._update()

    def workers_serve(self, serving: bool) -> None:
        self._workers_serve = serving
        self._update()

    def _update(self) -> None:
        port = self.listener.port
        if port is not None and hasattr(port, "startReading"):
            if self._handshakes_allow and not self._workers_serve:
                port.startReading()
            else:
                port.stopReading()


def worker_pool(wanted: int, stream_listener: bool, listener: Any,
                factory: ThriftServerFactory, registry: SessionRegistry, tokens: TokenStore,
                store_tokens: TokenListener, reactor: Any, service_module: Any, keep: Any,
                accepting: Accepting, rdp: Any = None,
                channels: ChannelPolicy | None = None) -> WorkerPool | None:
    """The worker processes ``otsapi_workers`` (``wanted``) asks for, None
    when the main process serves alone (0 asked or one core; or an endpoint
    other than tcp:/ssl:, logged). Their tokens' changes are wired in."""
    count = default_worker_count() if wanted < 0 else wanted
    if not count:
        return None
    if not stream_listener:
        WorkerPool.log.info("otsapi_workers: the OTS API endpoint is not tcp: or ssl:, so the "
                            "main process serves it alone")
        return None
    pool = WorkerPool(count, listener, factory, registry, tokens, reactor, service_module,
                      keep=keep, main_accepts=lambda on: accepting.workers_serve(not on),
                      rdp=rdp, channels=channels)
    tokens.listener = pool.token_listener(store_tokens)
    return pool


@dataclass(eq=False)
class WorkerProcess:
    """One forked worker, as the main process sees it."""

    index: int
    pid: int
    channel: wire.Channel
    # The last position it acknowledged (its copy's position when forked).
    acked: int
    started_at: float
    serving: bool = False
    alive: bool = True
    calls: ForwardedCalls | None = None
    # Its counts as it last reported them (cumulative), and its gauges.
    reported_calls: dict[tuple[str, str], int] = field(default_factory=dict)
    reported_dropped: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    in_flight: int = 0
    # Its calls being served here (not answered yet).
    calls_here: int = 0
    pidfd: Any = None
    ack_deadline: Any = None
    kill_call: Any = None
    # The heartbeat SYNC it has not answered yet.
    heartbeat_sent: int | None = None
    # Fires once it answers nothing more (dead, or cut off and killed).
    gone: Deferred[None] = field(default_factory=Deferred)


class _PidfdReader:
    """Readable once the worker has exited."""

    def __init__(self, fd: int, on_exit: Callable[[], None]) -> None:
        self.fd = fd
        self.on_exit = on_exit

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.on_exit()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "otsapi-worker"


def _merge_counts(factory: ThriftServerFactory, worker: WorkerProcess, body: bytes) -> None:
    """A worker's COUNTS: its cumulative call and drop counters (added to
    the main process's by their growth since its last report), connections
    and calls in flight."""
    counts = json.loads(body)
    calls = {(method, outcome): n for method, outcome, n in counts["calls"]}
    for key, n in calls.items():
        delta = n - worker.reported_calls.get(key, 0)
        if delta > 0:
            factory.call_counts[key] += delta
    for reason, n in counts["dropped"].items():
        delta = n - worker.reported_dropped.get(reason, 0)
        if delta > 0:
            factory.dropped[reason] += delta
    worker.reported_calls = calls
    worker.reported_dropped = dict(counts["dropped"])
    worker.connections = counts["connections"]
    worker.in_flight = counts["in_flight"]


def _log_worker_event(worker: WorkerProcess, body: bytes) -> None:
    """A worker's log event (its only log observer sends them here),
    emitted under its namespace in the main process's log."""
    event = json.loads(body)
    level = LogLevel.levelWithName(event["level"]) \
        if event["level"] in ("debug", "info", "warn", "error", "critical") else LogLevel.info
    Logger(namespace=event["namespace"]).emit(
        level, "{text}", text=event["text"],
        log_system=f"{event['namespace']}#{level.name} worker {worker.index}")


class WorkerPool(Service):
    """Forks ``count`` OTS API workers on the OTS API listener's socket and
    keeps them current, alive and counted (see the module docstring)."""

    log = Logger()

    def __init__(self, count: int, listener: Any, factory: ThriftServerFactory,
                 registry: SessionRegistry, tokens: TokenStore, reactor: Any,
                 service_module: Any, keep: Any,
                 main_accepts: Callable[[bool], None], rdp: Any = None,
                 channels: ChannelPolicy | None = None) -> None:
        """``listener``: the OTS API ListeningService (its ``socket`` and
        ``context``); ``keep``: what the main process holds (a worker keeps
        it referenced, see bridge.otsapi.worker); ``main_accepts(on)``:
        start or stop this process's accepting; ``rdp``: the RDP server
        link the workers' ICP requests are relayed on (``call_payload``);
        ``channels``: the channel policy the workers start with."""
        self.count = count
        self.relay = IcpRelay(rdp)
        self.channels = channels
        self.listener = listener
        self.factory = factory
        self.registry = registry
        self.tokens = tokens
        self.reactor = reactor
        self.service_module = service_module
        self.keep = keep
        self.main_accepts = main_accepts
        self.position = 0
        self.workers: dict[int, WorkerProcess] = {}
        self.shared = SharedConnectionCount(count + 1)
        self.published = wire.PublishedPosition()
        for index in range(1, count + 1):
            self.shared.absent(index)
        self._held: deque[tuple[int, Callable[[], None]]] = deque()
        self._releasing = False
        self._syncs: dict[int, tuple[Deferred[None], set[int]]] = {}
        self._next_sync = 1
        self._restart_delay: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._heartbeat: LoopingCall | None = None
        self._serving_waiters: list[tuple[int, Deferred[None]]] = []
        # Calls the workers forwarded here (for tests and the curious).
        self.forwarded = 0
        factory.count = self.shared.for_slot(0)
        factory.gate = self
        # First: the position is published before any other observer can
        # show the change (a D-Bus signal, the event stream).
        registry.observe(self._session_changed, first=True)

    # -- the gate: answers wait for every worker to have every change -----------

    @property
    def open(self) -> bool:
        return self._releasing or (not self._held and self._caught_up(self.position))

    def hold(self, send: Callable[[], None]) -> None:
        self._held.append((self.position, send))

    def _caught_up(self, position: int) -> bool:
        for worker in self.workers.values():
            if worker.alive and worker.acked < position:
                return False
        return True

    def _release(self) -> None:
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._held and self._caught_up(self._held[0][0]):
                _, send = self._held.popleft()
                send()
        finally:
            self._releasing = False

    # -- changes out --------------------------------------------------------------

    def _broadcast(self, kind: bytes, change: dict[str, Any]) -> None:
        live = [w for w in self.workers.values() if w.alive]
        if not live:
            return
        self.position += 1
        self.published.publish(self.position)  # before anything can show the change
        change["p"] = self.position
        message = wire.encode_json(kind, change)
        for worker in live:
            worker.channel.send(message)
            if worker.ack_deadline is None:
                worker.ack_deadline = self.reactor.callLater(ACK_TIMEOUT, self._hung, worker)

    def _session_changed(self, change: SessionChange) -> None:
        if change.event is SessionEvent.ENDED:
            self._broadcast(wire.SESSION, {"ended": change.session.session_id})
        else:
            self._broadcast(wire.SESSION, {"session": wire.session_to_json(change.session)})

    def policy_changed(self, properties: tuple[Any, Any] | None = None,
                       channels: tuple[list[str], list[str]] | None = None) -> None:
        """A reload changed the properties (global values, per user) or the
        channel lists: the workers check virtual channels with the new ones."""
        change: dict[str, Any] = {}
        if properties is not None:
            global_values, per_user = properties
            change["properties"] = [dict(global_values),
                                    {user: dict(values) for user, values in per_user.items()}]
        if channels is not None:
            change["channels"] = list(channels)
        self._tell_all(wire.encode_json(wire.POLICY, change))

    def limits_changed(self, limits: ConnectionLimits) -> None:
        """A reload changed the OTS API's connection limits: the workers
        enforce them too."""
        values = {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)
                  if f.name != "clock"}
        self._tell_all(wire.encode_json(wire.LIMITS, values))

    def _tell_all(self, message: bytes) -> None:
        for worker in self.workers.values():
            if worker.alive:
                worker.channel.send(message)

    def token_listener(self, store: TokenListener) -> TokenListener:
        """The TokenStore listener that tells the workers too: a removal
        reaches them before the store (so that a removal the disk refuses
        still stops them honouring it), an issue after (a token the store
        refused was never handed out)."""
        def changed(digest: str, record: TokenRecord | None) -> None:
            if record is None:
                self._broadcast(wire.TOKEN, {"gone": digest})
                store(digest, record)
            else:
                store(digest, record)
                self._broadcast(wire.TOKEN, {"token": wire.token_to_json(record)})

        return changed

    # -- workers' messages in -----------------------------------------------------

    def _handlers(self, worker: WorkerProcess) -> dict[bytes, Callable[[bytes], None]]:
        return {
            wire.HELLO: lambda body: self._hello(worker, body),
            wire.CALL: lambda body: self._call(worker, body),
            wire.ICP_CALL: lambda body: self.relay.call(worker, body),
            wire.ACK: lambda body: self._ack(worker, wire.decode_number(body)),
            wire.TOUCH: self._touch,
            wire.COUNTS: lambda body: _merge_counts(self.factory, worker, body),
            wire.SYNCED: lambda body: self._synced(worker, wire.decode_number(body)),
            wire.LOG: lambda body: _log_worker_event(worker, body),
        }

    def _hello(self, worker: WorkerProcess, body: bytes) -> None:
        worker.serving = True
        self.log.info("OTS API worker {index} (pid {pid}) serving", index=worker.index,
                      pid=worker.pid)
        self.main_accepts(False)
        serving = self.serving
        waiting, self._serving_waiters = self._serving_waiters, []
        for count, d in waiting:
            if serving >= count:
                d.callback(None)
            else:
                self._serving_waiters.append((count, d))

    @property
    def serving(self) -> int:
        """Workers alive and serving."""
        return sum(1 for w in self.workers.values() if w.alive and w.serving)

    def when_serving(self, count: int | None = None) -> Deferred[None]:
        """Fires once ``count`` (default: all) workers serve."""
        count = self.count if count is None else count
        if self.serving >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._serving_waiters.append((count, d))
        return d

    def _call(self, worker: WorkerProcess, body: bytes) -> None:
        self.forwarded += 1
        connection_id, host, source, message = wire.decode_call(body)
        assert worker.calls is not None
        worker.calls.call(connection_id, host, source, message)

    def _ack(self, worker: WorkerProcess, position: int) -> None:
        worker.acked = max(worker.acked, position)
        if worker.acked >= self.position and worker.ack_deadline is not None:
            if worker.ack_deadline.active():
                worker.ack_deadline.cancel()
            worker.ack_deadline = None
        self._release()

    def _touch(self, body: bytes) -> None:
        for digest, when in json.loads(body).items():
            self.tokens.touch(digest, float(when))

    def _synced(self, worker: WorkerProcess, number: int) -> None:
        if number == worker.heartbeat_sent:
            worker.heartbeat_sent = None
            return
        entry = self._syncs.get(number)
        if entry is None:
            return
        entry[1].discard(worker.index)
        if not entry[1]:
            del self._syncs[number]
            entry[0].callback(None)

    # -- what the metrics and the token sweep ask -----------------------------------

    def sync(self) -> Deferred[None]:
        """Fires once every serving worker has sent its token uses and
        counts (or after SYNC_TIMEOUT)."""
        live = {w.index for w in self.workers.values() if w.alive and w.serving}
        if not live:
            return succeed(None)
        number, self._next_sync = self._next_sync, self._next_sync + 1
        d: Deferred[None] = Deferred()
        self._syncs[number] = (d, live)
        for worker in self.workers.values():
            if worker.index in live:
                worker.channel.send(wire.encode_number(wire.SYNC, number))
                worker.channel.flush()

        def late(_: Any) -> None:
            if self._syncs.pop(number, None) is not None:
                d.callback(None)

        self.reactor.callLater(SYNC_TIMEOUT, late, None)
        return d

    @property
    def connections(self) -> int:
        return sum(w.connections for w in self.workers.values() if w.alive)

    @property
    def calls_in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers.values() if w.alive)

    # -- forking and losing workers -----------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for index in range(1, self.count + 1):
            self._start(index)
        self._heartbeat = LoopingCall(self._check_alive)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(ACK_TIMEOUT, now=False)

    def _check_alive(self) -> None:
        """A worker that did not answer the last heartbeat (a SYNC) within
        ACK_TIMEOUT is hung: killed, as one that does not take a change."""
        for worker in list(self.workers.values()):
            if not (worker.alive and worker.serving):
                continue
            if worker.heartbeat_sent is not None:
                self.log.error("OTS API worker {index} (pid {pid}) did not answer within "
                               "{timeout:g} s; killing it", index=worker.index, pid=worker.pid,
                               timeout=ACK_TIMEOUT)
                self._kill(worker, signal.SIGKILL)
                continue
            number, self._next_sync = self._next_sync, self._next_sync + 1
            worker.heartbeat_sent = number
            worker.channel.send(wire.encode_number(wire.SYNC, number))

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        listening, context = self.listener.socket, self.listener.context
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        position = self.position
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker; serve() never returns
            serve(index, listening, theirs, context, self.shared, self.published,
                  self.factory.limits,
                  self.factory.max_frame_size, self.service_module,
                  {session.session_id: session for session in self.registry},
                  self.tokens.snapshot(), position, self.channels, self.keep)
        theirs.close()
        worker = WorkerProcess(index, pid, None, position,  # type: ignore[arg-type]
                               self.reactor.seconds())
        worker.channel = wire.Channel(self.reactor, self._handlers(worker),
                                      on_lost=lambda reason: self._channel_lost(worker))
        worker.calls = ForwardedCalls(self.factory, worker, self)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           Factory.forProtocol(lambda: worker.channel))
        ours.close()
        worker.pidfd = _PidfdReader(os.pidfd_open(pid), lambda: self._exited(worker))
        self.reactor.addReader(worker.pidfd)
        self.workers[index] = worker

    def _hung(self, worker: WorkerProcess) -> None:
        worker.ack_deadline = None
        if worker.alive and worker.acked < self.position:
            self.log.error("OTS API worker {index} (pid {pid}) did not take a state change "
                           "within {timeout:g} s; killing it", index=worker.index,
                           pid=worker.pid, timeout=ACK_TIMEOUT)
            self._kill(worker, signal.SIGKILL)

    def _kill(self, worker: WorkerProcess, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def _channel_lost(self, worker: WorkerProcess) -> None:
        # A worker without its channel cannot stay current: it must go.
        if worker.alive:
            self._gone(worker)
            self._kill(worker, signal.SIGKILL)

    def _exited(self, worker: WorkerProcess) -> None:
        if worker.kill_call is not None and worker.kill_call.active():
            worker.kill_call.cancel()
        worker.kill_call = None
        pidfd, worker.pidfd = worker.pidfd, None
        if pidfd is not None:
            self.reactor.removeReader(pidfd)
            os.close(pidfd.fd)
        try:
            _, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.WEXITSTATUS(status)}")
        self._gone(worker)
        if self._stopping:
            return
        self.log.error("OTS API worker {index} (pid {pid}) {how}; forking it again",
                       index=worker.index, pid=worker.pid, how=how)
        delay = self._restart_delay.get(worker.index, RESTART_DELAY)
        if self.reactor.seconds() - worker.started_at > RESTART_RESET:
            delay = RESTART_DELAY
        self._restart_delay[worker.index] = min(delay * 2, RESTART_DELAY_MAX)
        self._restarts[worker.index] = self.reactor.callLater(delay, self._start, worker.index)

    def _gone(self, worker: WorkerProcess) -> None:
        """The worker answers nothing more: forget its acknowledgements, its
        connections and its syncs, and serve here when no worker does."""
        if not worker.alive:
            return
        worker.alive = False
        worker.connections = worker.in_flight = 0
        if worker.ack_deadline is not None and worker.ack_deadline.active():
            worker.ack_deadline.cancel()
        worker.ack_deadline = None
        self.shared.absent(worker.index)
        if worker.channel.open:
            worker.channel.transport.loseConnection()
        for number in list(self._syncs):
            self._synced(worker, number)
        self._release()
        if not any(w.alive and w.serving for w in self.workers.values()):
            self.main_accepts(True)
        worker.gone.callback(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for worker in self.workers.values():
            if worker.pidfd is None:
                continue
            done: Deferred[None] = Deferred()
            on_exit = worker.pidfd.on_exit

            def exited(worker: WorkerProcess = worker, done: Deferred[None] = done,
                       on_exit: Callable[[], None] = on_exit) -> None:
                on_exit()
                if not done.called:
                    done.callback(None)

            worker.pidfd.on_exit = exited
            self._kill(worker, signal.SIGTERM)
            worker.kill_call = self.reactor.callLater(STOP_TIMEOUT, self._kill, worker,
                                                      signal.SIGKILL)
            waits.append(done)
        return DeferredList(waits).addCallback(lambda _: None)
