"""Method comparison on the synthetic set, at the same total epochs and (about) the same final size:

* ours — experiments/demo.yaml (paper A's 4 phases inside one fit, paper B), with HookTimer for the overhead;
* dense — the same run without pruning (the upper bound at full size);
* l1norm — Li et al. 2017: one shot at the end of epoch 3 (where ours starts), each layer cut to *our final
  widths* by filter L1 norm, then retraining for the remaining epochs;
* tp_global — Torch-Pruning's global magnitude pruner (group L1), one shot at the end of epoch 3, its ratio
  searched to *our final parameter count*, then retraining;
* modelpruning — Lightning's ModelPruning, global unstructured L1 masks at the end of epoch 3 zeroing as many
  conv weights as ours removes; the tensors stay dense, so no speed-up is expected and none is claimed.

Every run is ``train.py`` with the demo config (same data, seed, optimiser, schedule, epochs); only the pruning
callbacks differ. Latencies are measured afterwards in this one process, the models interleaved, medians.

python -m benchmarks.bench_methods [--out runs/bench_methods] [--only ours,dense,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import row

ROOT = Path(__file__).resolve().parents[1]
PRUNING = ("SparsityInduction", "FilterSelection", "StructuredSurgery")
METHODS = ("ours", "dense", "l1norm", "tp_global", "modelpruning")


def _config(out: Path, name: str, extra_callbacks: list[dict], keep_pruning: bool) -> Path:
    cfg = yaml.safe_load((ROOT / "experiments/demo.yaml").read_text())
    cbs = [cb for cb in cfg["trainer"]["callbacks"] if keep_pruning or not cb["class_path"].endswith(PRUNING)]
    cfg["trainer"]["callbacks"] = extra_callbacks + cbs
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["default_root_dir"] = str(out)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(out: Path, name: str, cfg: Path) -> dict:
    summary = out / name / "summary.json"
    if not summary.is_file():
        t0 = time.time()
        proc = subprocess.run([sys.executable, "train.py", "--config", str(cfg), "--run_name", name],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(summary.read_text())


def _nonzero_params(model) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_methods")
    ap.add_argument("--only", default=",".join(METHODS))
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    timer = {"class_path": "benchmarks.baselines.HookTimer"}
    ours = _run(out, "ours", _config(out, "ours", [timer], keep_pruning=True))
    target_params, widths, first = ours["final"]["params"], ours["channels"], 3
    dense_params = ours["dense"]["params"]
    runs = {"ours": ours}
    if "dense" in only:
        runs["dense"] = _run(out, "dense", _config(out, "dense", [], keep_pruning=False))
    if "l1norm" in only:
        cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning",
              "init_args": {"criterion": "l1norm", "epoch": first, "channels": widths}}
        runs["l1norm"] = _run(out, "l1norm", _config(out, "l1norm", [cb], keep_pruning=False))
    if "tp_global" in only:
        cb = {"class_path": "benchmarks.baselines.OneShotFilterPruning",
              "init_args": {"criterion": "tp_global_magnitude", "epoch": first, "target_params": target_params}}
        runs["tp_global"] = _run(out, "tp_global", _config(out, "tp_global", [cb], keep_pruning=False))
    if "modelpruning" in only:
        from lightning_modules.ssd import build_ssd

        dense_model = build_ssd(300, 6, width_mult=0.125, batch_norm=True)
        conv_weights = sum(m.weight.numel() for m in dense_model.modules() if isinstance(m, torch.nn.Conv2d))
        amount = round((dense_params - target_params) / conv_weights, 4)
        cb = {"class_path": "benchmarks.baselines.ModelPruningOnce", "init_args": {"amount": amount, "prune_epoch": first}}
        runs["modelpruning"] = _run(out, "modelpruning", _config(out, "modelpruning", [cb], keep_pruning=False))

    from callbacks.report import model_stats, paired_latency_ms
    from lightning_modules.export import load_detector

    models = {k: load_detector(Path(s["export"]["json"]).parent).model for k, s in runs.items()}
    lat = paired_latency_ms(models, 300, rounds=30, budget_s=600)
    dense_ref = runs.get("dense", ours)
    dense_lat = lat.get("dense")
    results = {}
    print(row("method", "VOC07 mAP@0.5", "params (non-zero)", "MMACs", "size MB (fp32, dense storage)",
              "CPU latency ms (batch 1, median)", "speed-up vs dense"))
    print(row(*["---"] * 7))
    for k, s in runs.items():
        st = model_stats(models[k], 300, latency=False)
        nz = _nonzero_params(models[k])
        results[k] = {"map50": s["final"]["map50"], "params": st["params"], "nonzero_params": nz,
                      "macs": st["macs"], "size_mb": st["size_mb"], "latency_ms": lat[k]}
        sp = f"{dense_lat / lat[k]:.2f}x" if dense_lat else "-"
        print(row(k, f"{s['final']['map50']:.3f}", f"{st['params']:,} ({nz:,})", f"{st['macs'] / 1e6:.0f}",
                  st["size_mb"], f"{lat[k]:.1f}", sp))
    print(f"\nours: dense measured before its first threshold (end of epoch 3): mAP {ours['dense']['map50_before_pruning']:.3f}, "
          f"{ours['dense']['params']:,} params; compression {ours['compression']}")

    hooks = json.loads((out / "ours" / "hook_times.json").read_text())
    acting = sorted(int(e) for e, h in hooks["hooks"].items() if any(v > 0.01 for v in h.values()))
    acting = [e for e in acting if str(e) in hooks["epoch_seconds"]]
    epoch_s = sum(hooks["epoch_seconds"][str(e)] for e in acting)
    cb_s = sum(sum(v for k, v in hooks["hooks"][str(e)].items() if k != "dense_measurement") for e in acting)
    meas_s = sum(hooks["hooks"][str(e)].get("dense_measurement", 0.0) for e in acting)
    surgery = [r["seconds"] for r in _pruning_state(out / "ours")["surgeries"]]
    print(f"\ncallback overhead in the epochs where they act ({acting}): {cb_s:.1f} s of {epoch_s:.1f} s = "
          f"{100 * cb_s / epoch_s:.2f}% (of which the one-off dense measurement for the report: {meas_s:.1f} s; "
          f"without it {100 * (cb_s - meas_s) / epoch_s:.2f}%); surgeries {surgery} s")
    results["overhead"] = {"epochs": acting, "epoch_seconds": epoch_s, "callback_seconds": cb_s,
                           "dense_measurement_seconds": meas_s, "surgery_seconds": surgery}
    (out / "methods.json").write_text(json.dumps(results, indent=2))


def _pruning_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return next(v for k, v in ckpt["callbacks"].items() if "SparsityInduction" in k)


if __name__ == "__main__":
    main()
