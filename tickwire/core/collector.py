"""Short cyclic-GC pauses in a process that holds many long-lived objects (connections).

CPython's collector walks every object of a generation it collects. A server holding tens of
thousands of connections keeps a million objects in the oldest generation, and each full
collection walked them all: pauses of a quarter of a second, every few seconds while clients
come and go, which set the event latency's tail at that scale. Objects that have survived into
the oldest generation are therefore frozen (`gc.freeze`) once a second: collections then walk
only what is new since. Reference counting still frees frozen objects; only reference cycles
among them would stay, so what lives long breaks its cycles when it goes (`Wire.connection_lost`,
`Connection.cleanup`), and a full collection of everything, frozen or not, runs rarely
(`full_every_s`) to reclaim whatever cycle was missed, logging what it found.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tickwire.gc")


class PauseTimer:
    """Times every collection (`gc.callbacks`) into `observe(seconds, generation)`, and keeps
    their number, total and longest."""

    def __init__(
        self,
        observe: Callable[[float, int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.observe = observe
        self.clock = clock
        self._started = 0.0
        self.count = 0
        self.total = 0.0
        self.longest = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
            return
        took = self.clock() - self._started
        self.count += 1
        self.total += took
        self.longest = max(self.longest, took)
        if self.observe is not None:
            self.observe(took, info["generation"])

    def reset(self) -> None:
        self.count, self.total, self.longest = 0, 0.0, 0.0

    def summary(self) -> str:
        return (
            f"{self.count} collector pauses, {self.total * 1000:.0f} ms in all, "
            f"the longest {self.longest * 1000:.1f} ms"
        )

    def __enter__(self) -> PauseTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self)


class FreezePolicy:
    """Freezes what survived into the oldest generation (after a collection of the young ones),
    and now and then collects everything.

    `tick` is meant to run about once a second (`run`); it costs a list of the oldest
    generation's unfrozen objects, which the freezing keeps to about a second's worth.
    """

    def __init__(
        self,
        *,
        min_objects: int = 1_000,
        full_every_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: Fewer objects than this in the oldest generation are not worth a freeze (each one
        #: may take a cycle that became garbage since its last collection out of reach).
        self.min_objects = min_objects
        self.full_every_s = full_every_s
        self.clock = clock
        self._last_full = clock()
        #: Objects frozen by this policy, and cycles found by its full collections, in all.
        self.frozen = 0
        self.reclaimed = 0

    def tick(self) -> None:
        if self.clock() - self._last_full >= self.full_every_s:
            self.collect_all()
            return
        old = len(gc.get_objects(2))
        if old >= self.min_objects:
            # Freezing takes the young generations too: collect them first, so that no cycle
            # that is garbage already is frozen with the survivors. A young collection walks
            # only what is new since the last one (milliseconds).
            gc.collect(1)
            gc.freeze()
            self.frozen += old

    def collect_all(self) -> int:
        """Collect every generation, the frozen objects included, then freeze the survivors;
        return the number of unreachable objects found (which the freezing kept alive)."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._last_full = self.clock()
        self.reclaimed += found
        took = time.perf_counter() - started
        if found:
            log.warning(
                "full collection: %d unreachable objects reclaimed, in %.0f ms",
                found,
                took * 1000,
            )
        else:
            log.info("full collection: nothing unreachable, in %.0f ms", took * 1000)
        return found

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.tick()
