"""Runs side by side: ``python train.py --compare RUN [RUN ...] [--out DIR]``.

A RUN is a run folder (holding ``summary.json`` and ``config.yaml``) or a ``summary.json``; globs are expanded
here, so quoted patterns work too. Written into ``--out`` (default ``runs/compare``):

* ``compare.md`` — one row per run, grouped by data set and task: name, data set, model, method, seed, accuracy,
  its drop against the dense reference of the same group and schedule (when one is among the runs), params, MACs,
  size, latency, and each one's ratio against that reference (or, without one, against the run's own dense
  architecture, as ``summary.json`` reports it);
* ``pareto_<group>.png`` — accuracy against size, MACs and latency, the Pareto front marked, dense references
  drawn as lines;
* ``widths_<group>.png`` — every run's per-layer widths against the dense widths (a picture of paper A's Table 1).

Runs of different data sets or tasks are never put into one front. ``run_meta`` is also what ``train.py`` writes
into ``summary.json`` (``run``) and W&B's config (``method``, ``dataset``, ``model``, ``seed``) for grouping.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRUNING = ("SparsityInduction", "FilterSelection", "StructuredSurgery")


class CompareError(ValueError):
    """A --compare argument that names no run."""


def _init_args(cfg: dict, key: str) -> dict:
    node = cfg.get(key) or {}
    return node.get("init_args", node) if isinstance(node, dict) else {}


def run_meta(cfg: dict) -> dict:
    """What a run is, from its resolved config: ``method`` (``dense``; ``paper`` = paper A as written, the Θ_L1
    surgery; ``ours`` = the default method; a baseline's own name), ``dataset``, ``model``, ``seed``, ``task``
    (``detection`` / ``classification``) and ``epochs``."""
    trainer = cfg.get("trainer") or {}
    cbs = [cb for cb in trainer.get("callbacks") or [] if isinstance(cb, dict)]
    names = {str(cb.get("class_path", "")).rsplit(".", 1)[-1]: cb.get("init_args") or {} for cb in cbs}
    if "SparsityInduction" in names:
        method = "paper" if names.get("StructuredSurgery", {}).get("init_from") == "l1" else "ours"
    elif "OneShotFilterPruning" in names:
        method = str(names["OneShotFilterPruning"].get("criterion", "oneshot"))
    elif "ModelPruningOnce" in names or "ModelPruning" in names:
        method = "modelpruning"
    else:
        method = "dense"
    data, model = _init_args(cfg, "data"), _init_args(cfg, "model")
    data_cls = str((cfg.get("data") or {}).get("class_path", "")).rsplit(".", 1)[-1]
    if data.get("synthetic"):
        dataset = "synthetic"
    elif data.get("root"):
        dataset = Path(str(data["root"]).rstrip("/")).name or str(data["root"])
    else:
        dataset = data_cls or "unknown"
    model_cls = str((cfg.get("model") or {}).get("class_path", "")).rsplit(".", 1)[-1]
    task = "classification" if "Classifier" in model_cls else "detection"
    arch = f"SSD{model.get('size', data.get('image_size', 300))}" if task == "detection" else model_cls
    width = model.get("width_mult", 1.0)
    return {"method": method, "dataset": dataset, "model": f"{arch} x{width:g}" if width != 1.0 else arch,
            "seed": cfg.get("seed_everything"), "task": task, "epochs": trainer.get("max_epochs")}


@dataclass
class Run:
    name: str
    path: Path
    summary: dict
    meta: dict
    ref: Run | None = None
    ratios: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "top1" if self.meta["task"] == "classification" else "map50"

    @property
    def accuracy(self) -> float | None:
        return self.summary.get("final", {}).get(self.metric)

    @property
    def group(self) -> str:
        return f"{self.meta['dataset']} ({self.meta['task']})"

    def final(self, key: str):
        return self.summary.get("final", {}).get(key)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run folders for the arguments (folders, summary.json files, globs); each named once, in order."""
    found: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise CompareError(f"--compare: {pat!r} matches nothing")
        for hit in hits:
            p = Path(hit)
            run = p.parent if p.name == "summary.json" else p
            if not (run / "summary.json").is_file():
                if any(c in pat for c in "*?[") and p.is_dir():
                    continue  # a glob may sweep up folders that are not runs (configs, checkpoints)
                raise CompareError(f"--compare: {hit} is not a run folder (no summary.json in {run})")
            if run.resolve() not in [f.resolve() for f in found]:
                found.append(run)
    if not found:
        raise CompareError(f"--compare: no run folder with a summary.json among {patterns}")
    return found


def load_run(run: Path) -> Run:
    summary = json.loads((run / "summary.json").read_text())
    meta = summary.get("run")
    if not meta:  # summaries written before ``run`` existed: read the run's config
        cfg_path = run / "config.yaml"
        meta = run_meta(yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {})
    return Run(run.name, run, summary, meta)


def attach_references(runs: list[Run]) -> None:
    """Each pruned run's dense reference: a dense run of the same group and schedule (epochs), the same seed if
    there is one, else the first. Ratios are against it; without one, the run's own ``compression``."""
    dense = [r for r in runs if r.meta["method"] == "dense"]
    for r in runs:
        same = [d for d in dense if d.group == r.group and d.meta.get("epochs") == r.meta.get("epochs")
                and d.meta.get("model") == r.meta.get("model")]
        if r.meta["method"] != "dense" and same:
            r.ref = next((d for d in same if d.meta.get("seed") == r.meta.get("seed")), same[0])
        if r.ref is not None:
            for k in ("params", "macs", "size_mb", "latency_ms"):
                a, b = r.ref.final(k), r.final(k)
                r.ratios[k] = round(a / b, 3) if a and b else None
        else:
            c = r.summary.get("compression", {})
            r.ratios = {"params": c.get("params_x"), "macs": c.get("macs_x"), "size_mb": c.get("size_x"),
                        "latency_ms": c.get("speedup_x")}


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(runs: list[Run]) -> str:
    lines = ["# Runs compared", "",
             "Drop: accuracy points below the dense reference of the same data set, model and epochs (same seed when "
             "there is one). Ratios x: against that reference, or, without one (marked *), against the run's own "
             "dense architecture. Latency: batch-1 CPU median, as each run measured it.", ""]
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        metric = members[0].metric
        lines += [f"## {group}", "",
                  f"| run | data set | model | method | seed | {metric} | reference | drop (points) | params | params x "
                  "| MMACs | MACs x | size MB | size x | latency ms | speed-up x |",
                  "|" + "---|" * 16]
        for r in members:
            star = "" if r.ref is not None or r.meta["method"] == "dense" else "*"
            drop = None if r.ref is None or r.accuracy is None or r.ref.accuracy is None else \
                round(100 * (r.ref.accuracy - r.accuracy), 2)
            macs = r.final("macs")
            lines.append(" | ".join([
                f"| {r.name}", r.meta["dataset"], r.meta["model"], r.meta["method"], str(r.meta.get("seed")),
                _num(r.accuracy, ".4f"), r.ref.name if r.ref else "-", _num(drop, ".2f"),
                _num(r.final("params"), ","), _num(r.ratios.get("params"), ".2f") + star,
                _num(macs / 1e6 if macs else None, ".1f"), _num(r.ratios.get("macs"), ".2f") + star,
                _num(r.final("size_mb"), ".3f"), _num(r.ratios.get("size_mb"), ".2f") + star,
                _num(r.final("latency_ms"), ".2f"), _num(r.ratios.get("latency_ms"), ".2f") + star]) + " |")
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal cost and higher or equal accuracy, one strictly."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_pareto(runs: list[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("params", 1e6, "parameters (M)"), ("macs", 1e9, "GMACs per image"),
                 ("latency_ms", 1.0, "CPU latency, batch 1 (ms)")]
    metric = runs[0].metric
    methods = list(dict.fromkeys(r.meta["method"] for r in runs))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    for ax, (key, unit, label) in zip(axes, axes_spec):
        pts = [(r, r.final(key) / unit, r.accuracy) for r in runs if r.final(key) and r.accuracy is not None]
        for m in methods:
            xs = [x for r, x, _ in pts if r.meta["method"] == m]
            ys = [y for r, _, y in pts if r.meta["method"] == m]
            ax.scatter(xs, ys, s=60, color=colours[m], label=m, zorder=3,
                       marker="s" if m == "dense" else "o", edgecolors="black", linewidths=0.5)
        for r, x, y in pts:
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, alpha=0.8)
        front = pareto_front([(x, y) for _, x, y in pts])
        if len(front) > 1:
            ax.step([pts[i][1] for i in front], [pts[i][2] for i in front], where="post", color="black",
                    linestyle="-", linewidth=1.2, alpha=0.6, label="Pareto front", zorder=2)
        elif front:
            ax.scatter([pts[front[0]][1]], [pts[front[0]][2]], s=200, facecolors="none", edgecolors="black",
                       label="Pareto front", zorder=2)
        for i, r in enumerate(r for r in runs if r.meta["method"] == "dense" and r.accuracy is not None):
            ax.axhline(r.accuracy, color=colours["dense"], linestyle="--", linewidth=1, alpha=0.7,
                       label="dense reference (accuracy)" if i == 0 else None)
            if r.final(key):
                ax.axvline(r.final(key) / unit, color=colours["dense"], linestyle=":", linewidth=1, alpha=0.7,
                           label="dense reference (cost)" if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (test split)")
        ax.set_title(f"{metric} vs {label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{runs[0].group}: accuracy against cost (upper left is better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_widths(runs: list[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ref = next((r for r in runs if r.meta["method"] == "dense"), None)
    dense = (ref.summary.get("channels") if ref else None) or next(
        (r.summary.get("dense_channels") for r in runs if r.summary.get("dense_channels")), None)
    layers = list(dense or runs[0].summary.get("channels", {}))
    pruned = [r for r in runs if r.meta["method"] != "dense" and r.summary.get("channels")]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(layers) + 4), 5.5), constrained_layout=True)
    if dense:
        ax.bar(x, [dense.get(n, 0) for n in layers], width=0.8, color="lightgrey", edgecolor="grey",
               label="dense width")
    w = 0.8 / max(len(pruned), 1)
    for i, r in enumerate(pruned):
        ch = r.summary["channels"]
        ax.bar(x - 0.4 + w * (i + 0.5), [ch.get(n, 0) for n in layers], width=w,
               label=f"{r.name} ({r.meta['method']}, {r.final('params') or 0:,} params)")
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("output channels (filters)")
    ax.set_xlabel("layer (network order)")
    ax.set_title(f"{runs[0].group}: kept width per layer against the dense widths")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(patterns: list[str], out: Path) -> dict[str, Path | list[Path]]:
    """Load the runs, pick each one's dense reference, write ``compare.md`` and the PNGs into ``out``."""
    runs = [load_run(p) for p in find_runs(patterns)]
    attach_references(runs)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compare.md"
    md.write_text(table(runs) + "\n")
    images = []
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        images.append(plot_pareto(members, out / f"pareto_{_slug(group)}.png"))
        images.append(plot_widths(members, out / f"widths_{_slug(group)}.png"))
    return {"table": md, "images": images, "runs": runs}


def flat_summary(summary: dict) -> dict:
    """``summary.json``'s sections as the flat keys W&B dashboards use: ``final/*``, ``dense/*``, ``compression/*``,
    with a pruning budget ``budgets/*`` and, with ``--reference``, ``reference/*`` and ``drop/*`` (nested dicts such
    as ``ap50_per_class`` one level deeper: ``final/ap50_per_class/<class>``)."""
    flat = {}
    for section in ("final", "dense", "compression", "budgets", "reference", "drop"):
        for k, v in (summary.get(section) or {}).items():
            if isinstance(v, dict):
                flat.update({f"{section}/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, str))})
            elif isinstance(v, list):
                flat[f"{section}/{k}"] = "; ".join(map(str, v))
            elif v is not None:
                flat[f"{section}/{k}"] = v
    return flat


def widths_rows(summary: dict) -> list[list]:
    dense, final = summary.get("dense_channels") or {}, summary.get("channels") or {}
    return [[n, w, final.get(n, 0), round(final.get(n, 0) / w, 4) if w else None] for n, w in dense.items()]


def log_summary_to_wandb(experiment, summary: dict) -> None:
    """The run's summary as flat W&B summary keys, and its widths as a W&B Table with a bar chart."""
    import wandb

    experiment.summary.update(flat_summary(summary))
    table = wandb.Table(columns=["layer", "dense width", "final width", "kept fraction"], data=widths_rows(summary))
    experiment.log({"widths": table,
                    "widths_chart": wandb.plot.bar(table, "layer", "kept fraction", title="kept fraction per layer")})


def log_compare_to_wandb(result: dict, project: str, out: Path) -> str:
    """One W&B run (``job_type="compare"``) holding the comparison table and the PNGs; returns its folder."""
    import wandb

    runs = result["runs"]
    run = wandb.init(project=project, job_type="compare", dir=str(out), name=f"compare-{len(runs)}-runs",
                     config={"runs": [str(r.path) for r in runs]})
    try:
        cols = ["run", "dataset", "model", "method", "seed", "accuracy", "params", "macs", "latency_ms", "reference"]
        rows = [[r.name, r.meta["dataset"], r.meta["model"], r.meta["method"], r.meta.get("seed"), r.accuracy,
                 r.final("params"), r.final("macs"), r.final("latency_ms"), r.ref.name if r.ref else None] for r in runs]
        run.log({"compare/runs": wandb.Table(columns=cols, data=rows),
                 **{f"compare/{p.stem}": wandb.Image(str(p)) for p in result["images"]}})
        return str(Path(run.dir).parent)
    finally:
        run.finish()
