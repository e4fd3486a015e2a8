"""The reader's XREAD COUNT policy (sans-I/O)."""

from __future__ import annotations

from tickwire.server.reader import next_count


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
