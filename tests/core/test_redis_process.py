"""The private redis-server the tests and benches start: a port taken before it binds it."""

from __future__ import annotations

import socket

import pytest

from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_process import (
    RedisProcess,
    RedisSentinelSet,
    TlsFiles,
    free_cluster_port,
    redis_cli,
)


def test_a_picked_port_taken_before_the_start_is_given_up_for_another() -> None:
    proc = RedisProcess()
    picked = proc.port
    # Someone else's socket gets there first, as an outgoing connection's ephemeral port can
    # (bound, not listening: a connection to it is refused).
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picked))
        with proc:
            assert proc.port != picked
            assert proc._ping()
            moved = proc.port
            proc.kill()
            proc.restart()
            assert proc.port == moved, "a restart keeps the port its clients know"
            assert proc._ping()


def test_a_port_taken_is_given_up_for_another_of_the_same_picker() -> None:
    # A cluster node's port needs its bus port (+10 000) free too: its picker picks again.
    picks: list[int] = []

    def pick() -> int:
        picks.append(free_cluster_port())
        return picks[-1]

    proc = RedisProcess(pick_port=pick)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picks[0]))
        with proc:
            assert len(picks) == 2 and proc.port == picks[1]
            assert proc._ping()


def test_a_tls_port_taken_before_the_start_is_given_up_for_another(tls_files: TlsFiles) -> None:
    proc = RedisProcess(tls=tls_files)
    picked = proc.tls_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picked))
        with proc:
            assert proc.tls_port != picked
            assert f"tls-port {proc.tls_port}" in " ".join(proc.extra_args).replace("--", "")
            assert redis_cli(proc.port, "CONFIG", "GET", "tls-port").split()[-1] == str(
                proc.tls_port
            )


def test_a_sentinel_whose_port_was_taken_comes_up_on_another() -> None:
    sentinels = RedisSentinelSet(replicas=1, sentinels=3)
    picked = sentinels.sentinel_ports[0]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picked))
        with sentinels:
            assert sentinels.sentinel_ports[0] != picked
            assert sentinels.primary_port() == sentinels.primary.port
            # Each of the three sees the other two, the moved one included.
            for port in sentinels.sentinel_ports:
                assert "num-other-sentinels" in redis_cli(
                    port, "SENTINEL", "master", sentinels.service
                )


def test_a_server_that_never_answers_its_start_is_not_left_running() -> None:
    # With a password, its PING answers NOAUTH: never the PONG the start waits for.
    proc = RedisProcess(extra_args=("--requirepass", "s3cret"))
    try:
        with pytest.raises(RedisUnavailable, match="did not answer"):
            proc.start(timeout=0.5)
        assert proc.proc is not None and proc.proc.poll() is not None
    finally:
        proc.stop()
