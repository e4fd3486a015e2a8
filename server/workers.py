"""Run N server processes sharing one port (SO_REUSEPORT), each reading Redis on its own."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from multiprocessing.process import BaseProcess

from tickwire.core.config import ServerConfig
from tickwire.core.errors import ConfigError

log = logging.getLogger("tickwire.server.workers")


def _worker(config: ServerConfig) -> None:
    import uvloop

    from tickwire.server.app import serve_forever

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    # Until serve_forever installs its reload handler, a forwarded SIGHUP must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    uvloop.run(serve_forever(config, reuse_port=True))


def run_workers(config: ServerConfig) -> int:
    """Start `config.workers` processes; restart any that dies; stop all on SIGTERM/SIGINT;
    pass SIGHUP (reload credentials and the TLS certificate) on to each."""
    if config.port == 0:
        raise ConfigError("--workers > 1 needs a fixed --port (processes share it)")
    ctx = mp.get_context("fork")
    stopping = False
    reloads = forwarded = 0

    def start() -> BaseProcess:
        p = ctx.Process(target=_worker, args=(config,), daemon=False)
        p.start()
        return p

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, frame: object) -> None:
        nonlocal reloads
        reloads += 1

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    procs = [start() for _ in range(config.workers)]
    log.info("started %d workers on port %d: %s", len(procs), config.port, [p.pid for p in procs])
    while not stopping:
        time.sleep(0.2)
        if forwarded != reloads:  # SIGHUP: every worker reloads its credentials
            forwarded = reloads
            for p in procs:
                if p.pid is not None and p.is_alive():
                    os.kill(p.pid, signal.SIGHUP)
        for i, p in enumerate(procs):
            if not p.is_alive() and not stopping:
                log.warning("worker %s exited with %s; restarting it", p.pid, p.exitcode)
                procs[i] = start()
    for p in procs:
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.shutdown_timeout_s + 1
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    return 0
