"""The heartbeat and keepalive rounds (`tickwire.server.rounds`), sans I/O: each item once per
round, whatever comes and goes; slices even however bunched the arrivals."""

from __future__ import annotations

import random

import pytest

from tickwire.server.rounds import Rounds


class Item:
    def __init__(self, n: int) -> None:
        self.n = n
        self.round_slice = -1

    def __repr__(self) -> str:
        return f"Item({self.n})"


def test_items_added_at_once_are_dealt_evenly_and_each_visited_once_per_round() -> None:
    rounds: Rounds[Item] = Rounds(7)
    items = [Item(n) for n in range(100)]
    for item in items:
        rounds.add(item)
    assert len(rounds) == 100
    for _ in range(3):
        seen = [rounds.turn() for _ in range(7)]
        assert sorted(len(s) for s in seen) == [14, 14, 14, 14, 14, 15, 15]
        assert sorted(i.n for s in seen for i in s) == list(range(100))


@pytest.mark.parametrize("seed", range(20))
def test_under_random_comings_and_goings_each_item_is_visited_once_per_round(seed: int) -> None:
    rng = random.Random(seed)
    slices = rng.randint(1, 12)
    rounds: Rounds[Item] = Rounds(slices)
    present: set[Item] = set()
    #: For each present item, the turns since it was last visited (or added).
    waited: dict[Item, int] = {}
    counter = 0
    for _ in range(400):
        for _ in range(rng.randint(0, 5)):
            counter += 1
            item = Item(counter)
            rounds.add(item)
            present.add(item)
            waited[item] = 0
        for item in rng.sample(
            sorted(present, key=lambda i: i.n), min(len(present), rng.randint(0, 3))
        ):
            rounds.remove(item)
            present.discard(item)
            del waited[item]
        visited = rounds.turn()
        assert len(set(visited)) == len(visited), "an item twice in one turn"
        assert set(visited) <= present, "a removed item was visited"
        for item in present:
            waited[item] = 0 if item in visited else waited[item] + 1
            # Never more than a full round between two visits (or since it came).
            assert waited[item] < slices, (item, waited[item])
        assert len(rounds) == len(present)


def test_a_round_needs_a_slice() -> None:
    with pytest.raises(ValueError):
        Rounds(0)
