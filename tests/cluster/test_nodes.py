"""Several `tickwire serve` nodes on one Redis Cluster behind a TCP load balancer: a client whose
node is killed (`kill -9`) resumes on another with no hole and no duplicate."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.clients.test_integration import Collector, TcpProxy, fast_backoff
from tickwire.bench.harness import ServerProcess
from tickwire.clients import connect
from tickwire.core.channels import Channel
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster
from tickwire.feeds.publisher import Publisher

from .conftest import publisher_config, symbols_on_each_master, trade, until

pytestmark = pytest.mark.uvloop_only


class Balancer:
    """A TCP load balancer: each connection goes to the next backend that accepts it (piped as
    `TcpProxy` pipes)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = 0
        #: Backend port of each connection, in order.
        self.routed: list[int] = []
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in self.ports:
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.routed.append(port)
            pumps = [
                asyncio.create_task(TcpProxy._pump(reader, up_writer)),
                asyncio.create_task(TcpProxy._pump(up_reader, writer)),
            ]
            self._tasks.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in pumps:
                    t.cancel()
                    self._tasks.discard(t)
                writer.transport.abort()
                up_writer.transport.abort()
            return
        writer.transport.abort()


async def test_a_client_whose_node_is_killed_resumes_on_another_node_exactly(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    channels = [Channel("trades", s) for s in symbols]
    nodes = [ServerProcess(cluster.seeds_url).start(), ServerProcess(cluster.seeds_url).start()]
    try:
        async with (
            Balancer([n.port for n in nodes]) as lb,
            Publisher(publisher_config(cluster.url)) as pub,
            connect(lb.url, **fast_backoff()) as feed,
        ):
            got = Collector(feed)
            await feed.subscribe(*(c.name for c in channels))
            sent = 0
            stop = asyncio.Event()

            async def flow() -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    await pub.publish({c: [trade(c.symbol, sent)] for c in channels})
                    await asyncio.sleep(0.003)

            flowing = asyncio.create_task(flow())
            try:
                await got.wait(lambda: all(got.last(c) >= 30 for c in channels))
                serving = next(n for n in nodes if n.port == lb.routed[-1])
                os.killpg(serving.pid, signal.SIGKILL)
                killed_at = sent
                await until(lambda: len(lb.routed) >= 2, "the reconnect through the balancer")
                await until(lambda: sent >= killed_at + 100, "events after the kill")
            finally:
                stop.set()
                await flowing
            await pub.flush()
            await got.wait(lambda: all(got.last(c) == sent for c in channels), 30)
            await got.stop()
        assert lb.routed[-1] != serving.port
        for c in channels:
            assert got.only_seqs(c) == list(range(1, sent + 1)), c
        assert got.gaps == [] and got.resets == []
    finally:
        for n in nodes:
            n.stop()
