"""GC tuning for the long-running processes."""

from __future__ import annotations

import gc

from tickwire.core.runtime import GC_THRESHOLD, tune_gc


def test_tune_gc_raises_the_young_threshold_and_freezes_what_exists() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
