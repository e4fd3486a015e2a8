"""Process harness of the benches and tests: servers, feeds and their groups, ports, probes, /proc."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from tickwire.core.redis_process import free_port

#: The `tickwire` command of this interpreter's environment.
TICKWIRE = str(Path(sys.executable).parent / "tickwire")

#: Where a child's output goes: a file by name (appended to), an open file, or DEVNULL.
Log = Path | IO[bytes] | int

# -- process groups -----------------------------------------------------------------------------


def start_group(cmd: list[str], log: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own, output to `log`."""
    # cwd elsewhere: from the repo root, `python -m` would import the source folder, not the package.
    return subprocess.Popen(
        cmd, stdout=log, stderr=log, cwd=tempfile.gettempdir(), start_new_session=True
    )


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process's group, SIGKILL it if it has not exited within `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_feed(
    redis_url: str, *, rate: float, symbols: int, duration: float, seed: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """`tickwire feed sim` publishing `rate` events/s for `duration` seconds, errors to `log`."""
    cmd = [
        TICKWIRE, "feed", "sim", "--redis", redis_url, "--rate", str(rate),
        "--symbols", str(symbols), "--duration", str(duration), "--seed", str(seed),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=tempfile.gettempdir())


def self_signed_pem(path: Path) -> Path:
    """Write a throwaway self-signed certificate for localhost and 127.0.0.1, its key in the
    same file, to `path` (for a bench over TLS: the server serves it, the clients trust it as
    its own CA). With `cryptography`, which PyJWT's RS256 support brings already."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tickwire bench")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return path


# -- ports and probes ---------------------------------------------------------------------------


def port_open(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(
    port: int, path: str, timeout: float = 5.0, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """(status, body) of GET `path` on 127.0.0.1:`port` (HTTPS with `tls`, the context that
    trusts the server); OSError when nothing answers."""
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class HealthProbe:
    """GET /healthz every `every_s` from a thread: this process's own loop lag is not measured."""

    def __init__(self, port: int, every_s: float = 0.1) -> None:
        self.port = port
        self.every_s = every_s
        self.times_ms: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                status, _ = http_get(self.port, "/healthz", timeout=2)
            except OSError:
                self.errors += 1
                continue
            self.times_ms.append((time.perf_counter() - t0) * 1000)
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the server under test ----------------------------------------------------------------------


class ServerProcess:
    """`tickwire serve` (the server, or a supervisor and its workers) or the naive baseline, as a
    process group of its own on a free port."""

    def __init__(
        self,
        redis_url: str,
        *,
        workers: int = 1,
        baseline: bool = False,
        extra_args: Sequence[str] = (),
        tls_cert: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.workers = workers
        self.baseline = baseline
        self.extra_args = list(extra_args)
        #: Served over TLS with this certificate (PEM, its key in the same file), trusted as
        #: its own CA by what asks the server here (a self-signed one: `self_signed_pem`).
        self.tls_cert = tls_cert
        self.tls = ssl.create_default_context(cafile=tls_cert) if tls_cert else None
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        port = ["--port", str(self.port)]
        if self.baseline:
            return [
                sys.executable,
                "-m",
                "tickwire.bench.baseline",
                "--redis",
                self.redis_url,
                *port,
            ]
        cmd = [TICKWIRE, "serve", "--redis", self.redis_url, *port, "--workers", str(self.workers)]
        if self.tls_cert:
            cmd += ["--tls-cert", self.tls_cert]
        return cmd + self.extra_args

    def start(self, log: Log = subprocess.DEVNULL, timeout: float = 30.0) -> ServerProcess:
        """Start it, output to `log`, and return once it serves (every worker, for tickwire)."""
        if isinstance(log, Path):
            with open(log, "ab") as fh:
                self.proc = start_group(self.command(), fh)
        else:
            self.proc = start_group(self.command(), log)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                what = "the baseline" if self.baseline else "tickwire serve"
                where = f"; see {log}" if isinstance(log, Path) else ""
                raise RuntimeError(f"{what} exited at start ({self.proc.returncode}){where}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not serve on port {self.port} within {timeout} s")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        """It answers: /healthz 200 with every worker started (tickwire), the port open (baseline)."""
        if self.baseline:
            return port_open(self.port)
        try:
            status, _ = http_get(self.port, "/healthz", timeout=1.0, tls=self.tls)
        except OSError:
            return False
        return status == 200 and (self.workers == 1 or len(self.worker_pids()) >= self.workers)

    def worker_pids(self) -> list[int]:
        if self.proc is None or self.workers == 1:
            return []
        return children(self.proc.pid)

    def connections_by_worker(self) -> dict[int, int]:
        """Established connections on the server port, per worker pid (from /proc)."""
        inodes: dict[str, int] = {}
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        link = os.readlink(fd)
                        if link.startswith("socket:["):
                            inodes[link[8:-1]] = pid
        counts = dict.fromkeys(self.worker_pids(), 0)
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == self.port and cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED
                counts[inodes[cols[9]]] += 1
        return counts

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        return rss_mb([self.proc.pid, *children(self.proc.pid)])

    def metrics_text(self, timeout: float = 2.0) -> str:
        """The /metrics page ("" for the baseline, or when it does not answer)."""
        if self.baseline or self.proc is None:
            return ""
        try:
            return http_get(self.port, "/metrics", timeout, self.tls)[1].decode()
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """One figure of /metrics (`name` with or without the `tickwire_` prefix); 0 if absent."""
        _, body = http_get(self.port, "/metrics", tls=self.tls)
        for line in body.decode().splitlines():
            key, _, value = line.partition(" ")
            if key in (name, "tickwire_" + name):
                return float(value)
        return 0.0

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s)


# -- CPU and memory from /proc ------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (e.g. the workers of `tickwire serve --workers N`)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes and their direct children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for p in [pid, *children(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every core, every process) since boot."""
    # /proc/stat's first line: user nice system idle iowait irq softirq steal … in clock ticks.
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: Sequence[int]) -> float:
    """Resident memory of these processes, in MiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total / 1024
