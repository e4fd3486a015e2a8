"""History reads over a real Redis: requests that wait while a pipeline is out go together in the
next, and each caller gets its own replies, whatever the others do."""

from __future__ import annotations

import asyncio

import pytest

from tickwire.core.channels import Channel
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server import history as history_module
from tickwire.server.history import History

from .test_server import publish, publisher


def channel(i: int) -> Channel:
    return Channel.parse(f"trades:H{i:03d}")


async def test_concurrent_reads_each_get_their_own_replies_and_a_cancelled_one_harms_none(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    n = history_module.MAX_BATCH * 3 + 5  # several pipelines' worth
    async with publisher(redis_server) as pub:
        for i in range(n):
            if i % 3:  # a third stay without a stream
                await publish(pub, channel(i), 0, i % 7 + 1)
    history = History(redis_server.url)
    try:
        # All asked in one turn: they wait behind the first pipeline and go in the next ones.
        metas = [asyncio.create_task(history.metas([channel(i)])) for i in range(n)]
        ranges = [asyncio.create_task(history.range(channel(i), 0, 100)) for i in range(n)]
        metas[7].cancel()
        ranges[8].cancel()
        await asyncio.gather(*metas, *ranges, return_exceptions=True)
        for i in range(n):
            stored = i % 7 + 1 if i % 3 else 0
            if i != 7:
                meta = metas[i].result()[channel(i)]
                assert (meta[1] if meta is not None else 0) == stored, (i, meta)
            if i != 8:
                seqs = [e for b in ranges[i].result() for e in range(b.first_seq, b.last_seq + 1)]
                assert seqs == list(range(1, stored + 1)), (i, seqs)
        assert metas[7].cancelled() and ranges[8].cancelled()
    finally:
        history.close()


async def test_every_waiting_read_fails_when_redis_is_gone_and_reads_resume_after(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    history = History(redis_server.url)
    try:
        assert await history.metas([channel(1)]) == {channel(1): None}
        redis_server.kill()
        reads = [asyncio.create_task(history.metas([channel(i)])) for i in range(20)]
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        redis_server.start()
        assert await history.metas([channel(2)]) == {channel(2): None}
    finally:
        history.close()


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Smaller pipelines, so that the tests above span several."""
    monkeypatch.setattr(history_module, "MAX_BATCH", 16)
