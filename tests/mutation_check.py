"""Do the tests fail when the code is wrong? A hand-written mutation check of the places where a slip would go
unnoticed in a training run (the filter selection, the L1 term, the budget search and fill, the surgery, the pruning
state in a checkpoint, the matching and hard negatives, decode + NMS, the VOC metric, the augmentation, the samplers,
the data formats' box conventions, the metric conventions; the compare tool and ``--reference``, the device timing
and the training-rate report, the DDP rank check, loss guard and re-wrap, export / load / predict, checkpoint files,
the classification data and GTSRB's track split, the data root's folder, the learning-rate restart, default boxes
given per branch, the network's L2Norm, pool5 and background prior; the folder-layout tool, split files from other
tools, train.py's one-line errors for a missing data root, a refused setting, a schedule that cannot run or a
misspelt option, --predict over a folder).

Each mutant is one plausible slip (a flipped comparison, a dropped term, a reversed order). It is applied in a
throwaway git worktree of HEAD (this checkout's ``.venv`` linked in), the named test files run with ``-x`` and
``-m "not slow"`` (so a slip that only the slow tests would catch reads as a survivor: a fast test is what is asked
for), and the mutant is *killed* when they fail. A mutant that survives is a test to write, unless it is marked
``equivalent`` (the code computes the same thing either way: the reason is given).

    python -m tests.mutation_check              # every mutant: ~1.5 h on a 2-core CPU (the sum of the timed runs)
    python -m tests.mutation_check S4 B1 M2     # some of them

Not part of ``make test`` (it runs the suite dozens of times); run it after changing one of these places. It
checks the committed HEAD (code and tests): commit a new test before asking whether it kills a mutant.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEL, SP, BU, SU = "callbacks/selection.py", "callbacks/sparsity.py", "callbacks/budget.py", "callbacks/surgery.py"
MET, BOX, DE = "lightning_modules/metrics.py", "lightning_modules/box_ops.py", "lightning_modules/detector.py"
TR, SA, RE = "datamodules/transforms.py", "datamodules/samplers.py", "callbacks/report.py"
CO, GT, VO, EX = "datamodules/coco.py", "datamodules/gtsdb.py", "datamodules/voc.py", "lightning_modules/export.py"
ST, TH, RT = "callbacks/state.py", "callbacks/throughput.py", "callbacks/retrain.py"
CL, CLM, SSD = "datamodules/classification.py", "lightning_modules/classifier.py", "lightning_modules/ssd.py"
CMP, DI, CMN, CK = "callbacks/compare.py", "callbacks/distributed.py", "lightning_modules/common.py", \
    "lightning_modules/checkpoints.py"
LAY = "datamodules/voc_layout.py"

T_PRUNE = ["tests/test_pruning.py", "tests/test_prune_train.py", "tests/test_baselines.py"]
T_SP = ["tests/test_pruning.py", "tests/test_prune_train.py", "tests/test_classifier.py", "tests/test_persistence.py"]
T_MET = ["tests/test_metrics.py"]
T_BOX = ["tests/test_ssd.py", "tests/test_pruning.py", "tests/test_voc.py"]
T_DATA = ["tests/test_transforms.py", "tests/test_voc.py", "tests/test_real_data.py", "tests/test_ddp.py"]
T_DE = ["tests/test_voc.py", "tests/test_metrics.py", "tests/test_ssd.py", "tests/test_train.py",
        "tests/test_real_data.py", "tests/test_coco_gtsdb.py"]
T_CMP = ["tests/test_compare.py"]
T_REP = ["tests/test_compare.py", "tests/test_train.py"]
T_DDP = ["tests/test_ddp.py"]
T_EXP = ["tests/test_persistence.py", "tests/test_prune_train.py", "tests/test_classifier.py"]
T_TH = ["tests/test_throughput.py"]
T_CL = ["tests/test_classifier.py"]
T_FMT = ["tests/test_coco_gtsdb.py", "tests/test_voc.py", "tests/test_real_data.py", "tests/test_persistence.py"]

# name, file, the text (found exactly once), its replacement, the tests to run, and "equivalent: why" or ""
MUTANTS: list[tuple[str, str, str, str, list[str], str]] = [
    ("S1", SEL, "(t == 0).flatten(1)", "(t != 0).flatten(1)", T_PRUNE, ""),
    ("S2", SEL, "& ((sp_f >= s_F) | (sp_g >= s_G))", "& ((sp_f >= s_F) & (sp_g >= s_G))", T_PRUNE, ""),
    ("S3", SEL, "prune = (sp_f >= s_F_min)", "prune = (sp_f > s_F_min)", T_PRUNE, ""),
    ("S4", SEL, "torch.argsort(sp_f[cand], stable=True)", "torch.argsort(-sp_f[cand], stable=True)", T_PRUNE, ""),
    ("S5", SEL, "math.ceil(target / round_to)", "math.floor(target / round_to)", T_PRUNE, ""),
    ("S6", SEL, "            mask[idx] = False\n", "", T_PRUNE, ""),
    ("S7", SEL, "if not is_last_phase and layers", "if is_last_phase and layers", T_PRUNE, ""),
    ("S8", SEL, "target = max(kept, min(min_width, width))", "target = max(kept, min_width)", T_PRUNE, ""),
    ("P1", SP, "        torch._foreach_clamp_min_(magnitude, 0.0)\n", "", T_SP, ""),
    ("P2", SP, "lr_of.get(id(w), 0.0) * self.l1_lambda", "self.l1_lambda", T_SP, ""),
    ("P3", SP, "return {name: v > tau for name, v in norm.items()}",
     "return {name: v >= tau for name, v in norm.items()}",
     T_SP, ""),
    ("P5", SP, "return scores / scores.mean().clamp(min=1e-12)", "return scores / scores.max().clamp(min=1e-12)", T_SP,
     ""),
    ("P6", SP, "n = max(blocks, key=blocks.get)", "n = min(blocks, key=blocks.get)", T_SP, ""),
    ("P7", SP, "alpha=self.l1_lambda)", "alpha=-self.l1_lambda)", T_SP, ""),
    ("Bu1", BU, "- one[c][m] + self.at_base[m] for a, c", "- one[c][m] for a, c", T_SP, ""),
    ("Bu2", BU, "own = hw[conv] * conv.in_channels *", "own = hw[conv] *", T_SP, ""),
    ("Bu3", BU, "for c in cols) / len(cols)", "for c in cols)", T_SP, ""),
    ("Su1", SU, "if len(idx) >= n:", "if len(idx) > n:", T_SP, ""),
    ("Su2", SU, "for pname, st in saved_state.items():", "for pname, st in list(saved_state.items())[:0]:", T_SP, ""),
    ("Su3", SU, "cols = (d1[:, None] * span + torch.arange(span))", "cols = (d1[:, None] + torch.arange(span))", T_SP,
     ""),
    ("M1", MET, "torch.maximum(a[..., 0], b[..., 0]) + 1)", "torch.maximum(a[..., 0], b[..., 0]))", T_MET, ""),
    ("M2", MET, "above = iou > iou_threshold", "above = iou >= iou_threshold", T_MET,
     "equivalent: IoUs within 1e-4 of the threshold are decided again in float64 with '>' just below"),
    ("M3", MET, "ignore = hit & gt_difficult[best]", "ignore = gt_difficult[best]", T_MET, ""),
    ("M4", MET, 'reduce="amin"', 'reduce="amax"', T_MET, ""),
    ("M5", MET, "torch.linspace(0, 1, 11,", "torch.linspace(0, 1, 10,", T_MET, ""),
    ("M6", MET, "mpre = mpre.flip(0).cummax(0).values.flip(0)", "mpre = mpre", T_MET, ""),
    ("M7", MET, "torch.bincount(gt_labels[~gt_difficult]", "torch.bincount(gt_labels", T_MET, ""),
    ("M8", MET, "srt = torch.argsort(det_scores, descending=True, stable=True)",
     "srt = torch.argsort(det_scores, descending=False, stable=True)", T_MET, ""),
    ("B1", BOX, "idx = torch.where(best >= iou_threshold, first, -1)",
     "idx = torch.where(best > iou_threshold, first, -1)",
     T_BOX, ""),
    ("B2", BOX, 'gid, "amax").view(n, p)', 'gid, "amin").view(n, p)', T_BOX, ""),
    ("B3", BOX, "k = neg_pos_ratio * pos.sum(dim=1, keepdim=True)",
     "k = (neg_pos_ratio + 1) * pos.sum(dim=1, keepdim=True)", T_BOX, ""),
    ("B4", BOX, "neg_ce = ce.masked_fill(pos, -1.0)", "neg_ce = ce.clone()", T_BOX, ""),
    ("B5", BOX, "sup = (iou > iou_threshold) & later & valid[:, :, None]", "sup = (iou > iou_threshold) & later", T_BOX,
     "equivalent: a box that is not a candidate is never kept, so its row of the matrix is never read"),
    ("B6", BOX, "    for _ in range(k):\n        new = valid", "    for _ in range(1):\n        new = valid", T_BOX,
     ""),
    ("B7", BOX, "kept = kept[rank < top_k]", "kept = kept[rank <= top_k]", T_BOX, ""),
    ("B8", BOX, "softmax(dim=-1)[..., 1:]", "softmax(dim=-1)[..., :-1]", T_BOX, ""),
    ("B9", BOX, "anchors.repeat(n, 1)).clamp(0.0, 1.0)", "anchors.repeat(n, 1))", T_BOX, ""),
    ("B10", BOX, "return keep[scores[keep].argsort(descending=True)]", "return keep", T_BOX, ""),
    ("B11", BOX, "valid = scores > conf_threshold  # (N, k, C)", "valid = scores >= conf_threshold  # (N, k, C)", T_BOX,
     ""),
    ("B12", BOX, 'sl1 = F.smooth_l1_loss(torch.where(pos[..., None], loc.float(), reg_t), reg_t, reduction="none")',
     'sl1 = F.smooth_l1_loss(loc.float(), reg_t, reduction="none")', T_BOX, ""),
    ("T1", TR, "ok = ~(iou.min(axis=1) < min_iou)", "ok = ~(iou.max(axis=1) < min_iou)", T_DATA, ""),
    ("T2", TR, "& inside.any(axis=1)", "& inside.all(axis=1)", T_DATA, ""),
    ("T4", TR, "for _ in range(first + 1):", "for _ in range(first):", T_DATA, ""),
    ("T5", TR, "<= ch / cw <= 2.0", "<= ch / cw <= 3.0", T_DATA, ""),
    ("T6", TR, "(left - x0 + 0.5) * sx - 0.5", "(left - x0) * sx", T_DATA, ""),
    ("T7", TR, "top = int(rng.uniform(0, oh - h))", "top = int(rng.uniform(0, oh - h) / 2)", T_DATA, ""),
    ("T8", TR, "out = out[(cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)]", "out = out[(cx > x0) & (cx < x1)]", T_DATA,
     ""),
    ("Sa1", SA, "start = k * global_batch + self.rank * self.batch_size", "start = k * global_batch", T_DATA, ""),
    ("Sa2", SA, "g.manual_seed(self.seed + self.epoch)", "g.manual_seed(self.seed)", T_DATA, ""),
    ("Sa3", SA, "base = (self.seed * 1_000_003 + self.epoch) * 10_000_019", "base = self.seed * 10_000_019", T_DATA,
     ""),
    ("Sa4", SA, "return iter(range(self.rank, len(self.dataset), self.num_replicas))",
     "return iter(range(self.rank, len(self.dataset)))", T_DATA, ""),
    ("D1", DE, "torch.stack([px[:, 0] + 1, px[:, 1] + 1, px[:, 2], px[:, 3]], dim=1)",
     "torch.stack([px[:, 0], px[:, 1], px[:, 2], px[:, 3]], dim=1)", T_DE, ""),
    ("D2", DE, "            gt[:, :2] -= 1\n", "", T_DE, ""),
    ("D3", DE, 'top = d["scores"].argsort(descending=True)[:COCO_MAX_DETS]',
     'top = d["scores"].argsort(descending=False)[:COCO_MAX_DETS]', T_DE, ""),
    ("D4", DE, "math.cos(math.pi * min(it, hp.cosine_iters) / hp.cosine_iters)",
     "math.cos(math.pi * it / hp.cosine_iters)", T_DE, ""),
    ("D5", DE, "factor *= hp.warmup_factor + (1 - hp.warmup_factor) * it / hp.warmup_iters",
     "factor *= hp.warmup_factor", T_DE, ""),
    ("D6", DE, "(no_decay if p.ndim <= 1 else decay)", "(no_decay if p.ndim < 1 else decay)", T_DE, ""),
    ("R1", RE, '"speedup_x": round(dense["latency_ms"] / final["latency_ms"], 4)',
     '"speedup_x": round(final["latency_ms"] / dense["latency_ms"], 4)', T_DE, ""),
    ("C1", CO, "clip_box([x + 1.0, y + 1.0, x + bw, y + bh]", "clip_box([x, y, x + bw, y + bh]", T_FMT, ""),
    ("G1", GT, "clip_box([l + 1, t + 1, r + 1, b + 1]", "clip_box([l, t, r, b]", T_FMT, ""),
    ("V1", VO, 'not in ("0", "", "false")', 'not in ("0", "")', T_FMT, ""),
    ("V2", VO, "        boxes[:, :2] -= 1.0\n", "", T_FMT, ""),
    ("E1", EX, "return self.model((images - self.mean) / self.std)", "return self.model(images / self.std)", T_FMT, ""),
    ("F1", SP, "got, trial = max(trades, key=lambda t: t[0], default=(best_value, best))",
     "got, trial = min(trades, key=lambda t: t[0], default=(best_value, best))", T_SP, ""),
    ("F2", SP, "if any(architecture_cost(model, arch, m) > b for m, (b, _) in budgets.items()):  # BilinearCost",
     "if False:  # BilinearCost", T_SP, ""),
    ("F3", SP, "lo, hi = (mid, hi) if tried[mid] > 0 else (lo, mid)",
     "lo, hi = (lo, mid) if tried[mid] > 0 else (mid, hi)",
     T_SP, ""),
    ("F4", SP, "return {n: g / (max(cost[n], 1.0) / mean) ** exponent",
     "return {n: g * (max(cost[n], 1.0) / mean) ** exponent",
     T_SP, ""),
    ("F5", SP, "            if over_budget(mid):\n                lo = mid",
     "            if not over_budget(mid):\n                lo = mid",
     T_SP, ""),
    ("F6", SP, "        return tau_for_sparsity(scores, hi)\n",
     "        return tau_for_sparsity(scores, lo)\n", T_SP, ""),
    ("F7", SP, '"binding": max(budgets, key=lambda m: report[m]["spent"])',
     '"binding": min(budgets, key=lambda m: report[m]["spent"])',
     T_SP, ""),
    ("St1", ST, '"taylor": {k: v.cpu() for k, v in self.taylor.items()},', '"taylor": {},', T_SP, ""),
    ("St2", ST, "self.l1_candidates = {k: v.bool() for k, v in sd.get(\"l1_candidates\", {}).items()}",
     "self.l1_candidates = {}", T_SP, ""),
    ("St3", ST, "if p.l1_epochs[0] <= epoch < p.l1_epochs[1]:",
     "if p.l1_epochs[0] <= epoch <= p.l1_epochs[1]:", T_SP, ""),
    ("St4", ST, "return self.l1_epochs[1] - 1", "return self.l1_epochs[1]", T_SP, ""),
    ("V3", VO, "if c[2] - c[0] + 1 <= 0 or", "if c[2] <= c[0] or", T_FMT, ""),
    # the compare tool and the report's comparisons with a dense reference
    ("Cm1", CMP, "and (c2 < c or a2 > a)", "and (c2 < c and a2 > a)", T_CMP, ""),
    ("Cm2", CMP, "r.ratios[k] = round(a / b, 3)", "r.ratios[k] = round(b / a, 3)", T_CMP, ""),
    ("Cm3", CMP, 'if d.meta.get("seed") == r.meta.get("seed")', 'if d.meta.get("seed") != r.meta.get("seed")', T_CMP,
     ""),
    ("Cm4", CMP, "round(100 * (r.ref.accuracy - r.accuracy), 2)", "round(100 * (r.accuracy - r.ref.accuracy), 2)",
     T_CMP, ""),
    ("Cm5", CMP, '.get("init_from") == "l1" else', '.get("init_from") != "l1" else', T_CMP, ""),
    ("Cm6", CMP, 'd.group == r.group and d.meta.get("epochs") == r.meta.get("epochs")', "d.group == r.group", T_CMP,
     ""),
    ("Cm7", CMP, 'flat.update({f"{section}/{k}/{kk}": vv', 'flat.update({f"{section}/{kk}": vv', T_CMP, ""),
    ("Cm8", CMP, "round(final.get(n, 0) / w, 4) if w", "round(1 - final.get(n, 0) / w, 4) if w", T_CMP, ""),
    ("Cm9", CMP, "if run.resolve() not in [f.resolve() for f in found]:", "if True:", T_CMP, ""),
    ("R2", RE, "drop = {k: round(ref[k] - final[k], 6)", "drop = {k: round(final[k] - ref[k], 6)", T_REP, ""),
    ("R3", RE, 'drop[f"{key}_x"] = round(ref[key] / final[key], 4)',
     'drop[f"{key}_x"] = round(final[key] / ref[key], 4)', T_REP, ""),
    ("R4", RE, '_NOT_BUDGET = ("trainer.callbacks", ', '_NOT_BUDGET = ("trainer.callbacks", "trainer.max_epochs", ',
     T_REP, ""),
    ("R5", RE, 'round(final["device_throughput"] / dense["device_throughput"], 4)',
     'round(dense["device_throughput"] / final["device_throughput"], 4)', T_MET + T_REP, ""),
    ("R6", RE, "round(b / (med / 1e3), 1)", "round(b / med, 1)", T_MET + T_REP, ""),
    # DDP: every rank the same model, the same stop, the gradient of one process on the global batch
    ("DI1", DI, 'h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())', 'h.update(f"{name}|".encode())', T_DDP, ""),
    ("DI2", DI, "    if bad:\n", "    if len(bad) > 1:\n", T_DDP, ""),
    ("DI3", DI, "            dist.broadcast(b, src=0)\n", "            pass\n", T_DDP, ""),
    ("DI4", CMN, "flags[dist.get_rank()] = bad.float()", "flags[0] = bad.float()", T_DDP, ""),
    ("DI5", DE, "return total / dist.get_world_size()", "return total", T_DDP, ""),
    ("DI6", DI, "    strategy.configure_ddp()\n", "", T_DDP, ""),
    # export, loading and prediction
    ("E2", EX, "torch.tensor([w, h, w, h], dtype=torch.float32)", "torch.tensor([h, w, h, w], dtype=torch.float32)",
     T_EXP, ""),
    ("E3", EX, "_detector_from_spec({**hp, **overrides}, arch)\n        det.model.load_state_dict(model.state_dict())",
     "_detector_from_spec({**overrides, **hp}, arch)\n        det.model.load_state_dict(model.state_dict())", T_EXP,
     ""),
    ("E4", EX, "_detector_from_spec({**hp, **overrides}, arch)\n        state =",
     "_detector_from_spec({**overrides, **hp}, arch)\n        state =", T_EXP, ""),
    ("E5", EX, 'keep = d["scores"] >= score_threshold', 'keep = d["scores"] >= 0', T_EXP, ""),
    ("E6", EX, '"nms_threshold": hp.nms_threshold, "top_k"', '"nms_threshold": hp.conf_threshold, "top_k"', T_EXP, ""),
    ("CK1", CK, "weights_only=True, mmap=mmap)", "weights_only=False, mmap=mmap)", T_EXP, ""),
    # the training rate and what limits it
    ("Th1", TH, "steady_images = self._images * (len(self._steps) - 1) / len(self._steps)",
     "steady_images = self._images", T_TH, ""),
    ("Th2", TH, 'round(sum(waits) / host_loop, 4) if host_loop', 'round(sum(self._waits) / host_loop, 4) if host_loop',
     T_TH, ""),
    ("Th3", TH, "        if share > WAIT_SHARE_LIMIT:\n", "        if share >= 10 * WAIT_SHARE_LIMIT:\n", T_TH, ""),
    ("Th4", TH, "idle = max(0.0, 1 - sum(steps[1:]) / loop)", "idle = max(0.0, 1 - sum(steps) / loop)", T_TH, ""),
    ("Th5", TH, "steady_images * world / loop", "steady_images / loop", T_TH, ""),
    # the classification data sets (paper A's VGG16 rows) and the classifier's input
    ("Cl1", CL, ".reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)", ".reshape(-1, 32, 32, 3)", T_CL, ""),
    ("Cl2", CL, "val_idx, train_idx = order[:n_val], order[n_val:]", "val_idx, train_idx = order[:n_val], order",
     T_CL, ""),
    ("Cl3", CL, "img = img[:, ::-1]", "img = img[::-1]", T_CL, ""),
    ("Cl4", CL, "y, x = rng.integers(0, 9, size=2)", "y, x = rng.integers(0, 8, size=2)", T_CL, ""),
    ("Cl5", CL, "        if train:  # torchvision numbers", "        if False:  # torchvision numbers", T_CL, ""),
    ("Cl6", CLM, "x = (images.float() - self.mean) / self.std", "x = (images.float() - self.mean) / 255", T_CL, ""),
    ("Cl7", CL, "if groups is None or n == 0:", "if True:", T_CL, ""),
    ("Cl8", CL, 'return [(Path(p).parent.name, Path(p).stem.rsplit("_", 1)[0]) for p in images]',
     'return [(Path(p).parent.name, Path(p).stem) for p in images]', T_CL, ""),
    # --data.root given as the VOCdevkit folder or a VOC<year> folder
    ("V4", VO, 'if base.name == f"VOC{year}" and (base / "Annotations").is_dir():',
     'if (base / "Annotations").is_dir():', ["tests/test_voc.py"], ""),
    # VOC XML in other folder shapes laid out as the devkit (datamodules/voc_layout.py), and train.py's parse errors
    ("L1", LAY, "random.Random(seed).shuffle(order)", "random.Random(0).shuffle(order)", ["tests/test_voc_layout.py"],
     ""),
    ("L2", LAY, 'splits.get("train", []) + splits.get("val", [])', 'splits.get("train", [])',
     ["tests/test_voc_layout.py"], ""),
    ("L3", LAY, "prefix = any(n > 1 for n in seen.values())", "prefix = False", ["tests/test_voc_layout.py"], ""),
    ("L4", LAY, 're.sub(r"\\s+", "_", stem.strip())', "stem.strip()", ["tests/test_voc_layout.py"], ""),
    ("L5", LAY, "return min(candidates, key=", "return max(candidates, key=", ["tests/test_voc_layout.py"], ""),
    ("L6", LAY, 'return root if root.tag == "annotation" else None', "return root", ["tests/test_voc_layout.py"], ""),
    ("L14", LAY, "return stem if stem and stem in images and stem not in xmls else None",
     "return stem if stem and stem in images else None", ["tests/test_voc_layout.py"], ""),
    ("L15", LAY, "    if named:\n        return named[0]\n", "", ["tests/test_voc_layout.py"], ""),
    ("L16", LAY, '.replace("\\\\", "/")', "", ["tests/test_voc_layout.py"], ""),
    ("L17", VO, 'if not re.search(r"_(train|val|trainval|test)$", f.stem)', "", ["tests/test_voc.py"], ""),
    ("L18", VO, "hint = (f\" {root} holds {', '.join(f'VOC{y}' for y in years)}", "hint = (f\" {root} holds {years[0]}",
     ["tests/test_voc.py"], ""),
    ("Oc1", VO, "        if name not in class_to_idx and dropped is not None:\n            dropped[name] += 1\n",
     "        if name not in class_to_idx and dropped is not None:\n", ["tests/test_voc.py"], ""),
    ("Oc2", VO, 'dropped: Counter | None = Counter() if other_classes == "drop" else None', "dropped = None",
     ["tests/test_voc.py"], ""),
    ("L7", "train.py", "                raise cause\n", "                break\n", ["tests/test_voc_layout.py"], ""),
    # a missing data root stops in one line before the run starts (no traceback, no run folder, no W&B run)
    ("L8", "train.py", "            raise cause from None\n", "            raise\n", ["tests/test_real_data.py"], ""),
    ("L9", "train.py", "        drop_empty_run_dir()\n", "", ["tests/test_real_data.py"], ""),
    ("L10", VO, "                read_split(self.root, year, split)\n", "                pass\n",
     ["tests/test_real_data.py"], ""),
    ("L11", GT, "raise DataError(f\"{folder / 'gt.txt' if folder.is_dir() else folder} not found.", "print(f\"",
     ["tests/test_real_data.py"], ""),
    ("L12", CL, "        if not download:  # stops here", "        if False:  # stops here",
     ["tests/test_real_data.py"], ""),
    ("L13", CL, '*(folder / f"data_batch_{i}" for i in range(1, 6)), ', "", ["tests/test_classifier.py"], ""),
    # a schedule that cannot run stops before the W&B run starts (train.py's preflight of the pruning callbacks)
    ("Sc1", "train.py", "                cb.preflight(trainer, model, dm)\n", "                pass\n",
     ["tests/test_real_data.py"], ""),
    ("Sc2", "callbacks/state.py", "if kinds and PRUNING_STAGES[0] not in kinds:", "if False:",
     ["tests/test_real_data.py"], ""),
    # a misspelt option or a value of the wrong type: one line with the closest option (train.py's short_parse_error)
    ("Pe1", "train.py", "            if depth <= indent:  # out of", "            if False:  # out of",
     ["tests/test_train.py"], ""),
    ("Pe2", "train.py", "({owner.rpartition('.')[2]})", "({owner})", ["tests/test_train.py"], ""),
    ("Pe3", "train.py", "                keys.append(m.group(1))", "                pass", ["tests/test_train.py"], ""),
    ("Pe4", "train.py", 'accepted = [o[len(prefix):] for o in option_strings if o.startswith(prefix)]',
     "accepted = option_strings", ["tests/test_train.py"], ""),
    ("Pe5", "train.py", 'kwargs.setdefault("allow_abbrev", False)', "pass", ["tests/test_train.py"], ""),
    # the photometric distortion on the network's input size, after the geometric steps
    ("T9", TR, "return A.Compose([*geometric, *photometric]", "return A.Compose([*photometric, *geometric]",
     ["tests/test_transforms.py"], ""),
    # --predict over a folder: a corrupt file skipped and listed, two files of one stem drawn apart, never into the
    # images folder
    ("Pd1", EX, 'skipped[f.name] = "unreadable or corrupt image"', "raise",
     ["tests/test_persistence.py", "tests/test_classifier.py"], ""),
    ("Pd2", EX, "name = f.stem if stems[f.stem] == 1 else f.name", "name = f.stem", ["tests/test_persistence.py"], ""),
    ("Pd3", EX, "if dst.resolve() == src.resolve():", "if False:", ["tests/test_persistence.py"], ""),
    # a setting a class refuses when it is built: its message and the class, one line (train.py's config_error)
    ("Cf1", "train.py", 'and f.f_code.co_name == "__init__"', 'and f.f_code.co_name != "__init__"',
     ["tests/test_real_data.py"], ""),
    ("Cf2", "train.py", "    if not ours(frames[-1]):\n        return None\n", "", ["tests/test_real_data.py"], ""),
    ("Cf3", VO, "or batch_size < 1:", "or batch_size < 0:", ["tests/test_real_data.py"], ""),
    # split files from other tools: a byte-order mark, image file names for ids
    ("Sp1", VO, 'read_text(encoding="utf-8-sig").splitlines()', 'read_text(encoding="utf-8").splitlines()',
     ["tests/test_real_data.py"], ""),
    ("Sp2", VO, "return base, ids_file, [_id_of(base, i) for i in ids]", "return base, ids_file, ids",
     ["tests/test_real_data.py"], ""),
    ("Sp3", VO, "shared = [i for i in dict.fromkeys(ids) if (base, i) in training]",
     "shared = [i for i in dict.fromkeys(ids) if i in training]", ["tests/test_real_data.py"], ""),
    # default boxes given per branch: each branch's own max size (the old single generator took the next min)
    ("Pr1", SSD, "scales=[mins[i] / size, maxs[i] / size]", "scales=[mins[i] / size, (mins + maxs[-1:])[i + 1] / size]",
     ["tests/test_ssd.py"], ""),
    # the network itself: the L2Norm on conv4_3, pool5, the background prior of the conf head
    ("Sd1", SSD, "norm = x.pow(2).sum(dim=1, keepdim=True)", "norm = x.pow(2).sum(dim=-1, keepdim=True)",
     ["tests/test_ssd.py"], ""),
    ("Sd2", SSD, "x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps", "x.abs().sum(dim=1, keepdim=True) + self.eps",
     ["tests/test_ssd.py"], ""),
    ("Sd3", SSD, "features.append(self.l2norm(x))", "features.append(x := self.l2norm(x))", ["tests/test_ssd.py"], ""),
    ("Sd4", SSD, "x = F.max_pool2d(x, 3, 1, 1)", "x = F.avg_pool2d(x, 3, 1, 1)", ["tests/test_ssd.py"], ""),
    ("Sd5", SSD, "self.weight.view(1, -1, 1, 1)", "self.weight.flip(0).view(1, -1, 1, 1)", ["tests/test_ssd.py"], ""),
    ("Sd6", SSD, "math.log(background_prior * c / (1 - background_prior))",
     "math.log(background_prior / (1 - background_prior))", ["tests/test_ssd.py"], ""),
    # the learning-rate restart after a surgery
    ("Re1", RT, "return from_factor + (peak - from_factor) * max(t, 0) / up", "return peak * max(t, 0) / up",
     ["tests/test_persistence.py"], ""),
    ("Re2", RT, "peak * 0.5 * (1 + math.cos(", "peak * 0.5 * (1 - math.cos(", ["tests/test_persistence.py"], ""),
    ("Re3", RT, "up = int(round(ramp * span))", "up = 0", ["tests/test_persistence.py"], ""),
    ("Re4", RT, "from_factor = float(sched.get_last_lr()[0] / sched.base_lrs[0]) if sched.base_lrs[0] else 0.0",
     "from_factor = 1.0", ["tests/test_persistence.py"], ""),
    ("CK2", CK, "            if tmp.exists():\n                tmp.unlink()\n", "            pass\n", T_EXP, ""),
]


assert len({m[0] for m in MUTANTS}) == len(MUTANTS), "two mutants share a name"


def run(names: set[str] | None = None) -> int:
    """Every mutant (or those named): killed / survived / equivalent. Returns the number of surviving
    non-equivalent mutants (the exit status)."""
    chosen = [m for m in MUTANTS if not names or m[0] in names]
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "wt"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(wt), "HEAD"], check=True)
        try:
            if (ROOT / ".venv").exists():
                os.symlink(ROOT / ".venv", wt / ".venv")
            for name, path, old, new, tests, equivalent in chosen:
                f = wt / path
                src = f.read_text()
                if src.count(old) != 1:
                    print(f"{name}: the text to mutate is found {src.count(old)} times in {path}: update the list",
                          flush=True)
                    missed += 1
                    continue
                mutated = src.replace(old, new)
                try:  # a mutant that does not parse tests the parser, not the tests
                    compile(mutated, str(f), "exec")
                except SyntaxError as err:
                    print(f"{name}: the mutated {path} does not parse ({err.msg}, line {err.lineno}): update the list",
                          flush=True)
                    missed += 1
                    continue
                f.write_text(mutated)
                start = time.time()
                try:
                    r = subprocess.run([python, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                                        *tests], cwd=wt, capture_output=True, text=True)
                finally:
                    f.write_text(src)
                failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
                if r.returncode:
                    verdict = f"killed by {failed[0].split()[1] if failed else 'an error'}"
                elif equivalent:
                    verdict = f"survived ({equivalent})"
                else:
                    verdict = "SURVIVED: write a test that fails on it"
                    missed += 1
                print(f"{name} {path}: {verdict} [{time.time() - start:.0f} s]", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)
    return missed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still remove the worktree (``finally``)
    sys.exit(1 if run(set(sys.argv[1:]) or None) else 0)
