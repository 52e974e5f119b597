"""Pruning methods side by side, with the protocol of the method issue: same data, seed, optimiser and epochs; only
the pruning differs; the accuracy drop is against the equal-budget dense run *of the same seed*; several seeds.

Rows (``--methods``, any subset, in this order):

* ``dense``  — the config without its pruning callbacks (the reference of every other row, per seed);
* ``dense_restart`` — the dense config with ours' learning-rate restart (``StructuredSurgery``'s ``retrain_lr``) at
  the epoch of ours' last surgery, and no pruning: what the schedule alone does to the unpruned network;
* ``ours``   — the config as it is (the default method);
* ``paper``  — ``--paper_config`` (default ``experiments/demo_paper.yaml``): paper A as written;
* ``l1norm`` — Li et al. 2017: one shot at the end of epoch ``--prune_epoch``, each layer cut to *ours'* final widths
  by filter L1 norm, then retraining;
* ``tp_params`` / ``tp_macs`` — Torch-Pruning's global magnitude pruner (group L1), one shot at ``--prune_epoch``, its
  ratio searched to ours' final parameter count / MACs (whether it got within 3 % is reported);
* ``ours_at_tp`` — ours with its budgets replaced by Torch-Pruning's operating point: ``tp_params``' final parameter
  count *and* MACs, as absolute budgets (``target_params`` / ``target_macs``). Where TP at equal params ends with
  fewer MACs than ours (its global ranking cuts the costly high-resolution layers), this compares the two at TP's size
  and speed at once; needs ``tp_params``;
* ``tp_params_restart`` — ``tp_params`` retrained with ours' learning-rate restart (``StructuredSurgery``'s
  ``retrain_lr`` settings in the config): separates what the retraining schedule gives from what the pruning does;
* ``scratch`` — no pruning at all: the dense config with every width scaled by one factor, searched so that the
  network has ours' final parameter count, trained from scratch for the same epochs (Liu et al. 2019, "Rethinking
  the value of network pruning": the baseline any pruning method must beat to be worth its machinery);
* ``scratch_widths`` — no pruning either: ours' final widths (the architecture the method found) trained from
  scratch for the same epochs (Liu et al. 2019's "Scratch-E"): whether the method's gain over ``scratch`` comes
  from the widths it chose or from the trained weights it keeps;
* ``modelpruning`` — Lightning's ModelPruning, global unstructured L1 masks zeroing as many conv weights as ours
  removes; the tensors stay dense, so no size or speed gain is expected or claimed.

Every run is ``train.py`` (``--reference`` = the dense run of its seed); arguments after ``--`` go to every run, e.g.
the data set::

    python -m benchmarks.bench_methods --out runs/bench/facemask --seeds 0,1,2 -- \\
        --data.synthetic null --data.root ../shared/data/facemask --data.train_sets "[[2007, trainval]]" \\
        --data.test_set "[2007, test]" --data.classes auto

Detectors and classifiers alike: the quality column is the module's own figure (``map50`` or ``top1`` in
``summary.json``). Latencies: the final models of the first seed, timed together in this process, interleaved, medians (batch 1, CPU,
1 thread), in PyTorch eager and, from the exported ``model.onnx``, in ONNX Runtime (the deployment path).
The table gives medians over seeds, the spread (min-max) and the mean of mAP and drop, and each method's seed-paired
difference to Torch-Pruning at equal parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import row

ROOT = Path(__file__).resolve().parents[1]
PRUNING = ("SparsityInduction", "FilterSelection", "StructuredSurgery")
METHODS = ("dense", "dense_restart", "ours", "paper", "l1norm", "tp_params", "tp_params_restart", "tp_macs",
           "ours_at_tp", "scratch", "scratch_widths", "modelpruning")
BUDGET_KEYS = ("target_params_x", "target_macs_x", "target_params", "target_macs")


def _config(base: Path, out: Path, name: str, extra_callbacks: list[dict], keep_pruning: bool,
            budget: dict | None = None) -> Path:
    """The config of run ``name`` (``<method>-s<seed>``), written to ``out/<name>.yaml``: one file a run, since a
    baseline's target comes from its seed's run of ours, and benches of several seeds may share ``out`` at once.
    ``budget`` (e.g. ``{"target_params": n, "target_macs": m}``) replaces ``SparsityInduction``'s budgets."""
    cfg = yaml.safe_load(base.read_text())
    cbs = [cb for cb in cfg["trainer"]["callbacks"] if keep_pruning or not cb["class_path"].endswith(PRUNING)]
    for cb in cbs if budget else ():
        if cb["class_path"].endswith("SparsityInduction"):
            kept = {k: v for k, v in (cb.get("init_args") or {}).items() if k not in BUDGET_KEYS}
            cb["init_args"] = {**kept, **budget}
    cfg["trainer"]["callbacks"] = extra_callbacks + cbs
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["default_root_dir"] = str(out)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(out: Path, name: str, cfg: Path, seed: int, train_args: list[str], reference: str | None) -> dict:
    summary = out / name / "summary.json"
    if not summary.is_file():
        t0 = time.time()
        cmd = [sys.executable, "train.py", "--config", str(cfg), "--run_name", name, "--seed_everything", str(seed),
               *train_args, *(["--reference", reference] if reference else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(summary.read_text())


def _callback_state(run: Path, name: str) -> dict | None:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return next((v for k, v in ckpt["callbacks"].items() if name in k), None)


def run_seed(args, out: Path, seed: int, train_args: list[str]) -> dict[str, dict]:
    base, paper = ROOT / args.config, ROOT / args.paper_config
    runs: dict[str, dict] = {}
    ref = str(out / f"dense-s{seed}")

    def launch(method: str, callbacks: list[dict], keep_pruning: bool, config: Path = base,
               extra: tuple | list[str] = (), reference: str | None = ref, budget: dict | None = None) -> dict:
        name = f"{method}-s{seed}"
        cfg = _config(config, out, name, callbacks, keep_pruning, budget)
        return _run(out, name, cfg, seed, [*train_args, *extra], reference)

    runs["dense"] = launch("dense", [], keep_pruning=False, reference=None)
    runs["ours"] = ours = launch("ours", [], keep_pruning=True)
    if "dense_restart" in args.methods:
        state = _callback_state(out / f"ours-s{seed}", "SparsityInduction") or {}
        epoch = (state.get("surgeries") or [{}])[-1].get("epoch", args.prune_epoch)
        settings = {k: v for k, v in retrain_settings(base, restart=False).items() if k != "retrain_lr"}
        cb = {"class_path": "benchmarks.baselines.ScheduleRestart", "init_args": {"epoch": epoch, **settings}}
        runs["dense_restart"] = launch("dense_restart", [cb], keep_pruning=False)
    if "paper" in args.methods:
        runs["paper"] = launch("paper", [], keep_pruning=True, config=paper)
    one_shot = {
        "l1norm": {"criterion": "l1norm", "channels": ours["channels"]},
        "tp_params": {"criterion": "tp_global_magnitude", "target_params": ours["final"]["params"]},
        "tp_params_restart": {"criterion": "tp_global_magnitude", "target_params": ours["final"]["params"],
                              **retrain_settings(base, restart=True)},
        "tp_macs": {"criterion": "tp_global_magnitude", "target_macs": ours["final"]["macs"]},
    }
    for name, init in one_shot.items():
        if name in args.methods:
            cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning", "init_args": {**init, "epoch": args.prune_epoch}}
            runs[name] = launch(name, [cb], keep_pruning=False)
            state = _callback_state(out / f"{name}-s{seed}", "OneShotFilterPruning")
            runs[name]["reached"] = reached = (state or {}).get("reached") or {}
            target = init.get("target_params") or init.get("target_macs")
            if target and reached.get("target") != target:  # a finished run is reused as it is: it must be this one
                raise RuntimeError(f"{out / f'{name}-s{seed}'} was pruned to {reached.get('target')}, not to this "
                                   f"seed's ours ({target:,}): a stale run (was ours re-run?); remove it")
    if "ours_at_tp" in args.methods:
        tp = runs["tp_params"]["final"]
        budget = {"target_params": int(tp["params"]), "target_macs": int(tp["macs"])}
        runs["ours_at_tp"] = launch("ours_at_tp", [], keep_pruning=True, budget=budget)
        reported = runs["ours_at_tp"].get("budgets") or {}
        given = {f"target_{m}": b["budget"] for m, b in reported.items() if m != "binding"}
        if given and given != budget:  # a finished run is reused as it is: it must be this one
            raise RuntimeError(f"{out / f'ours_at_tp-s{seed}'} was pruned to {given}, not to this seed's tp_params "
                               f"({budget}): a stale run (was tp_params re-run?); remove it")
    if "scratch" in args.methods:
        override, got = uniform_widths(out / f"dense-s{seed}" / "export", ours["final"]["params"])
        runs["scratch"] = launch("scratch", [], keep_pruning=False, extra=override)
        target = ours["final"]["params"]
        runs["scratch"]["reached"] = {"measure": "params", "got": got, "target": target,
                                      "within": abs(got - target) <= 0.03 * target}
    if "scratch_widths" in args.methods:
        runs["scratch_widths"] = launch("scratch_widths", [], keep_pruning=False,
                                        extra=architecture_args(Path(ours["export"]["json"]).parent))
    if "modelpruning" in args.methods:
        dense_model = load_exported_net(out / f"dense-s{seed}" / "export")
        conv_weights = sum(m.weight.numel() for m in dense_model.modules() if isinstance(m, torch.nn.Conv2d))
        amount = round((ours["dense"]["params"] - ours["final"]["params"]) / conv_weights, 4)
        cb = {"class_path": "benchmarks.baselines.ModelPruningOnce", "init_args": {"amount": amount, "prune_epoch": args.prune_epoch}}
        runs["modelpruning"] = launch("modelpruning", [cb], keep_pruning=False)
    return runs


def retrain_settings(config: Path, restart: bool) -> dict:
    """The config's ``StructuredSurgery`` retraining schedule (``retrain_lr*``), for a baseline; ``restart``: force
    the restart with the config's peak and ramp (or the defaults)."""
    cfg = yaml.safe_load(config.read_text())
    init = next((cb.get("init_args") or {} for cb in cfg["trainer"]["callbacks"]
                 if cb["class_path"].endswith("StructuredSurgery")), {})
    out = {k: v for k, v in init.items() if k.startswith("retrain_lr")}
    if restart:
        out["retrain_lr"] = "restart"
    return out


def load_exported_net(folder: Path) -> torch.nn.Module:
    """The network of an export folder, detector or classifier (by its model.json ``format``)."""
    spec = json.loads((folder / "model.json").read_text())
    if str(spec.get("format", "")).startswith("vgg16-classifier"):
        from lightning_modules.classifier import load_classifier

        return load_classifier(folder).model
    from lightning_modules.export import load_detector

    return load_detector(folder).model


def _build_at(spec: dict, channels: dict[str, int], hidden: int | None) -> torch.nn.Module:
    arch = spec["architecture"]
    if hidden is not None:
        from lightning_modules.classifier import build_vgg16

        return build_vgg16(len(spec["classes"]), channels, 1.0, arch["size"], hidden)
    from lightning_modules.ssd import build_ssd

    return build_ssd(arch["size"], len(spec["classes"]) + 1, channels, 1.0, arch["num_branches"], False,
                     batch_norm=arch.get("batch_norm", False))


def architecture_args(export: Path) -> list[str]:
    """``train.py`` arguments that build a fresh network with the architecture of an exported one (its widths, a
    classifier's hidden layer, a detector's detection branches)."""
    arch = json.loads((export / "model.json").read_text())["architecture"]
    args = ["--model.channels", json.dumps(arch["channels"])]
    for key in ("hidden", "num_branches"):  # a classifier's hidden layer; a detector's branches (paper A's k-det)
        if arch.get(key) is not None:
            args += [f"--model.{key}", str(arch[key])]
    return args


def uniform_widths(dense_export: Path, target_params: int) -> tuple[list[str], int]:
    """``train.py`` arguments that give the dense network of ``dense_export`` every width (and a classifier's hidden
    layer) times one factor, the factor bisected so that the parameter count is as close to ``target_params`` as
    integer widths allow; and the count reached."""
    spec = json.loads((dense_export / "model.json").read_text())
    dense = spec["architecture"]["channels"]
    hidden0 = spec["architecture"].get("hidden")

    def at(r: float) -> tuple[dict[str, int], int | None, int]:
        ch = {k: max(1, round(w * r)) for k, w in dense.items()}
        hid = None if hidden0 is None else max(1, round(hidden0 * r))
        return ch, hid, sum(p.numel() for p in _build_at(spec, ch, hid).parameters())

    lo, hi = 0.0, 1.0
    best = at(1.0)
    for _ in range(24):
        mid = (lo + hi) / 2
        cand = at(mid)
        if abs(cand[2] - target_params) < abs(best[2] - target_params):
            best = cand
        lo, hi = (mid, hi) if cand[2] < target_params else (lo, mid)
    ch, hid, got = best
    args = ["--model.channels", json.dumps(ch)] + ([] if hid is None else ["--model.hidden", str(hid)])
    return args, got


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3f}"
    return f"{med:.3f} ({min(values):.3f}-{max(values):.3f}; mean {statistics.fmean(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/demo.yaml")
    ap.add_argument("--paper_config", default="experiments/demo_paper.yaml")
    ap.add_argument("--out", default="runs/bench_methods")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prune_epoch", type=int, default=3, help="epoch at whose end the one-shot baselines prune")
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        ap.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "ours_at_tp" in args.methods and "tp_params" not in args.methods:
        ap.error("ours_at_tp is pruned to tp_params' operating point: add tp_params to --methods")
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {seed: run_seed(args, out, seed, train_args) for seed in seeds}

    from callbacks.report import paired_latency_ms, paired_onnx_latency_ms

    first = per_seed[seeds[0]]
    quality = "top1" if "top1" in first["dense"]["final"] else "map50"  # the module's own quality figure
    models = {k: load_exported_net(Path(s["export"]["json"]).parent) for k, s in first.items()}
    size = next(iter(models.values())).size
    lat = paired_latency_ms(models, size, rounds=30, budget_s=120)
    onnx_files = {k: Path(s["export"]["json"]).parent / "model.onnx" for k, s in first.items()}
    ort_lat = (paired_onnx_latency_ms({k: str(p) for k, p in onnx_files.items()}, rounds=30, budget_s=120)
               if all(p.is_file() for p in onnx_files.values()) else None)
    methods = [m for m in METHODS if m in first]
    results = {}
    print(f"{len(seeds)} seed(s) {seeds}; config {args.config}; train.py args: {' '.join(train_args) or '(none)'}\n")
    print(row("method", f"{'top-1' if quality == 'top1' else 'mAP@0.5'} median (range)", "drop vs dense, points", "params", "size x", "MMACs", "MACs x",
              "CPU latency ms (seed 0)", "speed-up", "ONNX Runtime ms (speed-up)", "note"))
    print(row(*["---"] * 11))
    for m in methods:
        runs = [per_seed[s][m] for s in seeds]
        maps = [r["final"][quality] for r in runs]
        drops = [100 * r["drop"][quality] for r in runs if "drop" in r]
        params = statistics.median(r["final"]["params"] for r in runs)
        macs = statistics.median(r["final"]["macs"] for r in runs)
        dense_p = first["dense"]["final"]["params"]
        dense_m = first["dense"]["final"]["macs"]
        note = ""
        reached = [r.get("reached") for r in runs if r.get("reached")]
        reached = [x for x in reached if not x["within"]] or reached  # a miss on any seed is what the note shows
        if reached:
            note = "; ".join(f"{x['measure']} {x['got']:,} of {x['target']:,}" + ("" if x["within"] else " (NOT within 3 %)")
                             for x in reached[:1])
        ort_ms = ort_lat[m] if ort_lat else None
        results[m] = {quality: maps, "drop_points": drops, "params": params, "macs": macs, "latency_ms": lat[m],
                      "onnxruntime_ms": ort_ms, "reached": reached}
        print(row(m, _spread(maps), _spread(drops) if drops else "-", f"{int(params):,}", f"{dense_p / params:.2f}",
                  f"{macs / 1e6:.0f}" if macs >= 1e8 else f"{macs / 1e6:.2f}", f"{dense_m / macs:.2f}", f"{lat[m]:.1f}" if lat[m] >= 10 else f"{lat[m]:.2f}", f"{lat['dense'] / lat[m]:.2f}x",
                  f"{ort_ms:.2f} ({ort_lat['dense'] / ort_ms:.2f}x)" if ort_ms else "-", note))
    if "tp_params" in methods:  # seed-paired: the same seed's data order and initialisation on both sides
        print(f"\nPaired with Torch-Pruning at equal params, same seed ({', '.join(map(str, seeds))}), points:")
        for m in methods:
            if m in ("dense", "tp_params"):
                continue
            diffs = [100 * (per_seed[s][m]["final"][quality] - per_seed[s]["tp_params"]["final"][quality]) for s in seeds]
            results[m]["vs_tp_params_points"] = diffs
            print(f"  {m}: median {statistics.median(diffs):+.1f} (" + ", ".join(f"{d:+.1f}" for d in diffs) + ")")
    (out / "methods.json").write_text(json.dumps({"seeds": seeds, "train_args": train_args, "results": results}, indent=2))


if __name__ == "__main__":
    main()
