"""A RabbitMQ cluster on this machine, for failover runs (tests/test_broker_failover.py and
bench/bench_cluster.py).

Three (``size``) nodes of the machine's own RabbitMQ, each with a node name, AMQP and
distribution ports, data and log folders of its own, one Erlang cookie between them and an
epmd of their own on another port: the shared broker on 5672 (node ``rabbit@localhost``,
epmd 4369) is neither seen nor touched. ``/etc/rabbitmq``'s files are not read (they name
the shared node and its listener).

The first node boots alone; the others join it at boot (classic_config peer discovery).
Everything the cluster writes is under ``root``; :meth:`RabbitCluster.stop` ends every
process it started (by process group) and nothing else.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SBIN = Path("/usr/lib/rabbitmq/bin")
EPMD = Path("/usr/bin/epmd")
# RabbitMQ's own convention: distribution port = AMQP port + 20000.
DIST_OFFSET = 20_000
BOOT_TIMEOUT = 90.0


def rabbitmq_missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    for path in (SBIN / "rabbitmq-server", SBIN / "rabbitmqctl", EPMD):
        if not path.exists():
            return f"{path} is missing (RabbitMQ is installed by scripts/ensure-services.sh)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def free_base_port(size: int, start: int = 5791) -> int:
    """A base AMQP port with it, the next ``size - 1``, their distribution ports and an epmd
    port (base - 1400) all free: several runs on one machine do not collide."""
    for base in range(start, start + 200, size):
        ports = [base + i for i in range(size)]
        ports += [p + DIST_OFFSET for p in ports] + [base - 1400]
        if all(_port_free(port) for port in ports):
            return base
    raise RuntimeError(f"no free ports for a {size}-node cluster from {start}")


@dataclass(frozen=True)
class Node:
    index: int
    name: str  # rabbit-c1@localhost
    port: int
    folder: Path

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[0]

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}//"

    @property
    def pid(self) -> int | None:
        """The node's Erlang VM, from the pid file it writes at boot."""
        try:
            return int((self.folder / "pid").read_text().strip())
        except (OSError, ValueError):
            return None


class RabbitCluster:
    def __init__(
        self,
        root: Path,
        *,
        size: int = 3,
        base_port: int | None = None,
        net_ticktime: int | None = None,
    ) -> None:
        """``net_ticktime``: seconds; how soon the nodes give up on a silent peer (Erlang's
        default 60, noticed within 45-75 s)."""
        self.root = root
        self.size = size
        self.net_ticktime = net_ticktime
        base = base_port or free_base_port(size)
        self.epmd_port = base - 1400
        self.nodes = [
            Node(i, f"rabbit-c{i + 1}@localhost", base + i, root / f"c{i + 1}") for i in range(size)
        ]
        self._servers: dict[str, subprocess.Popen[bytes]] = {}
        self._epmd: subprocess.Popen[bytes] | None = None
        self.killed: set[str] = set()

    # -- the environment -------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root),  # the one .erlang.cookie, for the nodes and the CLI alike
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_CONFIG_FILE=str(node.folder / "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
                RABBITMQ_MNESIA_BASE=str(node.folder / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.folder / "log"),
                RABBITMQ_PID_FILE=str(node.folder / "pid"),
                RABBITMQ_FEATURE_FLAGS_FILE=str(node.folder / "feature_flags"),
                RABBITMQ_PLUGINS_EXPAND_DIR=str(node.folder / "plugins-expand"),
                RABBITMQ_DIST_PORT=str(node.port + DIST_OFFSET),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cookie = self.root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        # An empty env file stands in for /etc/rabbitmq/rabbitmq-env.conf (the shared node's).
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")  # no management port to collide
        seed = self.nodes[0].name
        for node in self.nodes:
            node.folder.mkdir(parents=True, exist_ok=True)
            lines = [
                f"listeners.tcp.1 = 127.0.0.1:{node.port}",
                # Three nodes: the side of a partition without a majority pauses.
                "cluster_partition_handling = pause_minority",
            ]
            if self.net_ticktime is not None:
                lines.append(f"net_ticktime = {self.net_ticktime}")
            if node.index > 0:
                lines += [
                    "cluster_formation.peer_discovery_backend = classic_config",
                    f"cluster_formation.classic_config.nodes.1 = {seed}",
                ]
            (node.folder / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    # -- starting and stopping -------------------------------------------------------------

    def start(self) -> None:
        problem = rabbitmq_missing()
        if problem:
            raise RuntimeError(problem)
        self._write_files()
        self._epmd = subprocess.Popen(
            [str(EPMD), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        first, *others = self.nodes
        self._boot([first])
        self._boot(others)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while len(self.running_nodes()) < self.size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form: {self.running_nodes()}")
            time.sleep(1)

    def _boot(self, nodes: list[Node]) -> None:
        for node in nodes:
            log = (node.folder / "server.out").open("ab")
            self._servers[node.name] = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                env=self._env(node),
                cwd=node.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        for node in nodes:
            while not _listening(node.port):
                server = self._servers[node.name]
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = (node.folder / "server.out").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{node.name} did not start:\n{tail}")
                time.sleep(0.2)

    def kill(self, node: Node) -> float:
        """SIGKILL the node's Erlang VM, as a crash or a lost machine would end it; the
        ``time.monotonic()`` of the kill."""
        pid = node.pid
        if pid is None:
            raise RuntimeError(f"{node.name} has no pid file")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.killed.add(node.name)
        with suppress(subprocess.TimeoutExpired):
            self._servers[node.name].wait(15)
        return killed_at

    def freeze(self, node: Node) -> float:
        """SIGSTOP the node's VM: its sockets stay open and nothing answers, as when its
        machine hangs or drops off the network (noticed by heartbeats and net_ticktime, not
        by a closed connection). ``stop`` kills it like the others."""
        pid = node.pid
        if pid is None:
            raise RuntimeError(f"{node.name} has no pid file")
        frozen_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        self.killed.add(node.name)
        return frozen_at

    def stop(self) -> None:
        """End every process the cluster started: its nodes (killed: the data is thrown
        away) and its epmd."""
        for server in self._servers.values():
            if server.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                server.wait(15)
        # The VMs run in the servers' process groups; one whose group leader went first
        # is ended by its own pid.
        for node in self.nodes:
            pid = node.pid
            if pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._epmd is not None and self._epmd.poll() is None:
            self._epmd.kill()
            self._epmd.wait(10)

    # -- asking the cluster ----------------------------------------------------------------

    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.name not in self.killed]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def ctl(self, *args: str, node: Node | None = None, tool: str = "rabbitmqctl") -> str:
        """A CLI command against ``node`` (default: the first one alive); its stdout."""
        target = node or self.alive()[0]
        run = subprocess.run(
            [str(SBIN / tool), "-q", "-n", target.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {run.stderr.strip() or run.stdout}")
        return run.stdout

    def running_nodes(self) -> list[str]:
        try:
            status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        except (RuntimeError, json.JSONDecodeError):
            return []
        running: list[str] = status.get("running_nodes", [])
        return running

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the default vhost: leader, members, messages, consumers."""
        fields = ("name", "type", "leader", "members", "online", "messages", "consumers")
        rows = json.loads(self.ctl("list_queues", *fields, "--formatter", "json"))
        return {row["name"]: row for row in rows}

    def leader(self, queue: str) -> str | None:
        row = self.queues().get(queue)
        return None if row is None else row.get("leader")

    def elected(self, queue: str, after: float) -> tuple[str, float] | None:
        """The node that became leader of ``queue`` first after the epoch time ``after``, and
        when: from the nodes' own logs (to the microsecond; asking the CLI takes seconds)."""
        from datetime import datetime

        mark = f"queue '{queue}' in vhost '/': candidate -> leader in term"
        found: list[tuple[float, str]] = []
        for node in self.alive():
            log = node.folder / "log" / f"{node.name}.log"
            with suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if mark in line:
                        at = datetime.fromisoformat(line.split(" [", 1)[0]).timestamp()
                        if at > after:
                            found.append((at, node.name))
        if not found:
            return None
        at, name = min(found)
        return name, at

    def url_list(self, nodes: list[Node] | None = None) -> str:
        """The ;-separated failover list BATCH_WORKER_BROKER_URL takes."""
        return ";".join(node.url() for node in (nodes or self.nodes))


@contextmanager
def rabbit_cluster(
    root: Path, *, size: int = 3, net_ticktime: int | None = None
) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(root, size=size, net_ticktime=net_ticktime)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- a failover run: two workers, jobs published throughout, the jobs queue's leader killed ---


@dataclass
class FailoverReport:
    """What a failover run saw: every figure bench/bench_cluster.py prints."""

    jobs: int  # published and confirmed by the broker
    publish_retries: int
    confirm_wait_s: float  # the longest a publish waited for its confirm
    killed: str
    frozen: bool
    killed_after_jobs: int
    new_leader: str | None
    # seconds after the kill, each as the nodes' or the workers' own logs tell it
    election_s: float | None  # a surviving node became the jobs queue's leader
    reconnect_s: dict[str, float]  # per worker connection ("w0 consumer"): back up
    accept_gap_s: float  # the longest pause between two jobs taken in (the events' times)
    accepted: int  # distinct jobs with a command.accepted event
    accepted_twice: int  # distinct command.accepted events beyond one per job
    rejected: int
    terminal: dict[str, int]  # distinct terminal events by status
    without_terminal: list[str]
    unfinished: dict[str, int]  # jobs without a terminal event, by the last status seen
    with_two_terminals: list[str]
    deliveries: int  # event deliveries read
    distinct_events: int
    dead_lettered: int
    left_in_jobs_queue: int
    left_in_outbox: int
    connections_lost: dict[str, int]  # per worker: broker connections lost
    connected_to: dict[str, list[str]]  # per worker: where its connections are at the end
    wall_s: float

    @property
    def lost(self) -> int:
        return len(self.without_terminal)


def _log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        with suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                lines.append(record)
    return lines


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def run_failover(
    cluster: RabbitCluster,
    *,
    database_url: str,
    simulator: Any,
    bucket: str,
    tmp: Path,
    jobs: int,
    rate: float,
    kill_after: float = 0.5,
    freeze: bool = False,
    workers: int = 2,
    settle_timeout: float = 120.0,
    say: Any = lambda text: None,
) -> FailoverReport:
    """Publish ``jobs`` job requests at ``rate`` a second through a node that stays up, kill
    the node leading the jobs queue once ``kill_after`` of them are out (or ``freeze`` it),
    and wait for every confirmed job to end. Workers get the whole cluster as BROKER_URL, in
    the same order."""
    import uuid
    from collections import Counter

    import pika
    import pika.exceptions
    import psycopg

    from tests.conftest import AmqpNames, pika_parameters
    from tests.e2e.conftest import Events, Stack, WorkerProcess
    from worker.broker import connection, declare_topology

    started = time.monotonic()
    names = AmqpNames(prefix=f"c{uuid.uuid4().hex[:8]}")
    stack = Stack(cluster.url_list(), database_url, names, simulator, bucket, tmp)
    # Declared through the first URL, so the queues' leaders are on the first node (a
    # quorum queue starts with its leader where it was declared), where the workers are.
    with connection(stack.settings(), purpose="bench") as conn:
        declare_topology(conn, stack.settings())
    leader = cluster.leader(names.jobs_queue)
    assert leader is not None, "the jobs queue was not declared"
    victim = cluster.node(leader)
    observer = [node for node in cluster.alive() if node != victim][-1]

    # The reader's own quorum queue, on a node that stays up: nothing read is lost either.
    reader_conn = pika.BlockingConnection(pika_parameters(observer.url()))
    channel = reader_conn.channel()
    reader_queue = f"{names.prefix}.reader"
    channel.queue_declare(reader_queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(reader_queue, names.events_exchange, routing_key="#")
    events = Events(reader_conn, reader_queue)
    channel.basic_consume(reader_queue, events._on_message, auto_ack=True)

    fleet = [
        WorkerProcess(stack.env(worker_name=f"w{i}", log_level="INFO"), tmp / f"worker-{i}.log")
        for i in range(workers)
    ]
    published: list[str] = []
    retries = 0
    killed_wall = confirm_wait = 0.0
    try:
        deadline = time.monotonic() + 60
        while not all("consuming from" in worker.log() for worker in fleet):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start consuming")
            events.pump(0.2)
        say(f"{workers} workers consuming; leader of {names.jobs_queue}: {leader}")

        producer = pika.BlockingConnection(pika_parameters(observer.url()))
        pub = producer.channel()
        pub.confirm_delivery()
        t0 = time.monotonic()
        kill_at_job = max(1, int(jobs * kill_after))
        for n in range(jobs):
            if n == kill_at_job:
                killed_wall = time.time()
                (cluster.freeze if freeze else cluster.kill)(victim)
                say(f"{'froze' if freeze else 'killed'} {victim.name} after {n} jobs")
            job = stack.payload("max-ndvi-geotiff.json", features=1)
            body = json.dumps(job).encode()
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(uuid.uuid4()),
            )
            while True:
                try:
                    sent = time.monotonic()
                    pub.basic_publish("", names.jobs_queue, body, props, mandatory=True)
                    confirm_wait = max(confirm_wait, time.monotonic() - sent)
                    break
                except (pika.exceptions.AMQPError, OSError):
                    # Not confirmed: the same message again, on a fresh connection.
                    retries += 1
                    with suppress(Exception):
                        producer.close()
                    time.sleep(0.5)
                    producer = pika.BlockingConnection(pika_parameters(observer.url()))
                    pub = producer.channel()
                    pub.confirm_delivery()
            published.append(job["job_id"])
            due = t0 + (n + 1) / rate
            while (left := due - time.monotonic()) > 0:
                events.pump(left)  # returns early when events came: read until due
        with suppress(Exception):
            producer.close()

        def done() -> bool:
            return all(events.terminal(job_id) is not None for job_id in published)

        deadline = time.monotonic() + settle_timeout
        while not done() and time.monotonic() < deadline:
            events.pump(0.5)
        events.pump(1.0)  # late duplicates
        queues = cluster.queues()
        connections = json.loads(
            cluster.ctl("list_connections", "name", "client_properties", "--formatter", "json")
        )
        logs = [worker.log() for worker in fleet]  # before stopping adds its own lines
    finally:
        for worker in fleet:
            worker.stop()
        with suppress(Exception):
            reader_conn.close()

    # -- figures -------------------------------------------------------------------------
    accepted = Counter(
        subject
        for subject, _ in {(e.get("subject"), e["id"]) for e in events.of_type("command.accepted")}
        if subject
    )
    terminal_ids: dict[str, set[str]] = {job_id: set() for job_id in published}
    terminal = Counter[str]()
    seen: set[str] = set()
    for event in events.received:
        status = event["data"].get("status")
        if event["type"] != "batchworker.job.status" or status not in ("DONE", "FAILED", "STOPPED"):
            continue
        terminal_ids.setdefault(event["subject"], set()).add(event["id"])
        if event["id"] not in seen:
            terminal[status] += 1
        seen.add(event["id"])
    # When the worker took each message in (the event's own time), not when it was read.
    accept_times = sorted(
        {_epoch(e["time"]) for e in events.of_type("command.accepted") if e.get("time")}
    )
    elected = cluster.elected(names.jobs_queue, after=killed_wall)
    gaps = [b - a for a, b in itertools.pairwise(accept_times)]

    reconnect: dict[str, float] = {}
    lost: dict[str, int] = {}
    for i, text in enumerate(logs):
        records = _log_lines(text)
        lost[f"w{i}"] = sum(1 for r in records if r.get("message", "").endswith(" down"))
        for part in ("consumer", "relay"):
            ups = [
                _epoch(r["time"])
                for r in records
                if r.get("message") == f"broker connection {part} up"
                and _epoch(r["time"]) > killed_wall
            ]
            if ups:
                reconnect[f"w{i} {part}"] = min(ups) - killed_wall
    where: dict[str, list[str]] = {}
    for row in connections:
        props = row.get("client_properties") or {}
        if isinstance(props, list):  # rabbitmqctl's JSON gives a table as [key, type, value]s
            props = {item[0]: item[-1] for item in props if isinstance(item, list)}
        name = str(props.get("connection_name", ""))
        if name.startswith("batch-worker "):
            _, worker_name, purpose = name.split(" ", 2)
            port = str(row.get("name", "")).rsplit(":", 1)[-1]
            node = next((n.short for n in cluster.nodes if str(n.port) == port), port)
            where.setdefault(worker_name, []).append(f"{purpose}@{node}")

    with psycopg.connect(database_url) as pg:
        row = pg.execute("SELECT count(*) FROM bw_outbox").fetchone()
        left_in_outbox = int(row[0]) if row else -1

    return FailoverReport(
        jobs=len(published),
        publish_retries=retries,
        confirm_wait_s=confirm_wait,
        killed=victim.name,
        frozen=freeze,
        killed_after_jobs=kill_at_job,
        new_leader=elected[0] if elected else None,
        election_s=(elected[1] - killed_wall) if elected else None,
        reconnect_s=reconnect,
        accept_gap_s=max(gaps, default=0.0),
        accepted=sum(1 for job_id in published if accepted[job_id]),
        accepted_twice=sum(count - 1 for count in accepted.values() if count > 1),
        rejected=len(events.of_type("command.rejected")),
        terminal=dict(terminal),
        without_terminal=[job_id for job_id in published if not terminal_ids[job_id]],
        unfinished=dict(
            Counter(
                (events.statuses(job_id) or ["none"])[-1]
                for job_id in published
                if not terminal_ids[job_id]
            )
        ),
        with_two_terminals=[job_id for job_id, ids in terminal_ids.items() if len(ids) > 1],
        deliveries=len(events.received),
        distinct_events=len({event["id"] for event in events.received}),
        dead_lettered=int(queues.get(names.dlq, {}).get("messages", -1)),
        left_in_jobs_queue=int(queues.get(names.jobs_queue, {}).get("messages", -1)),
        left_in_outbox=left_in_outbox,
        connections_lost=lost,
        connected_to=where,
        wall_s=time.monotonic() - started,
    )
