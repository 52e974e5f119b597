"""Small timing helpers shared by the benchmarks: medians of repeated runs, a markdown row printer."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    return median_times({"": fn}, repeats, warmup)[""]


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each ``fn()`` in seconds, the repeats taken in turn (one of each, then the next round), so
    that a slow spell of a shared machine falls on every row alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
