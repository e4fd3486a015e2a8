"""The cyclic-GC policy (`tickwire.core.collector`): what it freezes, what its full collection
reclaims, and the pause timer."""

from __future__ import annotations

import gc
import weakref

import pytest

from tickwire.core.collector import FreezePolicy, PauseTimer


class Node:
    """A container object the collector tracks, that can be put in a cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.usefixtures("no_cyclic_gc")
def test_what_survived_into_the_oldest_generation_is_frozen_and_then_walked_no_more() -> None:
    policy = FreezePolicy(min_objects=1_000, clock=Clock())
    keep = [Node() for _ in range(5_000)]
    gc.collect()  # they survive into the oldest generation
    old = {id(o) for o in gc.get_objects(2)}
    assert all(id(n) in old for n in keep)
    frozen_before = gc.get_freeze_count()

    policy.tick()

    assert gc.get_freeze_count() >= frozen_before + len(keep)
    assert not {id(o) for o in gc.get_objects(2)} & {id(n) for n in keep}
    assert policy.frozen >= len(keep)


@pytest.mark.usefixtures("no_cyclic_gc")
def test_too_few_old_objects_are_left_alone() -> None:
    policy = FreezePolicy(min_objects=1_000_000, clock=Clock())
    keep = [Node() for _ in range(100)]
    gc.collect()
    frozen_before = gc.get_freeze_count()
    policy.tick()
    assert gc.get_freeze_count() == frozen_before
    assert policy.frozen == 0
    assert keep


@pytest.mark.usefixtures("no_cyclic_gc")
def test_a_cycle_that_dies_frozen_outlives_collections_until_the_full_one() -> None:
    clock = Clock()
    policy = FreezePolicy(min_objects=1, full_every_s=900.0, clock=clock)
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.collect()
    policy.tick()  # frozen while alive
    del a, b
    gc.collect()
    assert gone() is not None, "a frozen cycle is out of the collector's reach"

    clock.now = 899.0
    policy.tick()
    assert gone() is not None and policy.reclaimed == 0

    clock.now = 900.0
    policy.tick()  # the full collection, frozen objects included
    assert gone() is None
    assert policy.reclaimed >= 2
    assert gc.get_freeze_count() > 0, "the survivors are frozen again"


@pytest.mark.usefixtures("no_cyclic_gc")
def test_the_pause_timer_times_each_collection_with_its_generation() -> None:
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    seen: list[tuple[float, int]] = []
    with PauseTimer(lambda s, g: seen.append((s, g)), clock=lambda: next(ticks)) as timer:
        gc.collect(0)
        gc.collect(2)
    gc.collect()
    assert seen == [(0.25, 0), (0.5, 2)]
    assert (timer.count, timer.total, timer.longest) == (2, 0.75, 0.5)
    assert timer.summary() == "2 collector pauses, 750 ms in all, the longest 500.0 ms"


@pytest.mark.usefixtures("no_cyclic_gc")
def test_a_young_cycle_already_garbage_is_collected_not_frozen() -> None:
    policy = FreezePolicy(min_objects=1_000, clock=Clock())
    keep = [Node() for _ in range(5_000)]
    gc.collect()  # enough old objects for a freeze
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b  # garbage, in the young generation

    policy.tick()

    assert gone() is None
    assert policy.frozen >= len(keep)
