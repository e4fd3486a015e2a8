"""A private `redis-server` on a free port with its data in a temporary folder (demo, bench, tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from tickwire.core.errors import ConfigError, RedisUnavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port whose cluster bus port (+10 000) is free too (so: below 55 536)."""
    for _ in range(1000):
        port = free_port(host)
        if port < 55536:
            try:
                with socket.socket() as s:
                    s.bind((host, port + 10000))
            except OSError:
                continue
            return port
    raise RedisUnavailable("no free port pair for a cluster node")


def ensure_redis_server(install: bool = True) -> str:
    """Path of redis-server; installs the Debian package when allowed and running as root."""
    path = shutil.which("redis-server")
    if path:
        return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False)
        path = shutil.which("redis-server")
        if path:
            return path
    raise ConfigError(
        "redis-server is not installed. Install it with `sudo apt-get install redis-server` "
        "(Debian/Ubuntu) or `brew install redis` (macOS), or set REDIS_URL to a running Redis."
    )


class PortTaken(RedisUnavailable):
    """The port picked for a private server was taken before it could bind it."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a redis-server's TLS port: the CA it trusts for client certificates, and
    its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def settings(self, port: int) -> list[tuple[str, str]]:
        """redis-server's TLS settings for a TLS port on `port`."""
        return [
            ("tls-port", str(port)),
            ("tls-ca-cert-file", str(self.ca)),
            ("tls-cert-file", str(self.cert)),
            ("tls-key-file", str(self.key)),
            # Client certificates taken if given, not required (a test may require them).
            ("tls-auth-clients", "optional"),
        ]

    def args(self, port: int) -> tuple[str, ...]:
        return tuple(arg for name, value in self.settings(port) for arg in (f"--{name}", value))


class RedisProcess:
    """Starts, kills, pauses and restarts one private redis-server (with `tls`, a TLS port
    too, `tls_port`, beside the plain one)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        data_dir: str | None = None,
        extra_args: tuple[str, ...] = (),
        pick_port: Callable[[], int] = free_port,
        tls: TlsFiles | None = None,
    ) -> None:
        self.appendfsync = appendfsync
        # (Picked as the plain one: a cluster's bus port is 10 000 above its TLS port then.)
        self.tls_port = pick_port() if tls is not None else 0
        self.extra_args = extra_args + (tls.args(self.tls_port) if tls is not None else ())
        self._plain_args, self._tls = extra_args, tls
        self._pick_port = pick_port
        self.port = port or pick_port()
        #: A port picked here may be taken by someone else's socket (an outgoing connection's
        #: ephemeral port) before redis-server binds it: then the first start picks another.
        self._may_move = port is None
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="tickwire-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        #: Stopped with SIGSTOP (`pause`): running, answering nothing.
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def tls_url(self, host: str = "localhost", query: str = "") -> str:
        return f"rediss://{host}:{self.tls_port}/0{'?' if query else ''}{query}"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        for _ in range(5):
            try:
                return self._start(timeout)
            except PortTaken:
                # Redis says only that one of its ports was taken: pick each again (a cluster's
                # TLS port too, with its bus port above it).
                self.port = self._pick_port()
                if self._tls is not None:
                    self.tls_port = self._pick_port()
                    self.extra_args = self._plain_args + self._tls.args(self.tls_port)
        return self._start(timeout)  # a sixth time taken: PortTaken, a RedisUnavailable

    def _start(self, timeout: float) -> RedisProcess:
        exe = ensure_redis_server()
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                if self._may_move and "Address already in use" in tail:
                    log.unlink()
                    raise PortTaken(f"port {self.port} was taken before redis-server bound it")
                raise RedisUnavailable(f"redis-server exited at start (port {self.port}): {tail}")
            if self._ping():
                self._may_move = False  # restarts keep the port clients know
                return self
            time.sleep(0.02)
        # Not left running behind the error (a `with` block's exit never runs for it).
        self.kill()
        raise RedisUnavailable(f"redis-server on port {self.port} did not answer in {timeout} s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would; data not yet in the AOF is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def wipe(self) -> None:
        """Forget all data on disk (a restart after this is a restart without persistence)."""
        for p in self.data_dir.glob("*"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.name != "redis.log":
                p.unlink()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_cli(port: int, *args: str, timeout: float = 30.0, password: str | None = None) -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        raise ConfigError("redis-cli is not installed (it comes with redis-server: redis-tools)")
    auth = ("--no-auth-warning", "-a", password) if password is not None else ()
    done = subprocess.run(
        [exe, "-p", str(port), *auth, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RedisUnavailable(f"redis-cli {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def pending_to_replicas(port: int) -> int:
    """Bytes the Redis on `port` holds for its replicas that the kernel has not taken yet: lost
    if it dies now."""
    total = 0
    for line in redis_cli(port, "CLIENT", "LIST", "TYPE", "replica").splitlines():
        for field in line.split():
            if field.startswith("omem="):
                total += int(field[5:])
    return total


def _info_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


class RedisCluster:
    """A private Redis Cluster on loopback: `masters` masters with `replicas` replicas each.

    Nodes time out after `node_timeout_ms`, so a killed master's replica is promoted a few
    node timeouts later (short here: a test should not wait 15 s, Redis's default). With
    `full_coverage` off (`cluster-require-full-coverage no`), the masters up keep serving their
    slots while another's are not served; on (Redis's default), every master answers
    CLUSTERDOWN from the moment a master is marked failed until its replica is promoted."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        *,
        full_coverage: bool = True,
        tls: TlsFiles | None = None,
    ) -> None:
        # Over TLS the cluster bus and replication are too, so that the slot map a TLS client
        # is given names the nodes' TLS ports (Redis names the port of the client's kind).
        tls_args = ("--tls-cluster", "yes", "--tls-replication", "yes") if tls is not None else ()
        self.nodes = [
            RedisProcess(
                pick_port=free_cluster_port,
                tls=tls,
                extra_args=(
                    *tls_args,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # Replicas sync at once (Redis waits 5 s for more replicas by default).
                    "--repl-diskless-sync-delay",
                    "0",
                    # A replica stopped for a while by a test may still be promoted.
                    "--cluster-replica-validity-factor",
                    "0",
                    # A test stops a replica on purpose; its master must not drop it for that.
                    "--repl-timeout",
                    "60",
                    "--cluster-require-full-coverage",
                    "yes" if full_coverage else "no",
                ),
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def tls_url(self, query: str = "") -> str:
        return self.nodes[0].tls_url("127.0.0.1", query)

    @property
    def seeds_url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + "/0"

    def start(self, timeout: float = 60.0) -> RedisCluster:
        for n in self.nodes:
            n.start()
        redis_cli(
            self.nodes[0].port,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
            timeout=timeout,
        )
        self.wait_ok(timeout)
        return self

    def alive(self) -> list[RedisProcess]:
        """The nodes running and not paused (a paused one would not answer `redis-cli`)."""
        return [
            n for n in self.nodes if n.proc is not None and n.proc.poll() is None and not n.paused
        ]

    def _owners_alive(self, port: int) -> bool:
        """Whether every master that owns slots, as the node on `port` sees it, is alive."""
        alive = {n.port for n in self.alive()}
        for line in redis_cli(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2]:
                owner = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                if owner not in alive or "fail" in fields[2]:
                    return False
        return True

    def _replicas_in_sync(self) -> bool:
        """Every live replica of a live master has its link up and no sync under way."""
        alive = {n.port for n in self.alive()}
        for n in self.alive():
            info = redis_cli(n.port, "INFO", "replication")
            if _info_field(info, "role") != "slave":
                continue
            if int(_info_field(info, "master_port") or 0) not in alive:
                continue
            if _info_field(info, "master_link_status") != "up":
                return False
            if _info_field(info, "master_sync_in_progress") != "0":
                return False
        return True

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok, agrees on one slot map, and sees every
        slot served by a live master (after a kill: once the replica was promoted)."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while True:
            try:
                states = [
                    _info_field(redis_cli(n.port, "CLUSTER", "INFO"), "cluster_state")
                    for n in self.alive()
                ]
                maps = {redis_cli(n.port, "CLUSTER", "SLOTS") for n in self.alive()}
                owners_alive = all(self._owners_alive(n.port) for n in self.alive())
                if (
                    all(s == "ok" for s in states)
                    and len(maps) == 1
                    and owners_alive
                    and self._replicas_in_sync()
                ):
                    return
            except RedisUnavailable:
                pass
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"cluster not ok within {timeout} s: {states}")
            time.sleep(0.1)

    def role_of(self, node: RedisProcess) -> str:
        return redis_cli(node.port, "ROLE").split()[0]

    def masters(self) -> list[RedisProcess]:
        return [n for n in self.alive() if self.role_of(n) == "master"]

    def replica_of(self, master: RedisProcess) -> RedisProcess:
        for n in self.alive():
            info = redis_cli(n.port, "INFO", "replication")
            if _info_field(info, "role") == "slave" and _info_field(info, "master_port") == str(
                master.port
            ):
                return n
        raise RedisUnavailable(f"no replica of {master.port}")

    def migrate_slot(self, slot: int, to: RedisProcess, keys_per_step: int = 1) -> None:
        """Move `slot` to the master `to`, as `redis-cli --cluster reshard` does for each slot:
        IMPORTING/MIGRATING, MIGRATE the keys a few at a time (clients meet ASK and TRYAGAIN
        meanwhile), then SETSLOT NODE on every master."""
        source = next(
            n
            for n in self.masters()
            if int(redis_cli(n.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 0
        )
        src_id = redis_cli(source.port, "CLUSTER", "MYID").strip()
        dst_id = redis_cli(to.port, "CLUSTER", "MYID").strip()
        redis_cli(to.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        redis_cli(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        while True:
            keys = redis_cli(
                source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), str(keys_per_step)
            ).split()
            if not keys:
                break
            redis_cli(
                source.port, "MIGRATE", "127.0.0.1", str(to.port), "", "0", "5000", "KEYS", *keys
            )
        for n in [to, source, *(m for m in self.masters() if m not in (to, source))]:
            redis_cli(n.port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)

    def node_at(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisSentinelSet:
    """A primary, its replicas and Sentinels watching them under `service`, on loopback. With
    `password`, the Sentinels require it (`requirepass`: they use it with each other too);
    `sentinel_conf` adds lines to each Sentinel's configuration (an ACL `user`, say). With
    `tls`, every part has a TLS port besides its plain one (kept for redis-cli here), and
    replication, the Sentinels' links and the addresses they give are TLS ones."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        service: str = "tw",
        down_after_ms: int = 1000,
        password: str | None = None,
        sentinel_conf: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        self.service = service
        self.password = password
        self.sentinel_conf = sentinel_conf
        self.tls = tls
        args = ("--repl-timeout", "60", *(("--tls-replication", "yes") if tls else ()))
        self.primary = RedisProcess(extra_args=args, tls=tls)
        #: Told whom to replicate at start, once the primary's port is settled.
        self.replicas = [RedisProcess(extra_args=args, tls=tls) for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_tls_ports = [free_port() if tls else 0 for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self._dir = Path(tempfile.mkdtemp(prefix="tickwire-sentinel-"))
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        ports = self.sentinel_tls_ports if self.tls else self.sentinel_ports
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        options = [("sentinel_password", self.password)] if self.password is not None else []
        if self.tls is not None:
            options.append(("ssl_ca_certs", str(self.tls.ca)))
        query = f"?{urlencode(options)}" if options else ""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.service}/0{query}"

    def _primary_port(self, node: RedisProcess) -> int:
        """The port the Sentinels and replicas know `node` by."""
        return node.tls_port if self.tls else node.port

    @property
    def data_nodes(self) -> list[RedisProcess]:
        return [self.primary, *self.replicas]

    def start(self, timeout: float = 30.0) -> RedisSentinelSet:
        exe = ensure_redis_server()
        self.primary.start()
        for r in self.replicas:
            r.extra_args += ("--replicaof", "127.0.0.1", str(self._primary_port(self.primary)))
            r.start()
        self.sentinels = [self._sentinel(exe, port) for port in self.sentinel_ports]
        deadline = time.monotonic() + timeout
        moves = 0
        while True:
            for i, proc in enumerate(self.sentinels):
                # Its port taken before it could bind it: another port (Sentinels find each
                # other through the primary, whatever their ports).
                if proc.poll() is not None and moves < 10:
                    moves += 1
                    self.sentinel_ports[i] = free_port()
                    self.sentinels[i] = self._sentinel(exe, self.sentinel_ports[i])
            try:
                ready = all(
                    "num-other-sentinels" in self._ask(p, "SENTINEL", "master", self.service)
                    and _info_field(
                        redis_cli(self.primary.port, "INFO", "replication"), "connected_slaves"
                    )
                    == str(len(self.replicas))
                    for p in self.sentinel_ports
                )
                if ready:
                    return self
            except RedisUnavailable:
                pass
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"Sentinel set did not come up: {self._state()}")
            time.sleep(0.1)

    def _state(self) -> str:
        """What each part answers, and the end of each Sentinel's log: why it is not up."""
        parts = []
        for port, proc in [
            (self.primary.port, None),
            *zip(self.sentinel_ports, self.sentinels, strict=True),
        ]:
            command = ("INFO", "replication") if proc is None else ("SENTINEL", "master")
            try:
                args = command if proc is None else (*command, self.service)
                answer = " ".join(self._ask(port, *args).split()[:12])
            except RedisUnavailable as exc:
                answer = f"no answer ({exc})"
            log = self._dir / f"sentinel-{port}.log"
            tail = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
            exited = proc is not None and proc.poll() is not None
            parts.append(f":{port}{' (exited)' if exited else ''} {answer} {tail}")
        return "; ".join(parts)

    def _sentinel(self, exe: str, port: int) -> subprocess.Popen[bytes]:
        conf = self._dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
            f"logfile sentinel-{port}.log\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self._primary_port(self.primary)} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 10000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
            + (f"requirepass {self.password}\n" if self.password is not None else "")
            + "".join(f"{line}\n" for line in self.sentinel_conf + self._tls_conf(port))
        )
        return subprocess.Popen(
            [exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _tls_conf(self, port: int) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        tls_port = self.sentinel_tls_ports[self.sentinel_ports.index(port)]
        settings = [*self.tls.settings(tls_port), ("tls-replication", "yes")]
        return tuple(f"{name} {value}" for name, value in settings)

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers says."""
        for p in self.sentinel_ports:
            try:
                out = self._ask(p, "SENTINEL", "get-master-addr-by-name", self.service).split()
            except RedisUnavailable:
                continue
            if len(out) == 2:
                return int(out[1])
        raise RedisUnavailable("no Sentinel answers")

    def pause_sentinel(self, i: int) -> None:
        """Stop Sentinel `i` (SIGSTOP): it still takes connections, and answers nothing."""
        self.sentinels[i].send_signal(signal.SIGSTOP)

    def resume_sentinel(self, i: int) -> None:
        self.sentinels[i].send_signal(signal.SIGCONT)

    def _ask(self, port: int, *args: str) -> str:
        """redis-cli to a Sentinel, or to a data node (which has no password here)."""
        sentinel = port in self.sentinel_ports
        return redis_cli(port, *args, password=self.password if sentinel else None)

    def stop(self) -> None:
        for s in self.sentinels:
            s.kill()
            s.wait()
        for n in self.data_nodes:
            n.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisSentinelSet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
