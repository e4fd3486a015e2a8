"""clients/web/protocol.js, the page's sans-I/O protocol bookkeeping, run in headless Chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page, Route

from tests.web.harness import MOCK_ORIGIN, launch_chromium, serve_web_files

# One browser for the module: these checks are pure functions, and a launch costs ~2 s.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def js() -> AsyncIterator[Page]:
    """A blank page of the test origin, from which protocol.js can be imported."""
    async with launch_chromium() as browser:
        page = await browser.new_page()
        await serve_web_files(page)

        async def blank(route: Route) -> None:
            await route.fulfill(
                body="<!doctype html><title>blank</title>", content_type="text/html"
            )

        await page.route(f"{MOCK_ORIGIN}/blank", blank)
        await page.goto(f"{MOCK_ORIGIN}/blank")
        yield page


async def run(page: Page, body: str, arg: Any = None) -> Any:
    """Evaluate `body` (an async function body using `m`, the module, and `arg`)."""
    return await page.evaluate(
        f"async (arg) => {{ const m = await import('/web/protocol.js'); {body} }}", arg
    )


def trades(*seqs: int, epoch: str = "e1") -> dict[str, Any]:
    return {
        "type": "events",
        "ch": "trades:AAPL",
        "epoch": epoch,
        "events": [{"v": 1, "type": "trade", "sym": "AAPL", "seq": s, "pt": 0} for s in seqs],
    }


async def test_parse_frame_accepts_an_object_or_an_array(js: Page) -> None:
    out = await run(
        js,
        """return [m.parseFrame('{"type":"pong","id":1,"ts":5}'),
                   m.parseFrame('[{"type":"status","redis":"up"},{"type":"pong","id":2,"ts":6}]')];""",
    )
    assert out == [
        [{"type": "pong", "id": 1, "ts": 5}],
        [{"type": "status", "redis": "up"}, {"type": "pong", "id": 2, "ts": 6}],
    ]


async def test_pattern_covers_wildcards_of_their_type_only(js: Page) -> None:
    out = await run(
        js,
        """return [m.patternCovers('trades:*', 'trades:AAPL'), m.patternCovers('trades:*', 'quotes:AAPL'),
                   m.patternCovers('trades:AAPL', 'trades:AAPL'), m.patternCovers('trades:AAPL', 'trades:AAPLX'),
                   m.patternCovers('bars.1s:*', 'bars.1m:X')];""",
    )
    assert out == [True, False, True, False, False]


async def test_backoff_doubles_with_jitter_up_to_the_cap(js: Page) -> None:
    out = await run(
        js,
        """const lo = [], hi = [];
           for (let a = 0; a < 8; a++) {
             lo.push(m.backoffDelay(a, {baseMs: 250, capMs: 8000}, () => 0));
             hi.push(m.backoffDelay(a, {baseMs: 250, capMs: 8000}, () => 0.999999));
           }
           return {lo, hi};""",
    )
    assert out["lo"] == [125, 250, 500, 1000, 2000, 4000, 4000, 4000]
    assert [round(h) for h in out["hi"]] == [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]


async def test_latency_window_percentiles_over_the_last_samples(js: Page) -> None:
    out = await run(
        js,
        """const w = new m.LatencyWindow(100);
           const empty = w.percentiles();
           for (let i = 1; i <= 100; i++) w.add(i);
           const full = w.percentiles();
           for (let i = 0; i < 100; i++) w.add(1000);   // the old samples roll out
           return {empty, full, rolled: w.percentiles()};""",
    )
    assert out["empty"] is None
    assert out["full"] == {"n": 100, "p50": 50, "p99": 99}
    assert out["rolled"] == {"n": 100, "p50": 1000, "p99": 1000}


async def test_tracker_drops_duplicates_and_moves_past_gaps_and_resets(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           const seqs = (r) => r.fresh.map((e) => e.seq);
           const a = seqs(t.events(arg.first));
           const b = seqs(t.events(arg.overlap));
           const gap = t.gap({type: 'gap', ch: 'trades:AAPL', from_seq: 6, to_seq: 8, reason: 'trimmed'});
           const c = t.events(arg.afterGap);
           const reset = t.reset({type: 'reset', ch: 'trades:AAPL', epoch: 'e2'});
           const d = t.events(arg.newEpoch);
           return {a, b, gap, c: [seqs(c), c.stall], reset, d: [seqs(d), d.stall],
                   totals: t.totals, resume: t.resume()};""",
        {
            "first": trades(1, 2, 3),
            "overlap": trades(2, 3, 4, 5),
            "afterGap": trades(9),
            "newEpoch": trades(40, 41, epoch="e2"),
        },
    )
    assert out["a"] == [1, 2, 3]
    assert out["b"] == [4, 5]
    assert out["gap"] == {"level": "warn", "text": "trades:AAPL: gap 6..8 (3 events, trimmed)"}
    assert out["c"] == [[9], False]
    assert out["reset"]["text"] == "trades:AAPL: reset, epoch e1 → e2"
    assert out["d"] == [[40, 41], False]  # a new epoch may start anywhere
    assert out["totals"] == {
        "delivered": 8, "duplicates": 2, "gaps": 1, "resets": 1, "holes": 0, "skipped": 0
    }  # fmt: skip
    assert out["resume"] == {"trades:AAPL": {"epoch": "e2", "seq": 41}}


async def test_tracker_stalls_on_an_unannounced_hole_until_resumes_give_up(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker({maxResumeAttempts: 2});
           t.events(arg.start);
           const tries = [];
           for (let i = 0; i < 3; i++) {
             t.connectionMade();
             const r = t.events(arg.hole);
             const after = t.events(arg.next);          // dropped while stalled
             tries.push([r.fresh.map((e) => e.seq), r.stall, after.fresh.length,
                         r.notices.map((n) => n.text)]);
           }
           return {tries, totals: t.totals, resume: t.resume()};""",
        {"start": trades(1, 2), "hole": trades(5), "next": trades(6)},
    )
    # Two resumes are asked for; the third time the hole is accepted as unrecovered.
    assert out["tries"][0] == [[], True, 0, ["trades:AAPL: unannounced hole 3..4; resuming"]]
    assert out["tries"][1][:3] == [[], True, 0]
    assert out["tries"][2] == [[5], False, 1, ["trades:AAPL: seqs 3..4 unrecovered"]]
    assert out["totals"]["holes"] == 1
    assert out["resume"] == {"trades:AAPL": {"epoch": "e1", "seq": 6}}


async def test_tracker_heartbeat_ahead_of_delivery_means_events_were_lost(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           t.events(arg);
           const ok = t.behind({type: 'heartbeat', ts: 1, last: {'trades:AAPL': 3, 'quotes:X': 9}});
           const lost = t.behind({type: 'heartbeat', ts: 2, last: {'trades:AAPL': 4}});
           return {ok, lost, stalled: [...t.stalled]};""",
        trades(1, 2, 3),
    )
    assert out == {"ok": [], "lost": ["trades:AAPL"], "stalled": ["trades:AAPL"]}


async def test_resubscribe_resumes_delivered_channels_and_snapshots_the_rest(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           t.events(arg.trade);
           let id = 10;
           return m.resubscribeRequests(['quotes:*', 'trades:*', 'bars.1s:BTC-USD'], t, () => id++);""",
        {"trade": trades(7)},
    )
    assert out == [
        {
            "op": "subscribe",
            "id": 10,
            "channels": ["quotes:*", "bars.1s:BTC-USD"],
            "snapshot": True,
        },
        {
            "op": "subscribe",
            "id": 11,
            "channels": ["trades:*"],
            "resume": {"trades:AAPL": {"epoch": "e1", "seq": 7}},
        },
    ]


async def test_resubscribe_splits_a_large_resume_under_the_frame_limit(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           for (let i = 0; i < 300; i++) {
             const sym = 'SYM' + String(i).padStart(4, '0');
             t.events({type: 'events', ch: 'trades:' + sym, epoch: 'abcdef012345',
                       events: [{v: 1, type: 'trade', sym, seq: 1000 + i, pt: 0}]});
           }
           let id = 1;
           const reqs = m.resubscribeRequests(['trades:*'], t, () => id++, 2048);
           return reqs.map((r) => [JSON.stringify(r).length, r.channels, Object.keys(r.resume).length]);""",
    )
    assert len(out) > 5
    assert all(size <= 2048 for size, _, _ in out), out
    assert all(channels == ["trades:*"] for _, channels, _ in out)
    assert sum(n for _, _, n in out) == 300


async def test_subscribed_positions_resume_channels_that_had_no_event_yet(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           t.events(arg.trade);
           t.placed({type: 'subscribed', id: 1, channels: ['trades:*'], positions: {
             'trades:AAPL': {epoch: 'e1', seq: 2},
             'trades:IDLE': {epoch: 'e1', seq: 104},
             'trades:NEW': {epoch: '', seq: 0}}});
           const first = t.events({type: 'events', ch: 'trades:NEW', epoch: 'e7',
                                   events: [{...arg.trade.events[0], seq: 1, epoch: 'e7'}]});
           let id = 10;
           const before = m.resubscribeRequests(['trades:*'], t, () => id++);
           return {before, first: [first.fresh.map((e) => e.seq), first.notices]};""",
        {"trade": trades(7)},
    )
    # The delivered channel keeps its own position; the idle ones resume from the ack's.
    assert out["before"] == [
        {
            "op": "subscribe",
            "id": 10,
            "channels": ["trades:*"],
            "resume": {
                "trades:AAPL": {"epoch": "e1", "seq": 7},
                "trades:IDLE": {"epoch": "e1", "seq": 104},
                "trades:NEW": {"epoch": "e7", "seq": 1},
            },
        }
    ]
    assert out["first"] == [[1], []]  # no "epoch changed without a reset" for a new channel


async def test_tracker_takes_a_throttled_frames_skipped_seqs_as_no_hole(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           const seqs = (r) => [r.fresh.map((e) => e.seq), r.stall];
           const a = seqs(t.events(arg.first));
           const b = seqs(t.events({...arg.throttled, skipped: 5}));
           const c = seqs(t.events({...arg.short, skipped: 2}));
           return {a, b, c, totals: t.totals};""",
        {"first": trades(1, 2, 3), "throttled": trades(9), "short": trades(20)},
    )
    assert out["a"] == [[1, 2, 3], False]
    assert out["b"] == [[9], False]  # 4..8 superseded by 9: no hole
    assert out["c"] == [[], True]  # 10..17 missing beyond the 2 it skipped: a hole, resume
    assert out["totals"]["skipped"] == 5 and out["totals"]["holes"] == 0


async def test_resubscribe_asks_every_request_for_the_pages_rate(js: Page) -> None:
    out = await run(
        js,
        """const t = new m.ChannelTracker();
           t.events(arg.trade);
           let id = 10;
           return m.resubscribeRequests(['quotes:*', 'trades:*'], t, () => id++, 16384, 4);""",
        {"trade": trades(7)},
    )
    assert out == [
        {"op": "subscribe", "id": 10, "channels": ["quotes:*"], "snapshot": True, "max_hz": 4},
        {
            "op": "subscribe",
            "id": 11,
            "channels": ["trades:*"],
            "resume": {"trades:AAPL": {"epoch": "e1", "seq": 7}},
            "max_hz": 4,
        },
    ]


async def test_channel_names_follow_the_bar_interval_grammar(js: Page) -> None:
    out = await run(
        js,
        """return [['bars.250ms:BTC-USD', 'bars.5s:*', 'bars.15m:ETH-USD', 'bars.1s:X',
                    'bars.5x:X', 'bars.05s:X', 'candles.5s:X'].map((c) => m.CHANNEL_RE.test(c)),
                   ['250ms', '5s', '15m', '1h', '1d'].map((i) => m.intervalMs(i)),
                   Number.isNaN(m.intervalMs('5x'))];""",
    )
    assert out == [
        [True, True, True, True, False, False, False],
        [250, 5000, 900_000, 3_600_000, 86_400_000],
        True,
    ]
