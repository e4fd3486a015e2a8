"""A Redis Cluster over TLS (`rediss://`): the slot map names the nodes' TLS ports, and a feed
and a server reach every master there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster, TlsFiles, redis_cli
from tickwire.core.redis_target import open_redis

from .conftest import check_feed_and_server, symbols_on_each_master

pytestmark = pytest.mark.uvloop_only


@pytest.fixture(scope="module")
def tls_cluster(tls_files: TlsFiles) -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0, tls=tls_files) as c:
        yield c


async def test_a_feed_and_a_server_reach_every_master_over_tls(
    tls_cluster: RedisCluster, tls_files: TlsFiles
) -> None:
    url = tls_cluster.tls_url(f"ssl_ca_certs={tls_files.ca}")
    conn = await open_redis(url)
    assert isinstance(conn, ClusterConnection)
    tls_ports = {n.tls_port for n in tls_cluster.nodes}
    assert {port for _, port in conn.slots.masters} == tls_ports
    symbols = symbols_on_each_master(conn, 2)
    conn.close()

    def on_tls_ports_only() -> None:
        for node in tls_cluster.nodes:
            # The feed's and the server's connections, on the node's TLS port only.
            clients = [
                line
                for line in redis_cli(node.port, "CLIENT", "LIST").splitlines()
                if "cmd=client|list" not in line
            ]
            assert clients, f"nothing connected to {node.port}"
            assert all(f"laddr=127.0.0.1:{node.tls_port} " in c for c in clients), clients

    await check_feed_and_server(url, symbols, while_connected=on_tls_ports_only)
