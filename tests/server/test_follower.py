"""The follower's rules, sans-I/O: its XREAD COUNT policy, what a live push may deliver, the
sweep of metas and the pause after a costly fan-out; driven through its public methods only."""

from __future__ import annotations

from tickwire.core.channels import Channel
from tickwire.core.config import ServerConfig
from tickwire.core.stream import PushSection, StreamPosition, push_payload
from tickwire.server.batch import Batch
from tickwire.server.follower import StreamFollower, fanout_pause, next_count


def test_count_splits_the_reply_budget_over_streams_and_grows_while_a_stream_fills_it() -> None:
    # 200 streams share ~1000 entries per reply: 16 each at least (the floor).
    assert next_count(0, False, 200, 1000) == 16
    assert next_count(0, False, 4, 1000) == 250
    # A hot stream keeps filling it: double per read up to read_count, never beyond.
    counts = [16]
    for _ in range(8):
        counts.append(next_count(counts[-1], True, 200, 1000))
    assert counts == [16, 32, 64, 128, 256, 512, 1000, 1000, 1000]
    # Once it has caught up, back down by halves to the floor.
    assert next_count(1000, False, 200, 1000) == 500
    assert next_count(20, False, 200, 1000) == 16
    # A read_count below the floor: the floor is both the start and the cap.
    assert next_count(0, False, 200, 10) == next_count(16, True, 200, 10) == 16


def test_a_costly_fan_out_of_a_busy_server_pauses_the_reader_about_as_long_capped() -> None:
    cfg = ServerConfig()  # ratio 1, after 2 ms, busy half the time or more, at most 100 ms
    assert fanout_pause(0.004, 0.0, cfg) == 0.004
    assert fanout_pause(0.004, 0.004, cfg) == 0.004  # busy half the time
    assert fanout_pause(0.5, 0.0, cfg) == 0.1
    assert fanout_pause(0.0015, 0.0, cfg) == 0.0  # cheap
    assert fanout_pause(0.004, 0.005, cfg) == 0.0  # the server had time to spare
    assert fanout_pause(0.004, 0.0, ServerConfig(fanout_pause_ratio=0.5)) == 0.002
    assert fanout_pause(0.5, 0.0, ServerConfig(fanout_pause_ratio=0)) == 0.0


def test_the_pause_follows_the_fan_outs_cpu_time_and_the_idle_time_before_it() -> None:
    f = StreamFollower(ServerConfig())
    f.resumed(10.0)
    # 3 ms of CPU from 10.000 to 10.004, right after the previous one ended: busy.
    f.fanned_out(0.003, 10.0, 10.004)
    assert abs(f.pause - 0.003) < 1e-9
    f.fanned_out(0.001, 10.004, 10.005)  # a cheap one before the pause is taken keeps it owed
    assert abs(f.pause - 0.003) < 1e-9
    assert abs(f.take_pause() - 0.003) < 1e-9 and f.take_pause() == 0.0
    f.fanned_out(0.003, 10.1, 10.104)  # 95 ms idle before it: the server had time to spare
    assert f.pause == 0.0


# -- live pushes (sans-I/O: the reader's rules for what a push may deliver) ----------------------

T = Channel.parse("trades:BTC-USD")
Q = Channel.parse("quotes:BTC-USD")


def follower_at(positions: dict[Channel, int], epoch: str = "e1") -> StreamFollower:
    """A follower of these channels, each stored up to its position in `epoch` (0: nothing
    stored yet), caught up."""
    f = StreamFollower(ServerConfig())
    check = f.plan_sync(set(positions))
    assert sorted(check, key=str) == sorted(positions, key=str)
    f.apply_metas({c: (epoch, n, 1) if n else None for c, n in positions.items()})
    assert f.behind == set(positions)  # new channels are read from their streams first...
    f.read_commands()
    assert f.take_read([]) == [] and not f.behind  # ...which have nothing more
    assert not f.wants_sync
    return f


def section(channel: Channel, first: int, n: int, epoch: str = "e1") -> PushSection:
    events = [b'{"i":%d,"seq":%d}' % (s, s) for s in range(first, first + n)]
    return PushSection(channel.stream_key.encode(), epoch, first, events)


def push(channel: Channel, first: int, n: int, epoch: str = "e1") -> list[bytes]:
    return [b"message", b"tw:live:0", push_payload([section(channel, first, n, epoch)])]


def seqs(batches: list[Batch]) -> list[tuple[str, int, int]]:
    return [(b.channel.name, b.first_seq, b.last_seq) for b in batches]


def test_pushes_that_continue_a_channel_are_delivered_as_one_batch_and_move_it_on() -> None:
    r = follower_at({T: 10, Q: 0})
    out = r.take_pushes([push(T, 11, 3), push(Q, 1, 1), push(T, 14, 1)])
    # Pushes piled up while the server was busy: one batch (one frame part) per channel.
    assert seqs(out) == [("trades:BTC-USD", 11, 14), ("quotes:BTC-USD", 1, 1)]
    assert out[0].events == [b'{"i":%d,"seq":%d}' % (s, s) for s in range(11, 15)]
    assert r.positions == {T: 14, Q: 1}
    assert not r.behind and not r.wants_sync


def test_one_push_holding_batches_of_several_channels_delivers_each() -> None:
    r = follower_at({T: 10, Q: 0})
    one = push_payload(
        [section(c, first, n) for c, first, n in ((T, 11, 2), (Q, 1, 3), (T, 13, 1))]
    )
    out = r.take_pushes([[b"message", b"tw:live:0", one]])
    assert seqs(out) == [("trades:BTC-USD", 11, 13), ("quotes:BTC-USD", 1, 3)]
    assert out[1].events == [b'{"i":1,"seq":1}', b'{"i":2,"seq":2}', b'{"i":3,"seq":3}']
    assert r.positions == {T: 13, Q: 3}


def test_a_one_batch_push_of_an_earlier_publisher_is_still_understood() -> None:
    r = follower_at({T: 10})
    old = b'%s e1 11\n{"seq":11}\n{"seq":12}' % T.stream_key.encode()
    out = r.take_pushes([[b"message", b"tw:live:0", old]])
    assert seqs(out) == [("trades:BTC-USD", 11, 12)]


def test_a_section_claiming_more_events_than_the_push_holds_is_refused() -> None:
    r = follower_at({T: 10})
    short = push(T, 11, 2)
    short[2] = short[2].replace(b" 11 2\n", b" 11 3\n")
    assert r.take_pushes([short]) == []
    assert r.bad_pushes == 1 and r.positions == {T: 10}


def test_what_was_read_already_is_cut_and_a_hole_sends_the_channel_to_its_stream() -> None:
    r = follower_at({T: 10, Q: 5})
    out = r.take_pushes([push(T, 8, 2), push(T, 9, 4), push(Q, 7, 2)])
    # 8-9 read already: dropped; 9-12 overlaps: 11-12 delivered; Q skips 6: nothing from it.
    assert seqs(out) == [("trades:BTC-USD", 11, 12)]
    assert out[0].events[0] == b'{"i":11,"seq":11}'
    assert r.positions == {T: 12, Q: 5}
    assert r.behind == {Q}


def test_another_epoch_asks_for_a_recheck_and_delivers_nothing() -> None:
    r = follower_at({T: 10})
    assert r.take_pushes([push(T, 1, 1, epoch="e2")]) == []
    assert r.wants_sync and r.positions == {T: 10}


def test_pushes_of_channels_not_followed_and_other_replies_are_ignored() -> None:
    r = follower_at({T: 0})  # a channel with no stream yet: its first push sets the epoch
    assert r.epochs == {}
    other = push(Channel.parse("trades:ETH-USD"), 1, 1)
    out = r.take_pushes([[b"pong", b""], other, push(T, 1, 2, epoch="e9")])
    assert seqs(out) == [("trades:BTC-USD", 1, 2)]
    assert r.epochs == {T: "e9"}


def test_a_message_that_is_not_an_append_is_counted_and_skipped() -> None:
    r = follower_at({T: 0})
    garbage = [[b"message", b"tw:live:0", m] for m in (b"hello", b"a b c\n{}", b"", b"\n\n")]
    out = r.take_pushes([*garbage, push(T, 1, 1)])
    assert seqs(out) == [("trades:BTC-USD", 1, 1)]
    assert r.bad_pushes == 4


def test_the_sweep_compares_every_followed_channel_once_per_period_a_share_per_poll() -> None:
    channels = [Channel("trades", f"S{i:02d}") for i in range(10)]
    live = set(channels)

    def following(recheck_s: float) -> StreamFollower:
        f = StreamFollower(ServerConfig(registry_poll_s=0.25, meta_recheck_s=recheck_s))
        f.apply_metas(dict.fromkeys(f.plan_sync(live)))
        return f

    def sweep(f: StreamFollower, channels: set[Channel]) -> list[Channel]:
        f.poll()
        return f.plan_sync(channels)

    r = following(1.0)
    # Four polls a period, 2.5 channels a poll: shares of 2 and 3, every channel once a round.
    shares = [sweep(r, live) for _ in range(8)]
    assert [len(s) for s in shares] == [2, 3, 2, 3, 2, 3, 2, 3]
    for rounds in (shares[:4], shares[4:]):
        assert sorted(c for s in rounds for c in s) == sorted(channels)
    # A channel no longer followed is skipped; a period far longer than the poll checks
    # nothing for many polls.
    fewer = live - {channels[0]}
    assert all(channels[0] not in sweep(r, fewer) for _ in range(8))
    slow = following(3600)
    assert all(sweep(slow, live) == [] for _ in range(100))


def test_a_channel_set_aside_is_not_read_until_the_sweep_comes_to_it() -> None:
    # Its stream key holds another type: an XREAD naming it fails for every stream it names.
    f = follower_at({T: 0, Q: 0})
    f.apply_metas({T: ("e1", 3, 1), Q: ("e1", 2, 1)})
    (read,) = f.read_commands()
    assert set(f.read_channels(read)) == {T, Q}
    assert f.set_aside([T]) == [T] and f.set_aside([T]) == []
    (read,) = f.read_commands()
    assert f.read_channels(read) == [Q]
    f.take_read([])
    f.apply_metas({T: ("e1", 4, 1)})  # stored past what was read: still not read
    assert f.read_commands() == []
    # The sweep comes to it (here: at once, a whole round per poll): read again.
    f.config = ServerConfig(registry_poll_s=1.0, meta_recheck_s=1.0)
    f.poll()
    f.plan_sync({T, Q})
    (read,) = f.read_commands()
    assert f.read_channels(read) == [T]
    # Not followed any more: forgotten, aside or not.
    f.set_aside([T])
    f.plan_sync({Q})
    assert f.set_aside([T]) == []


def test_a_channel_stored_behind_what_was_read_in_its_epoch_is_fenced_then_read_anew() -> None:
    r = follower_at({T: 10, Q: 4})
    r.reconnected()  # a failover: compare everything
    check = r.plan_sync({T, Q})
    # Redis kept T only up to 7 in the epoch the server read to 10; Q is intact.
    r.apply_metas({c: {T: ("e1", 7, 1), Q: ("e1", 4, 1)}[c] for c in check})
    assert r.take_rolled_back() == {T: StreamPosition("e1", 10)}
    assert r.take_rolled_back() == {}  # owed once
    # Nothing of T moves meanwhile: its position is still what was read.
    assert r.positions[T] == 10 and not r.behind
    # The fence gave T a new epoch from 8: read from there (each outbox announces the reset).
    r.apply_metas({T: ("e2", 7, 8)})
    assert r.position_of(T) == StreamPosition("e2", 7) and r.behind == {T}
    # The loop tells subscribers now, not with the new epoch's first event.
    assert r.take_renewed() == {T: StreamPosition("e2", 7)}
    assert r.take_renewed() == {}
    # A push of the old epoch reusing a lost seq is never delivered.
    assert r.take_pushes([push(T, 8, 1, epoch="e1")]) == []


def test_the_reader_reconnects_unannounced_only_after_an_ended_connection_now_and_then() -> None:
    from tickwire.core.errors import RedisTimeout, RedisUnavailable
    from tickwire.server.reader import QUIET_RETRY_EVERY_S, retries_quietly

    ended = RedisUnavailable("Redis closed the connection")
    silent = RedisTimeout("no reply from Redis within 5.0 s")
    long_ago = 100.0 - QUIET_RETRY_EVERY_S - 0.1
    assert retries_quietly(ended, True, 100.0, long_ago)
    # A timeout: the stall already happened; the clients hear of it.
    assert not retries_quietly(silent, True, 100.0, long_ago)
    # Already down, or a quiet retry a moment ago: announced.
    assert not retries_quietly(ended, False, 100.0, long_ago)
    assert not retries_quietly(ended, True, 100.0, 99.0)
