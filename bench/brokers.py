"""Private broker processes (nats-server with JetStream, mosquitto, RabbitMQ) on free ports."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from tickwire.core.errors import ConfigError, TickwireError
from tickwire.core.redis_process import TlsFiles, free_port

#: Broker → (program, Debian package).
PROGRAMS = {
    "nats": ("nats-server", "nats-server"),
    "mqtt": ("mosquitto", "mosquitto"),
    "rabbitmq": ("rabbitmq-server", "rabbitmq-server"),
}
#: Debian's wrapper (/usr/sbin/rabbitmq-server) switches to the `rabbitmq` user, which cannot
#: write a private data folder; this one runs as the caller.
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def ensure_broker(broker: str, install: bool = True) -> str:
    """Path of the broker's server program; installs the Debian package when running as root."""
    program, package = PROGRAMS[broker]
    if broker == "rabbitmq" and os.path.exists(RABBITMQ_SERVER):
        return RABBITMQ_SERVER
    path = shutil.which(program)
    if path:
        return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False)
        return ensure_broker(broker, install=False)
    raise ConfigError(
        f"{program} is not installed: run `sudo apt-get install {package}` (Debian/Ubuntu), "
        f"or `make test` as root, which installs nats-server, mosquitto and rabbitmq-server"
    )


class BrokerProcess:
    """One private broker: start, kill (as a crash), stop, restart on the same port and data."""

    broker = ""

    def __init__(self, port: int | None = None, *, tls: TlsFiles | None = None) -> None:
        self.port = port or free_port()
        #: With `tls`: a TLS listener on `tls_port` (NATS: the one port requires TLS).
        self.tls = tls
        self.tls_port = free_port() if tls is not None else 0
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"tickwire-{self.broker}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "broker.log"

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def tls_url(self) -> str:
        """The URL of the TLS listener, by the name its certificate carries."""
        raise NotImplementedError

    def command(self, exe: str) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> Self:
        args, env = self.command(ensure_broker(self.broker))
        with open(self.log_path, "ab") as log:
            # Its own session, so that stopping it ends the children it starts (Erlang's).
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TickwireError(
                    f"{self.broker} exited at start (port {self.port}): "
                    f"{self.log_path.read_text(errors='replace')[-800:]}"
                )
            if self.ready():
                return self
            time.sleep(0.02)
        self.kill()
        raise TickwireError(f"{self.broker} on port {self.port} not ready in {timeout} s")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.terminate()
        self.start()

    def stop(self) -> None:
        self.terminate()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsProcess(BrokerProcess):
    broker = "nats"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"tls://localhost:{self.port}"

    def command(self, exe: str) -> tuple[list[str], dict[str, str]]:
        store = self.data_dir / "js"
        args = [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]
        if self.tls is not None:
            # (Its INFO still comes first in plain text: `ready` reads it as without TLS.)
            args += ["--tls", "--tlscert", str(self.tls.cert), "--tlskey", str(self.tls.key)]
        return args, {}

    def ready(self) -> bool:
        # The client port answers with INFO once the server (and JetStream) is up.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False


class MosquittoProcess(BrokerProcess):
    broker = "mqtt"

    @property
    def broker_log(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://localhost:{self.tls_port}"

    def command(self, exe: str) -> tuple[list[str], dict[str, str]]:
        conf = self.data_dir / "mosquitto.conf"
        # Persistence, so that a restart keeps the bridge's session and its queued messages; an
        # in-flight window and queue big enough for the bench, and no message-count cap.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Started as root, mosquitto would switch to its own user, which cannot write
            # the persistence and log files into this private folder.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data_dir}/\n"
            "max_inflight_messages 1000\n"
            "max_queued_messages 1000000\n"
            # Its default leaves Nagle on: small PUBLISH/PUBACK packets wait for each other.
            "set_tcp_nodelay true\n"
            f"log_dest file {self.data_dir}/mosquitto.log\n"
            # Subscriptions too: a test waits for a bridge's before it publishes.
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "log_type subscribe\n"
        )
        if self.tls is not None:
            with conf.open("a") as fh:
                fh.write(
                    f"listener {self.tls_port} 127.0.0.1\n"
                    f"cafile {self.tls.ca}\ncertfile {self.tls.cert}\nkeyfile {self.tls.key}\n"
                )
        return [exe, "-c", str(conf)], {}


class RabbitProcess(BrokerProcess):
    """A RabbitMQ node of its own: node name, ports, config, data and Erlang cookie (HOME)."""

    broker = "rabbitmq"

    def __init__(self, port: int | None = None, *, tls: TlsFiles | None = None) -> None:
        super().__init__(port, tls=tls)
        self.dist_port = free_port()
        self.node = f"tickwire-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    def command(self, exe: str) -> tuple[list[str], dict[str, str]]:
        d = self.data_dir
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(exist_ok=True)
        (d / "enabled_plugins").write_text("[].\n")
        conf = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        if self.tls is not None:
            conf += (
                f"listeners.ssl.local = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.tls.ca}\n"
                f"ssl_options.certfile = {self.tls.cert}\n"
                f"ssl_options.keyfile = {self.tls.key}\n"
                "ssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        (d / "rabbitmq.conf").write_text(conf)
        (d / "rabbitmq-env.conf").write_text("")
        env = {
            # Never the machine's own settings (/etc/rabbitmq), node or cookie.
            "HOME": str(d / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
        }
        return [exe], env


BROKER_PROCESSES: dict[str, type[BrokerProcess]] = {
    "nats": NatsProcess,
    "mqtt": MosquittoProcess,
    "rabbitmq": RabbitProcess,
}
