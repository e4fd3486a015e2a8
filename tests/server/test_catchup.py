"""Catch-up (snapshot and resume) against a real server: unsubscribe ends it, bounds hold."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time

import jwt
import orjson
import pytest

from tests.conftest import eventually
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.commands import NodeDown
from tickwire.core.config import AuthConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import StreamPosition
from tickwire.server.app import TickwireServer
from tickwire.server.batch import Batch
from tickwire.server.catchup import CatchUp
from tickwire.server.history import History
from tickwire.server.hub import Subscriber
from tickwire.server.outbox import Outbox
from tickwire.server.stored import Meta

from .conftest import recorder, server_config
from .test_registry import calls
from .test_server import Q, T, publish, publisher

ZZZ = Channel.parse("quotes:ZZZ")
SECRET_ENV = "TICKWIRE_TEST_CATCHUP_SECRET"
SECRET = "a-test-secret-of-at-least-32-bytes!!"


async def test_unsubscribe_of_a_channel_with_no_stream_ends_its_catch_up(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """The reproduction of the issue: in one write, a snapshot subscribe of a concrete channel
    with no stream and a wildcard, then the unsubscribe of the concrete one."""
    async with publisher(redis_server) as pub, recorder(server.url) as c:
        await publish(pub, T, 0, 3)
        await eventually(lambda: T in server.hub.known, "the registry poll to find T")
        await c.ws.send(
            orjson.dumps(
                {
                    "op": "subscribe",
                    "id": 1,
                    "channels": [ZZZ.name, "trades:*"],
                    "snapshot": True,
                }
            ).decode()
        )
        await c.ws.send(orjson.dumps({"op": "unsubscribe", "id": 2, "channels": [ZZZ.name]}))
        await c.wait_for(lambda m: m.get("type") == "unsubscribed")
        # The wildcard goes live as if the dropped channel had never been asked for.
        await c.wait_until(lambda: c.last_seq(T.name) == 3)
        await publish(pub, T, 3, 2)
        await c.wait_until(lambda: c.last_seq(T.name) == 5)
        before = await calls(redis)
        await publish(pub, ZZZ, 0, 4)  # no event of it may reach the client any more
        await publish(pub, T, 5, 2)
        await c.wait_until(lambda: c.last_seq(T.name) == 7)
        after = await calls(redis)
        assert after.get("xrange", 0) == before.get("xrange", 0)
        assert c.events(ZZZ.name) == []
        assert [e["seq"] for e in c.events(T.name)] == list(range(3, 8))  # snapshot, then live
        assert c.checker.ok


async def test_unsubscribe_racing_a_long_resume_stops_it_and_the_rest_flows(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with publisher(redis_server) as pub, recorder(server.url) as c:
        await publish(pub, T, 0, 100_000)
        epoch = pub.positions[T][0]
        await publish(pub, Q, 0, 1)
        c.checker.expect_from(T.name, epoch, 0)
        await c.request(
            "subscribe", channels=[T.name, Q.name], resume={T.name: {"epoch": epoch, "seq": 0}}
        )
        await c.wait_until(lambda: c.last_seq(T.name) > 0)
        ack = await c.request("unsubscribe", channels=[T.name])
        at_ack = c.messages.index(ack)
        seen = len(c.events(T.name))
        assert seen < 100_000  # the resume was cut short, not finished
        await publish(pub, Q, 1, 3)
        await c.wait_until(lambda: c.last_seq(Q.name) == 4)
        before = await calls(redis)
        await publish(pub, T, 100_000, 5)
        await publish(pub, Q, 4, 1)
        await c.wait_until(lambda: c.last_seq(Q.name) == 5)
        assert (await calls(redis)).get("xrange", 0) == before.get("xrange", 0)
        late = [m for m in c.messages[at_ack:] if m.get("ch") == T.name]
        assert late == []
        assert [e["seq"] for e in c.events(Q.name)] == [2, 3, 4, 5]


async def test_narrower_token_after_unsubscribe_while_a_resume_runs_gets_nothing_outside_it(
    redis_server: RedisProcess, redis: RedisConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    cfg = dataclasses.replace(
        server_config(redis_server), auth=AuthConfig(jwt_secret_env=SECRET_ENV)
    )

    def token(channels: list[str]) -> str:
        claims = {"sub": "carol", "exp": time.time() + 300, "channels": channels}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with publisher(redis_server) as pub, TickwireServer(cfg) as srv:
        await publish(pub, T, 0, 50_000)
        epoch = pub.positions[T][0]
        async with recorder(srv.url) as c:
            reply = await c.request("auth", token=token([T.name, Q.name]))
            assert reply["type"] == "authenticated"
            await c.request(
                "subscribe",
                channels=[T.name, Q.name],
                resume={T.name: {"epoch": epoch, "seq": 0}},
            )
            await c.wait_until(lambda: c.last_seq(T.name) > 0)
            await c.request("unsubscribe", channels=[T.name])
            reply = await c.request("auth", token=token([Q.name]))
            assert reply["type"] == "authenticated", reply
            at_refresh = c.messages.index(reply)
            await publish(pub, T, 50_000, 3)
            await publish(pub, Q, 0, 2)
            await c.wait_until(lambda: c.last_seq(Q.name) == 2)
            assert [m for m in c.messages[at_refresh:] if m.get("ch") == T.name] == []


async def test_a_snapshot_is_not_held_up_by_other_clients_long_resumes(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """Four clients replay 100 k events each while a fifth asks for a snapshot: the snapshot's
    reads do not queue behind their pages (they go on another connection), so it arrives while
    the replays are still under way."""
    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 100_000)
        await publish(pub, Q, 0, 10)
        epoch = pub.positions[T][0]
        resumers = [recorder(server.url) for _ in range(4)]
        clients = [await r.__aenter__() for r in resumers]
        try:
            for c in clients:
                await c.ws.send(
                    orjson.dumps(
                        {
                            "op": "subscribe",
                            "id": 1,
                            "channels": [T.name],
                            "resume": {T.name: {"epoch": epoch, "seq": 0}},
                        }
                    )
                )
            await clients[0].wait_until(lambda: clients[0].last_seq(T.name) > 0)
            async with recorder(server.url) as late:
                t0 = time.monotonic()
                await late.request("subscribe", channels=[Q.name], snapshot=True)
                await late.wait_until(lambda: late.last_seq(Q.name) == 10)
                waited = time.monotonic() - t0
            # Behaviour, not speed: the replays had not all finished when the snapshot came.
            assert any(c.last_seq(T.name) < 100_000 for c in clients), waited
        finally:
            for r in resumers:
                await r.__aexit__(None, None, None)


def test_held_batches_are_bounded_per_connection_in_bytes() -> None:
    """A connection catching up many channels holds at most `hold_limit` bytes of live batches
    in all (plus one batch); what it drops is read again from history."""
    sub = Subscriber(Outbox(1 << 20), lambda: None, hold_limit=10_000)
    channels = [Channel.parse(f"trades:S{i}") for i in range(50)]
    for ch in channels:
        sub.hold_back(ch)
    body = b'{"v":1,"type":"trade","x":"' + b"x" * 80 + b'"}'
    held_max = 0
    for seq in range(1, 40):
        for ch in channels:
            sub.hold(Batch(ch, "e", seq, [body]))
            held_max = max(
                held_max, sum(b.nbytes for batches in sub.holding.values() for b in batches)
            )
    batch_size = Batch(channels[0], "e", 1, [body]).nbytes
    assert held_max <= 10_000 + batch_size
    # Releasing and joining keep the count right: nothing held means nothing counted.
    for ch in channels[:25]:
        sub.release(ch)
    for ch in channels[25:]:
        sub.join_live(ch)
    assert sub.holding == {}
    sub.hold_back(channels[0])
    for seq in range(1, 5):
        sub.hold(Batch(channels[0], "e", seq, [body]))
    assert len(sub.holding[channels[0]]) == 4  # well under the limit again: nothing dropped


async def test_catch_up_tasks_per_connection_stay_bounded(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """Many subscribe/unsubscribe pairs of channels without streams leave no task behind."""
    async with recorder(server.url) as c:
        tasks_before = len(asyncio.all_tasks())
        for i in range(40):
            name = f"quotes:NONE{i}"
            await c.request("subscribe", channels=[name, "trades:*"], snapshot=True)
            await c.request("unsubscribe", channels=[name, "trades:*"])
        (conn,) = server.connections
        await eventually(lambda: not conn.catchup.channels, "the catch-up to be idle")
        # A catch-up task ends a loop turn or two after its last channel: on a busy machine
        # (the suite in two processes) it was still there when asked at once. Left behind,
        # it would stay.
        await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before + 1, "the tasks to end")


def alone(history: History, read_position: int) -> tuple[Subscriber, CatchUp]:
    """A subscriber and its catch-up, without a server: the socket always writable, no
    wildcard, the reader at `read_position` on every channel."""

    async def writable() -> None:
        return None

    async def expand(patterns: list[ChannelPattern]) -> list[Channel]:
        return []

    sub = Subscriber(Outbox(1 << 20), lambda: None)
    catchup = CatchUp(
        sub,
        history,
        max_events=100,
        wait_writable=writable,
        read_position=lambda channel: read_position,
        expand=expand,
    )
    return sub, catchup


async def test_a_request_that_comes_as_the_catch_up_task_returns_starts_a_new_one(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """A subscribe handled after the catch-up task returned, before its done callback ran (a
    read callback can come between the two), is positioned all the same: it found the task
    still set and waited for ever, its ack never sent."""
    history = History(redis_server.url)
    # The reader follows it: nothing stored, all read.
    _, catchup = alone(history, read_position=0)
    positioned: list[tuple[str, list[Channel]]] = []
    try:
        catchup.add({ZZZ: None}, lambda fresh: positioned.append(("first", fresh)))
        task = catchup._task
        assert task is not None
        # The order the race takes: the next request, then the task's own done callback.
        task.remove_done_callback(catchup._done)
        task.add_done_callback(
            lambda _: catchup.add({Q: None}, lambda fresh: positioned.append(("second", fresh)))
        )
        task.add_done_callback(catchup._done)
        await task
        await eventually(lambda: len(positioned) == 2, "the second request to be positioned")
        assert positioned == [("first", [ZZZ]), ("second", [Q])]
        await eventually(lambda: not catchup.channels, "the catch-up to be idle")
    finally:
        catchup.close()
        history.close()


async def test_a_subscribe_storm_on_channels_not_yet_followed_is_placed_by_the_reader(
    server: TickwireServer, redis_server: RedisProcess, redis: RedisConnection
) -> None:
    """Many clients subscribe, all in the same moment, to channels the reader does not follow
    yet: each is placed where the stored stream ends (the ack says it) at the reader's next
    sync, with no catch-up of its own and no history read; then every later event reaches
    each of them once, in order."""
    async with publisher(redis_server) as pub:
        await publish(pub, T, 0, 5)
        await publish(pub, Q, 0, 3)
        await server.reader.refresh_registry(force=True)
        assert server.reader.follower.position_of(T) is None  # nobody subscribed yet
        epochs = {T.name: pub.positions[T][0], Q.name: pub.positions[Q][0]}
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(recorder(server.url)) for _ in range(30)]
            before = await calls(redis)
            for c in clients:
                c.checker.expect_from(T.name, epochs[T.name], 5)
                c.checker.expect_from(Q.name, epochs[Q.name], 3)
            # Every request written before any reply is awaited: they reach the server together.
            await asyncio.gather(
                *(
                    c.ws.send(
                        orjson.dumps(
                            {"op": "subscribe", "id": 1, "channels": [T.name, Q.name]}
                        ).decode()
                    )
                    for c in clients
                )
            )
            acks = [await c.wait_for(lambda m: m.get("type") == "subscribed") for c in clients]
            for ack in acks:
                assert ack["positions"] == {
                    T.name: {"epoch": epochs[T.name], "seq": 5},
                    Q.name: {"epoch": epochs[Q.name], "seq": 3},
                }
            assert all(conn._catchup is None for conn in server.connections)
            await publish(pub, T, 5, 4)
            await publish(pub, Q, 3, 2)
            for c in clients:
                await c.wait_until(
                    functools.partial(
                        lambda r: r.last_seq(T.name) == 9 and r.last_seq(Q.name) == 5, c
                    )
                )
                assert [e["seq"] for e in c.events(T.name)] == [6, 7, 8, 9]
                assert [e["seq"] for e in c.events(Q.name)] == [4, 5]
                assert c.checker.ok, c.checker.violations
            assert (await calls(redis)).get("xrange", 0) == before.get("xrange", 0)


class MasterDown(History):
    """History as a Redis Cluster with one master down answers it: the metas of `no_meta` are
    left out and the reads of `no_range` answered `NodeDown`, until they are emptied."""

    def __init__(self, url: str, no_meta: set[Channel], no_range: set[Channel]) -> None:
        super().__init__(url)
        self.no_meta, self.no_range = no_meta, no_range
        self.tries: list[Channel] = []

    async def metas(self, channels: list[Channel]) -> dict[Channel, Meta | None]:
        self.tries += [c for c in channels if c in self.no_meta]
        metas = await super().metas(channels)
        return {c: m for c, m in metas.items() if c not in self.no_meta}

    async def range(
        self, channel: Channel, after: int, count: int, *, bulk: bool = False
    ) -> list[Batch]:
        if channel in self.no_range:
            self.tries.append(channel)
            raise NodeDown(("127.0.0.1", 1), "killed by the test")
        return await super().range(channel, after, count, bulk=bulk)


async def test_channels_of_a_down_cluster_master_wait_aside_and_the_rest_goes_on(
    redis_server: RedisProcess,
) -> None:
    """A resume of three channels, one whose master is down before its meta is read and one
    whose master goes down before its history is: the third is placed, acknowledged, replayed
    and joined live meanwhile; the two others are placed and replayed once their master is
    back, from where the client asked, nothing missing."""
    run = secrets.token_hex(4).upper()  # (the Redis is shared; the test runs on two loops)
    up, down_meta, down_range = (
        Channel.parse(f"trades:{name}-{run}") for name in ("UP", "DOWN-META", "DOWN-RANGE")
    )
    channels = [up, down_meta, down_range]
    async with publisher(redis_server) as pub:
        for channel in channels:
            await publish(pub, channel, 0, 5)
        epochs = {c: p.epoch for c, p in pub.positions.items()}
    history = MasterDown(redis_server.url, {down_meta}, {down_range})
    sub, catchup = alone(history, read_position=5)  # the reader at the last event stored
    positioned: list[list[Channel]] = []
    try:
        catchup.add({c: StreamPosition(epochs[c], 2) for c in channels}, positioned.append)
        await eventually(
            lambda: catchup.channels == {down_meta, down_range}, "the channel up to join live"
        )
        assert positioned == [[down_range, up]]  # acknowledged, the channels read placed
        assert sub.outbox.positions[up] == (epochs[up], 5)
        assert set(sub.holding) == {down_meta, down_range}  # their live batches held meanwhile
        # Tried again while the master is down, but not in a busy loop.
        await eventually(lambda: history.tries.count(down_meta) >= 2, "a second try")
        assert history.tries.count(down_meta) <= 10
        history.no_meta.clear()
        history.no_range.clear()
        await eventually(lambda: not catchup.channels, "the master's channels to join live")
        assert not sub.holding
        for channel in channels:
            assert sub.outbox.positions[channel] == (epochs[channel], 5)
        frame = sub.outbox.take()
        assert frame is not None
        doc = orjson.loads(frame)
        sent = doc if isinstance(doc, list) else [doc]
        got = {
            c: [e["seq"] for m in sent if m["ch"] == c.name for e in m.get("events", [])]
            for c in channels
        }
        assert got == {c: [3, 4, 5] for c in channels}
    finally:
        catchup.close()
        history.close()
