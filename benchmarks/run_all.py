"""Run every benchmark in turn (``make bench``); each prints its own markdown table."""

import runpy
import sys

for name in ("bench_metric", "bench_augment", "bench_train_step", "bench_surgery"):
    print(f"\n## {name}\n", flush=True)
    sys.argv = [name]
    runpy.run_module(f"benchmarks.{name}", run_name="__main__")
