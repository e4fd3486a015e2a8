"""The reader's rules, sans-I/O: its XREAD COUNT policy and what a live push may deliver."""

from __future__ import annotations

from tickwire.core.channels import Channel
from tickwire.core.config import ServerConfig
from tickwire.server.batch import Batch
from tickwire.server.history import History
from tickwire.server.hub import Hub
from tickwire.server.metrics import Metrics
from tickwire.server.reader import StreamReader, fanout_pause, next_count


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
    cpu = iter([1.0, 1.003, 2.0, 2.001, 3.0, 3.003])  # before and after each dispatch
    wall = iter([10.0, 10.004, 10.004, 10.005, 10.1, 10.104])  # start and end of each
    r = StreamReader(
        ServerConfig(),
        Hub(),
        Metrics(),
        History("redis://127.0.0.1:1"),
        on_status=lambda up: None,
        cpu_clock=lambda: next(cpu),
        monotonic=lambda: next(wall),
    )
    batch = [Batch(Channel.parse("trades:BTC-USD"), "e1", 1, [b'{"seq":1}'])]
    r._ready_at = 10.0  # the previous fan-out ended as this one started: busy
    r._fanout(batch, 0)
    assert abs(r._pause - 0.003) < 1e-9
    r._fanout(batch, 0)  # a cheap one before the pause is taken keeps it owed
    assert abs(r._pause - 0.003) < 1e-9
    r._pause = 0.0
    r._fanout(batch, 0)  # 95 ms idle before it: the server had time to spare
    assert r._pause == 0.0


# -- live pushes (sans-I/O: the reader's rules for what a push may deliver) ----------------------

T = Channel.parse("trades:BTC-USD")
Q = Channel.parse("quotes:BTC-USD")


def reader_at(positions: dict[Channel, int], epoch: str = "e1") -> StreamReader:
    r = StreamReader(
        ServerConfig(), Hub(), Metrics(), History("redis://127.0.0.1:1"), on_status=lambda up: None
    )
    r.positions = dict(positions)
    r.epochs = {c: epoch for c in positions}
    r._keys = {c.stream_key.encode(): c for c in positions}
    r._behind.clear()
    r._recheck = False
    return r


def push(channel: Channel, first: int, n: int, epoch: str = "e1") -> list[bytes]:
    events = b"\n".join(b'{"i":%d,"seq":%d}' % (s, s) for s in range(first, first + n))
    head = b"%s %s %d %d" % (channel.stream_key.encode(), epoch.encode(), first, n)
    return [b"message", b"tw:live:0", head + b"\n" + events]


def seqs(batches: list[Batch]) -> list[tuple[str, int, int]]:
    return [(b.channel.name, b.first_seq, b.last_seq) for b in batches]


def test_pushes_that_continue_a_channel_are_delivered_as_one_batch_and_move_it_on() -> None:
    r = reader_at({T: 10, Q: 0})
    out = r._take_pushes([push(T, 11, 3), push(Q, 1, 1), push(T, 14, 1)])
    # Pushes piled up while the server was busy: one batch (one frame part) per channel.
    assert seqs(out) == [("trades:BTC-USD", 11, 14), ("quotes:BTC-USD", 1, 1)]
    assert out[0].events == [b'{"i":%d,"seq":%d}' % (s, s) for s in range(11, 15)]
    assert r.positions == {T: 14, Q: 1}
    assert not r._behind and not r._recheck


def test_one_push_holding_batches_of_several_channels_delivers_each() -> None:
    r = reader_at({T: 10, Q: 0})
    one = b"\n".join(push(c, first, n)[2] for c, first, n in ((T, 11, 2), (Q, 1, 3), (T, 13, 1)))
    out = r._take_pushes([[b"message", b"tw:live:0", one]])
    assert seqs(out) == [("trades:BTC-USD", 11, 13), ("quotes:BTC-USD", 1, 3)]
    assert out[1].events == [b'{"i":1,"seq":1}', b'{"i":2,"seq":2}', b'{"i":3,"seq":3}']
    assert r.positions == {T: 13, Q: 3}


def test_a_one_batch_push_of_an_earlier_publisher_is_still_understood() -> None:
    r = reader_at({T: 10})
    old = b'%s e1 11\n{"seq":11}\n{"seq":12}' % T.stream_key.encode()
    out = r._take_pushes([[b"message", b"tw:live:0", old]])
    assert seqs(out) == [("trades:BTC-USD", 11, 12)]


def test_a_section_claiming_more_events_than_the_push_holds_is_refused() -> None:
    r = reader_at({T: 10})
    short = push(T, 11, 2)
    short[2] = short[2].replace(b" 11 2\n", b" 11 3\n")
    assert r._take_pushes([short]) == []
    assert r.metrics.bad_pushes == 1 and r.positions == {T: 10}


def test_what_was_read_already_is_cut_and_a_hole_sends_the_channel_to_its_stream() -> None:
    r = reader_at({T: 10, Q: 5})
    out = r._take_pushes([push(T, 8, 2), push(T, 9, 4), push(Q, 7, 2)])
    # 8-9 read already: dropped; 9-12 overlaps: 11-12 delivered; Q skips 6: nothing from it.
    assert seqs(out) == [("trades:BTC-USD", 11, 12)]
    assert out[0].events[0] == b'{"i":11,"seq":11}'
    assert r.positions == {T: 12, Q: 5}
    assert r._behind == {Q}


def test_another_epoch_asks_for_a_recheck_and_delivers_nothing() -> None:
    r = reader_at({T: 10})
    assert r._take_pushes([push(T, 1, 1, epoch="e2")]) == []
    assert r._recheck and r.positions == {T: 10}


def test_pushes_of_channels_not_followed_and_other_replies_are_ignored() -> None:
    r = reader_at({T: 0})
    r.epochs.clear()  # a channel with no stream yet: its first push sets the epoch
    other = push(Channel.parse("trades:ETH-USD"), 1, 1)
    out = r._take_pushes([[b"pong", b""], other, push(T, 1, 2, epoch="e9")])
    assert seqs(out) == [("trades:BTC-USD", 1, 2)]
    assert r.epochs == {T: "e9"}


def test_a_message_that_is_not_an_append_is_counted_and_skipped() -> None:
    r = reader_at({T: 0})
    garbage = [[b"message", b"tw:live:0", m] for m in (b"hello", b"a b c\n{}", b"", b"\n\n")]
    out = r._take_pushes([*garbage, push(T, 1, 1)])
    assert seqs(out) == [("trades:BTC-USD", 1, 1)]
    assert r.metrics.bad_pushes == 4


def test_the_sweep_compares_every_followed_channel_once_per_period_a_share_per_poll() -> None:
    channels = [Channel("trades", f"S{i:02d}") for i in range(10)]
    live = set(channels)

    def following(recheck_s: float) -> StreamReader:
        r = StreamReader(
            ServerConfig(registry_poll_s=0.25, meta_recheck_s=recheck_s),
            Hub(),
            Metrics(),
            History("redis://127.0.0.1:1"),
            on_status=lambda up: None,
        )
        r.positions = dict.fromkeys(channels, 0)
        return r

    r = following(1.0)
    # Four polls a period, 2.5 channels a poll: shares of 2 and 3, every channel once a round.
    shares = [r._next_sweep(live) for _ in range(8)]
    assert [len(s) for s in shares] == [2, 3, 2, 3, 2, 3, 2, 3]
    for rounds in (shares[:4], shares[4:]):
        assert sorted(c for s in rounds for c in s) == sorted(channels)
    # A channel no longer followed is skipped; a period far longer than the poll checks
    # nothing for many polls.
    del r.positions[channels[0]]
    assert all(channels[0] not in r._next_sweep(live) for _ in range(8))
    slow = following(3600)
    assert all(slow._next_sweep(live) == [] for _ in range(100))
