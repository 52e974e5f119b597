"""Model size / cost measurements for the compression report and ``summary.json``.

MACs and parameter counts come from Torch-Pruning's ``count_ops_and_params``; latency is measured here
(median of repeated batch-1 forward passes on the CPU of the machine that ran, of the network's inference form:
BatchNorm folded into the convolutions, channels-last; ``LATENCY_FORM``).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def model_size_mb(model: nn.Module) -> float:
    """fp32 size of the saved weights in MB (10^6 bytes), the unit of the papers' tables."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()) / 1e6


def example_input(model: nn.Module, input_size: int | None = None, batch: int = 1) -> torch.Tensor:
    """The network's own example input (pruning contract), or a ``batch x 3 x input_size x input_size`` image."""
    if input_size is None:
        return model.example_input(batch)
    ref = next(model.parameters(), None)
    return torch.zeros(batch, 3, input_size, input_size, device=ref.device if ref is not None else "cpu")


def cpu_latency_ms(model: nn.Module, input_size: int | None = None, repeats: int = 10) -> float:
    """Median wall time of one batch-1 forward pass on CPU, in milliseconds."""
    return paired_latency_ms({"model": model}, input_size, rounds=repeats)["model"]


def model_stats(model: nn.Module, input_size: int | None = None, latency: bool = True) -> dict[str, float]:
    """params, MACs (one input), fp32 size (MB) and CPU latency (ms, batch 1) of a network (input: its own
    ``example_input`` unless ``input_size`` is given)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_input(model, input_size))
    model.train(was_training)
    stats = {"params": int(params), "macs": int(macs), "size_mb": round(model_size_mb(model), 4)}
    if latency:
        stats["latency_ms"] = round(cpu_latency_ms(model, input_size), 3)
    return stats


LATENCY_FORM = "batch 1, BatchNorm folded, channels-last"  # what latency_ms times (summary.json names it)
LATENCY_THREADS = 1  # CPU latency is timed on this many threads: comparable across machines and data-loader load


@torch.no_grad()
def paired_latency_ms(models: dict[str, nn.Module], input_size: int | None = None, rounds: int = 30,
                      budget_s: float = 20.0, threads: int | None = LATENCY_THREADS) -> dict[str, float]:
    """Median batch-1 CPU latency of several models measured together, interleaved round by round, so that a
    shared, noisy machine slows them alike (the ratio is what the report quotes), on ``threads`` intra-op threads
    (None: torch's current setting), each in its inference form (``deploy_copy``: BatchNorm folded, channels-last).
    Big models get fewer rounds (at least 5) so the timing stays within about ``budget_s``."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _paired_latency_ms(models, input_size, rounds, budget_s)
    finally:
        torch.set_num_threads(before)


def interleaved_ms(calls: dict, rounds: int = 30, budget_s: float | None = None) -> dict:
    """Median wall time in ms of each ``calls[key]()``, all timed round by round, interleaved, after two warm-up
    rounds; with ``budget_s``, slow calls get fewer rounds (at least 5) so the timing stays within about that."""
    t0 = time.perf_counter()
    for call in calls.values():
        call()
    one_round = time.perf_counter() - t0
    for call in calls.values():
        call()
    if budget_s is not None:
        rounds = max(5, min(rounds, int(budget_s / max(one_round, 1e-6))))
    times: dict = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            times[k].append(timed_call_ms(call, _CPU))
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _paired_latency_ms(models: dict[str, nn.Module], input_size: int | None, rounds: int,
                       budget_s: float) -> dict[str, float]:
    from lightning_modules.common import deploy_copy

    ms = {k: deploy_copy(m).cpu() for k, m in models.items()}  # the inference form: BatchNorm folded, channels-last
    x = torch.randn_like(example_input(next(iter(ms.values())), input_size)).contiguous(memory_format=torch.channels_last)
    return interleaved_ms({k: (lambda m=m: m(x)) for k, m in ms.items()}, rounds, budget_s)


def paired_onnx_latency_ms(paths: dict[str, str], rounds: int = 30, budget_s: float = 20.0,
                           threads: int = LATENCY_THREADS or 1) -> dict[str, float]:
    """As ``paired_latency_ms``, for exported ``model.onnx`` files run by ONNX Runtime's CPU provider (BatchNorm
    folded, graph optimisations on, ``threads`` intra-op threads): the deployment path of the exported file. (On the
    2-core development CPU it gives the same speed-up ratios as the eager inference form, at about 0.92x its time.)"""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    first = next(iter(sessions.values())).get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in first.shape]
    x = {first.name: np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)}
    return interleaved_ms({k: (lambda s=s: s.run(None, x)) for k, s in sessions.items()}, rounds, budget_s)


def autocast_dtype(precision) -> torch.dtype | None:
    """The autocast dtype of a Lightning ``precision`` setting (``bf16-mixed`` -> bfloat16, ``16-mixed`` -> float16),
    None for full precision."""
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else None


def training_device(trainer) -> torch.device:
    """The device this rank trained on. Not the model's parameters': at the end of ``fit`` and ``test`` Lightning's
    strategy teardown moves the module back to the CPU, so on a GPU they say "cpu" by the time the report is made."""
    return torch.device(trainer.strategy.root_device)


@torch.no_grad()
def paired_device_timing(models: dict[str, nn.Module], input_size: int | None, device: torch.device, batch: int = 32,
                         rounds: int = 20, dtype: torch.dtype | None = None) -> dict[str, dict]:
    """On the device that trained: each model's batch-1 latency (ms) and throughput (images/s at ``batch``), in the
    inference form (``deploy_copy``: BatchNorm folded, channels-last) under autocast to ``dtype`` (the run's mixed
    precision; None: fp32), the models interleaved round by round after warm-up; medians of CUDA-event timings (of
    ``perf_counter`` on a CPU). Network only (no decoding). The models themselves are left as they are."""
    from lightning_modules.common import deploy_copy

    device = torch.device(device)
    ms = {k: deploy_copy(m).to(device) for k, m in models.items()}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    out: dict[str, dict] = {k: {} for k in ms}
    for b, key in ((1, "device_latency_ms"), (batch, "device_throughput")):
        x = torch.randn_like(example_input(next(iter(ms.values())), input_size, b)).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {k: [] for k in ms}
        with autocast:
            for m in ms.values():
                for _ in range(3):
                    m(x)
            for _ in range(rounds):
                for k, m in ms.items():
                    times[k].append(timed_call_ms(lambda m=m: m(x), device))
        for k, v in times.items():
            med = statistics.median(v)
            out[k][key] = round(med, 3) if b == 1 else round(b / (med / 1e3), 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    form = f"{'fp32' if dtype is None else str(dtype).replace('torch.', '') + ' autocast'}, BatchNorm folded, channels-last"
    for k in out:
        out[k].update(device=name, device_batch=batch, device_form=form)
    return out


_CPU = torch.device("cpu")


def timed_call_ms(call, device: torch.device) -> float:
    """Wall time of one ``call()`` in ms: CUDA events around it on a GPU (synchronised), ``perf_counter`` else."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def measure_model(trainer, pl_module, with_map: bool = True) -> dict:
    """model_stats of the network plus, if asked, its quality figure on the data module's test split
    (``<quality>_before_pruning``, e.g. ``map50_before_pruning``, with the epoch at whose end it was taken); also its
    architecture (``channels``, and ``num_branches`` for a detector), so the final report can time a model of that
    shape again."""
    # no latency: the final report times the dense architecture again, interleaved with the final model
    stats = model_stats(pl_module.model, latency=False)
    stats["channels"] = dict(pl_module.model.channels)
    if hasattr(pl_module.model, "num_branches"):
        stats["num_branches"] = pl_module.model.num_branches
    if with_map and trainer.datamodule is not None:
        # named for what it is: the model in the middle of training, not an equal-budget dense baseline
        dm = trainer.datamodule
        if not hasattr(dm, "test_ds"):
            dm.setup("test")
        stats[f"{pl_module.quality}_before_pruning"] = pl_module.evaluate(dm.test_dataloader())
        stats[f"{pl_module.quality}_before_pruning_epoch"] = trainer.current_epoch
    return stats


def compression(dense: dict, final: dict) -> dict[str, float]:
    def ratio(key: str) -> float:
        return round(dense[key] / final[key], 4) if final.get(key) else float("nan")

    out = {
        "params_x": ratio("params"),
        "size_x": ratio("size_mb"),
        "macs_x": ratio("macs"),
        "speedup_x": round(dense["latency_ms"] / final["latency_ms"], 4) if final.get("latency_ms") else float("nan"),
    }
    if final.get("device_latency_ms") and dense.get("device_latency_ms"):  # timed on the GPU that trained
        out["device_speedup_x"] = ratio("device_latency_ms")
        out["device_throughput_x"] = round(final["device_throughput"] / dense["device_throughput"], 4)
    return out


def write_summary(path: Path, summary: dict) -> Path:
    """Write ``summary.json`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def reference_drop(reference_dir: str | Path, final: dict, config: dict | None = None) -> tuple[dict, dict, list[str]]:
    """``reference`` and ``drop`` for summary.json from an equal-budget dense run (its run folder or summary.json).

    ``drop`` is reference minus final for the quality figure (positive = the pruned model is worse) and the ratios
    reference / final for params, MACs, size and latency. Also returns the settings in which the two runs'
    resolved configs differ outside the pruning callbacks and the logger (an equal-budget comparison has none)."""
    ref_path = Path(reference_dir)
    ref_path = ref_path / "summary.json" if ref_path.is_dir() else ref_path
    if not ref_path.is_file():
        raise FileNotFoundError(f"--reference {reference_dir}: no summary.json there (give the dense run's folder)")
    ref = json.loads(ref_path.read_text())["final"]
    quality = [k for k in ("map50", "top1", "coco_map") if k in final and k in ref]  # the task's quality figures
    if not quality:
        raise ValueError(f"--reference {reference_dir}: its summary has no quality figure in common with this run "
                         f"(this run: {sorted(final)}); is it a run of the same task?")
    reference = {"run": str(ref_path.parent), **{k: ref[k] for k in (*quality, "params", "macs", "size_mb", "latency_ms")
                                                 if k in ref}}
    drop = {k: round(ref[k] - final[k], 6) for k in quality}
    for key in ("params", "macs", "size_mb", "latency_ms"):
        if ref.get(key) and final.get(key):
            drop[f"{key}_x"] = round(ref[key] / final[key], 4)
    differences = []
    ref_cfg_path = ref_path.parent / "config.yaml"
    if config is not None and ref_cfg_path.is_file():
        import yaml

        differences = config_differences(yaml.safe_load(ref_cfg_path.read_text()), config)
    return reference, drop, differences


_NOT_BUDGET = ("trainer.callbacks", "trainer.logger", "trainer.default_root_dir", "run_name", "ckpt_path", "reference",
               "evaluate", "export_onnx", "config", "trainer.enable_progress_bar")


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring what does not change the budget
    (pruning and other callbacks, logger, run folder)."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        if path in _NOT_BUDGET:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, path + ".")
        elif _comparable(va) != _comparable(vb):
            out.append(f"{path}: {va!r} vs {vb!r}")
    return out


def _comparable(value):
    """A config value without the memory addresses of objects jsonargparse could not serialise."""
    import re

    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))
