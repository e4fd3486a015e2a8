"""Visiting every connection once per period a slice at a time, so that no loop turn does all."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class Visited(Hashable, Protocol):
    #: The slice it is in (set by `Rounds.add`).
    round_slice: int


V = TypeVar("V", bound=Visited)


class Rounds(Generic[V]):
    """Items in `slices` slices, one slice visited per turn, so each item once every `slices`
    turns. Items are dealt to the slices in turn as they come, so the slices stay even however
    bunched the arrivals: connections opened in the same second (a reconnect storm) are not
    pinged in the same loop turn a period later. Adding and removing cost the same whatever the
    number of items.

    Why: a keepalive or heartbeat round over ten thousand connections in one loop turn wrote
    ten thousand frames there, and every event due in that turn waited ~100-250 ms behind it.
    """

    __slots__ = ("_deal", "_slices", "_turn")

    def __init__(self, slices: int) -> None:
        if slices < 1:
            raise ValueError("at least one slice")
        self._slices: list[set[V]] = [set() for _ in range(slices)]
        self._deal = 0
        self._turn = 0

    def __len__(self) -> int:
        return sum(map(len, self._slices))

    def add(self, item: V) -> None:
        item.round_slice = self._deal
        self._slices[self._deal].add(item)
        self._deal = (self._deal + 1) % len(self._slices)

    def remove(self, item: V) -> None:
        self._slices[item.round_slice].discard(item)

    def turn(self) -> list[V]:
        """The items of the next slice (a copy: a visit may remove one)."""
        items = list(self._slices[self._turn])
        self._turn = (self._turn + 1) % len(self._slices)
        return items
