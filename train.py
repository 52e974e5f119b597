"""Train (and compress) an SSD detector: ``python train.py --config experiments/<name>.yaml [--key value ...]``.

Runs ``fit``, then ``test`` on the final model, exports it (``<run>/export/``: model.safetensors, model.json,
model.onnx), writes ``summary.json`` into the run directory and prints ``summary: <path>`` as its last line.
Every key of the config can be overridden on the command line.

Other modes:
  --ckpt_path CKPT             resume training from a checkpoint (pruned or not, mid-schedule included)
  --evaluate CKPT|EXPORT_DIR   with --config: test that model on the data module's test split, no training
                               (--model.compile applies to it)
  --export CKPT [--out DIR]    export a checkpoint (no config needed)
  --predict CKPT|EXPORT_DIR --images DIR|IMAGE [--out DIR] [--score_threshold S] [--device D] [--compile [MODE]]
                               detections drawn + detections.json (classifiers: class + score per image)
  --compare RUN [RUN ...] [--out DIR] [--wandb_project P]   runs side by side: compare.md + Pareto/width PNGs
"""

from __future__ import annotations

import netrc
import os
import re
import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger

from callbacks.compare import CompareError, log_summary_to_wandb, run_meta
from callbacks.distributed import RanksInconsistentError, check_ranks, end_distributed
from callbacks.report import (LATENCY_FORM, LATENCY_THREADS, autocast_dtype, compression, model_stats,
                              paired_device_timing, paired_latency_ms, reference_drop, training_device,
                              write_summary)
from callbacks.state import ScheduleError, callback_order_check
from callbacks.throughput import TrainingThroughput
from datamodules.voc import DataError, data_classes
from lightning_modules.common import COMPILE_MODES
from lightning_modules.common import NonFiniteLossError
from lightning_modules.export import AtomicCheckpointIO, CheckpointError, export_detector, load_detector, predict_folder
from lightning_modules.ssd import WeightsMismatchError


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def configure_wandb_mode() -> bool:
    """With no W&B credentials and no WANDB_MODE, log offline. Returns True when it chose offline."""
    if "WANDB_MODE" in os.environ or _wandb_credentials():
        return False
    os.environ["WANDB_MODE"] = "offline"
    return True


def data_error_cause(err: BaseException | None) -> DataError | None:
    """The DataError that ``err`` was raised from, if any: jsonargparse wraps what a linked function or a constructor
    raises (``--data.classes auto`` reads the annotations while the arguments are parsed; the data module checks its
    folders when it is built) in its own errors, a dump of the parsed arguments."""
    for _ in range(20):
        if err is None or isinstance(err, DataError):
            return err
        err = err.__cause__ or err.__context__
    return None


class ConfigError(ValueError):
    """A setting one of the project's classes refused when it was built (its own message, the class named)."""


def config_error(err: ValueError) -> ConfigError | None:
    """jsonargparse reports a constructor's ValueError or TypeError as a dump of the arguments it was given. When
    the first error in that chain was raised by the project's own code (a setting it checks: ``size must be 300 or
    512``), that error, with the class that raised it; None for anything else (a library's own failure)."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    first = chain[-1]
    if first is err or not isinstance(first, (ValueError, TypeError)) or first.__traceback__ is None:
        return None
    root = Path(__file__).resolve().parent

    def ours(frame) -> bool:
        path = Path(frame.f_code.co_filename).resolve()
        return path.is_relative_to(root) and not path.is_relative_to(root / ".venv")

    frames, tb = [], first.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if not ours(frames[-1]):
        return None
    # the constructor jsonargparse called: the outermost __init__ of the project's code
    owner = next((f.f_locals["self"] for f in frames if ours(f) and f.f_code.co_name == "__init__"
                  and "self" in f.f_locals), None)
    return ConfigError(f"{type(owner).__name__ + ': ' if owner is not None else ''}{first}")


def _init_options(class_path: str) -> list[str]:
    """The keyword arguments a class's constructor takes (its options in a config), [] when it cannot be imported."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def short_parse_error(message: str, option_strings: list[str]) -> str | None:
    """One line for the parse errors a user makes most (a misspelt option in a config file or on the command line, a
    value of the wrong type), with the closest option and the list of those accepted; None for anything else, which
    keeps jsonargparse's full report. ``option_strings``: the parser's ``--options``."""
    key = re.match(r'Parser key "([\w.]+)":', message)
    lines = message.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*- Problem with given class_path '", line)]
    if key and len(starts) == 1:  # one class of the union was meant: follow its nested keys down to the error
        keys, owner, leaf, indent = [key.group(1)], "", None, -1  # owner: the innermost class path
        for line in lines[starts[0]:]:
            depth = len(line) - len(line.lstrip(" -"))
            if depth <= indent:  # out of that class's report without reaching its error: a shape not known here
                break
            indent, text = depth, re.sub(r"^[\s-]*", "", line).rstrip()  # the text after the indent and bullet
            if m := re.fullmatch(r"Problem with given class_path '([\w.]+)':", text):
                owner = m.group(1)
            elif m := re.fullmatch(r'Parser key "([\w.]+)":', text):
                keys.append(m.group(1))
            else:
                leaf = text
                break
        if leaf is not None:
            where = f"{'.'.join(keys)} ({owner.rpartition('.')[2]})"
            option = re.fullmatch(r"Option '(\w+)' is not accepted", leaf)
            if option:
                accepted = _init_options(owner)
                listed = f" Its options: {', '.join(accepted)}." if accepted else ""
                closest = _did_you_mean(option.group(1), accepted) or "."
                return f"{where}: no option {option.group(1)!r}{closest}{listed}"
            return f"{where}: {leaf}"
    config = re.fullmatch(r"Parser key \"config\": (File does not exist|Path is not a file): '(.+)'", message.strip())
    if config:  # a misspelt --config: the closest file of its folder, and the configs there
        path = Path(config.group(2))
        folder = path if path.is_dir() else path.parent
        configs = sorted(f.name for f in folder.glob("*.yaml")) if folder.is_dir() else []
        close = (_did_you_mean(path.name, configs) if not path.is_dir() else "") or "."
        listed = f" The configs in {folder}: {', '.join(configs)}." if configs else ""
        return f"--config {path}: {config.group(1).lower()}{close}{listed}"
    group = re.fullmatch(r"Group '([\w.]+)' does not accept option '(\w+)'", message.strip())
    if group:
        prefix = f"--{group.group(1)}."
        accepted = [o[len(prefix):] for o in option_strings if o.startswith(prefix)]
        return f"{message.strip()}{_did_you_mean(group.group(2), accepted)}"
    unknown = re.fullmatch(r"unrecognized arguments: (.+)", message.strip())
    if unknown:
        first = unknown.group(1).split()[0].split("=")[0]
        hint = _did_you_mean(first, option_strings) if first.startswith("--") else ""
        return f"{message.strip()}{hint}"
    return None


class SSDArgumentParser(LightningArgumentParser):
    """Lightning's parser, except that a data error met while parsing stops with its own message
    (``data_error_cause``), and a misspelt option or a value of the wrong type with one line (``short_parse_error``)
    instead of the usage and a dump of the config. Abbreviated options are refused (``--trainer.max_epoch`` is not
    ``--trainer.max_epochs``): a YAML key must be spelt out, and an abbreviation that works today could name another
    option after an update."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        cause = data_error_cause(ex)
        if cause is not None:
            raise cause
        if self.exit_on_error:  # a parser that raises instead (jsonargparse's nested ones) is left as it is
            short = short_parse_error(str(message), [o for a in self._actions for o in a.option_strings])
            if short is not None:
                raise ConfigError(f"{short} (all options: python train.py --help)")
        super().error(message, ex)


class SSDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume training from this checkpoint; 'auto': from the run's newest one, if any")
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name (default: timestamp)")
        parser.add_argument("--evaluate", type=str | None, default=None,
                            help="test this checkpoint or export folder on the data module's test split (no training)")
        parser.add_argument("--export_onnx", type=bool, default=True, help="also write model.onnx at the end of a run")
        parser.add_argument("--reference", type=str | None, default=None,
                            help="run folder (or summary.json) of the equal-budget dense run: fills 'reference' and "
                                 "'drop' in summary.json")
        # the model's classes follow the data's; "auto" is read from the training annotations here, once
        # (the DataModule class resolves them: VOC's "auto", COCO's category names, GTSDB's 43 signs or 4 groups)
        parser.link_arguments("data", "model.init_args.classes", compute_fn=data_classes, apply_on="parse")
        parser.link_arguments("data.init_args.image_size", "model.init_args.size", apply_on="parse")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = data_error_cause(err)
            if cause is not None:
                raise cause from None
            refused = config_error(err)
            if refused is None:
                raise
            raise refused from None

    def before_instantiate_classes(self) -> None:
        """Give every run its own folder ``<default_root_dir>/<run_name>`` for logs, checkpoints and summary.
        The name is fixed once and handed to DDP child processes through the environment. A resumed run
        (``--ckpt_path <run>/checkpoints/x.ckpt`` without ``--run_name``) continues in the checkpoint's run folder
        and W&B run; ``--ckpt_path auto`` resumes from the newest checkpoint of ``--run_name`` if there is one."""
        cfg = self.config
        if "classes" in cfg.data.init_args and cfg.data.init_args.get("classes") in ("auto", None):
            # store the resolved list with the run (config.yaml)
            cfg.data.init_args.classes = list(cfg.model.init_args.classes)
        run_dir = os.environ.get("SSD_RUN_DIR")
        if not run_dir:
            root = Path(cfg.trainer.default_root_dir or "runs")
            ckpt = cfg.ckpt_path
            if ckpt and ckpt != "auto" and not cfg.run_name and Path(ckpt).parent.name == "checkpoints":
                run_dir = str(Path(ckpt).parent.parent)
            else:
                name = cfg.run_name or default_run_name()
                run_dir = str(root / name)
            os.environ["SSD_RUN_DIR"] = run_dir
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        cfg.trainer.default_root_dir = run_dir
        if cfg.ckpt_path == "auto":
            cfg.ckpt_path = newest_checkpoint(Path(run_dir))
            if cfg.ckpt_path:
                print(f"resuming from {cfg.ckpt_path}", file=sys.stderr)
        wandb_id = None
        if cfg.ckpt_path and cfg.ckpt_path not in ("last", "hpc", "best", "registry"):  # Lightning's own keywords pass through
            # read once here: clear errors for a missing / truncated file, and the W&B run id
            from lightning_modules.export import read_checkpoint

            wandb_id = read_checkpoint(cfg.ckpt_path, mmap=True).get("wandb_run_id")
        logger = cfg.trainer.logger
        for lg in logger if isinstance(logger, list) else [logger]:
            if hasattr(lg, "class_path") and lg.class_path.endswith("WandbLogger"):
                lg.init_args.save_dir = run_dir
                if wandb_id:
                    lg.init_args.id = wandb_id
                    lg.init_args.resume = "allow"


def drop_empty_run_dir() -> None:
    """After an error before anything was written (a data or config error found while the run is set up), remove the
    run folder made for it, so that a typo leaves no empty run behind."""
    run_dir = os.environ.get("SSD_RUN_DIR")
    if run_dir and Path(run_dir).is_dir() and not any(Path(run_dir).iterdir()):
        Path(run_dir).rmdir()


def default_run_name() -> str:
    """One name for all processes of a run: launchers that start every rank themselves (srun, torchrun) give
    each the same job id; otherwise a timestamp (Lightning's own launcher passes SSD_RUN_DIR to its children)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def newest_checkpoint(run_dir: Path) -> str | None:
    """The newest of ``checkpoints/last.ckpt`` and Lightning's SLURM requeue checkpoints (``hpc_ckpt_*.ckpt``)."""
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def _has_atomic_io(trainer) -> bool:
    return isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def main(args: list[str] | None = None) -> Path:
    went_offline = configure_wandb_mode()
    cli = SSDCLI(
        parser_class=SSDArgumentParser,
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    if not _has_atomic_io(trainer):  # set here, not as a trainer default: the saved config.yaml stays re-usable
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    throughput = next((cb for cb in trainer.callbacks if isinstance(cb, TrainingThroughput)), None)
    if throughput is None:  # every run says how fast it trained and what limited the rate (summary.json "training")
        throughput = TrainingThroughput()
        # before the checkpoint callbacks, so that a checkpoint taken at an epoch's end holds that epoch's figures
        cbs = trainer.callbacks
        cbs.insert(next((i for i, cb in enumerate(cbs) if isinstance(cb, ModelCheckpoint)), len(cbs)), throughput)
    run_dir = Path(trainer.default_root_dir)
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    evaluate = cli.config.evaluate
    if not evaluate:  # a schedule that cannot run stops here, before the W&B run starts (the callbacks' setup
        callback_order_check(trainer)  # checks the same again)
        for cb in trainer.callbacks:
            if callable(getattr(cb, "preflight", None)):
                cb.preflight(trainer, model, dm)
    meta = {"name": run_dir.name, **run_meta(cli.config.as_dict())}
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            # method / dataset / model / seed as top-level keys: what W&B dashboards group and filter runs by
            lg.experiment.config.update({"resolved_config": cli.config.as_dict(), **meta}, allow_val_change=True)
    if evaluate:
        from lightning_modules.classifier import VGGClassifier, load_classifier

        compile_mode = model.hparams.get("compile")  # --model.compile applies to the evaluated model too
        model = (load_classifier if isinstance(model, VGGClassifier) else load_detector)(evaluate)
        model.hparams["compile"] = compile_mode
        if list(model.classes) != list(dm.classes):
            raise DataError(f"{evaluate} was trained on classes {list(model.classes)}, the data module has "
                            f"{list(dm.classes)}; pass --data.classes to match")
    else:
        try:  # (a missing / truncated --ckpt_path was already refused with a clear message, see SSDCLI)
            trainer.fit(model, datamodule=dm, ckpt_path=cli.config.ckpt_path)
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
    results = trainer.test(model, datamodule=dm)
    ranks = check_ranks(model.model, "training")  # every rank ends with the same model (a collective)
    summary_path = run_dir / "summary.json"
    if trainer.is_global_zero:
        final = model_stats(model.model)
        quality = getattr(model, "quality", "map50")  # map50 for detectors, top1 for classifiers
        final[quality] = float(results[0][f"test/{quality}"])
        if "test/top5" in results[0]:
            final["top5"] = float(results[0]["test/top5"])
        if "test/coco_map" in results[0]:  # COCO mAP@[.5:.95] (the COCO rows' primary figure)
            final["coco_map"] = float(results[0]["test/coco_map"])
        if hasattr(model, "ap_per_class"):
            final["ap50_per_class"] = model.ap_per_class.get("test")  # null: the class has no test objects
        # the architecture before the first cut, as the pruning callbacks recorded it: ours in their shared pruning
        # state, a one-shot baseline (benchmarks/baselines.py) on itself
        recorded = (getattr(cb, "dense_stats", None) or getattr(getattr(cb, "state", None), "dense_stats", None)
                    for cb in trainer.callbacks)
        dense = next((stats for stats in recorded if stats), None)
        # no pruning: the architecture is the final one (its accuracy is final's, not a figure "before pruning")
        dense = dict(dense) if dense else {k: v for k, v in final.items()
                                           if k not in (quality, "top5", "coco_map", "ap50_per_class")}
        pruned = "channels" in dense  # the pruning state recorded the dense architecture
        dense_channels = dict(dense.pop("channels", None) or model.model.channels)
        if pruned:
            # time the dense architecture and the final model together, interleaved: on a shared machine two
            # latencies taken hours apart are not comparable (weights do not change dense conv timing)
            branches = dense.pop("num_branches", None)  # a detector's branches before any were dropped
            dense_arch = model.model.at_widths(dense_channels, **({"num_branches": branches} if branches else {}))
            lat = paired_latency_ms({"dense": dense_arch, "final": model.model})
            dense["latency_ms"], final["latency_ms"] = lat["dense"], lat["final"]
            device = training_device(trainer)
            if device.type == "cuda":  # on the device that trained, too: batch 1 and a throughput batch
                timing = paired_device_timing({"dense": dense_arch, "final": model.model}, None, device,
                                              dtype=autocast_dtype(trainer.precision))
                dense.update(timing["dense"])
                final.update(timing["final"])
        final["latency_threads"], final["latency_form"] = LATENCY_THREADS, LATENCY_FORM
        dense.pop("num_branches", None)
        if evaluate:
            export = {"evaluated": str(evaluate)}
        else:
            from lightning_modules.classifier import VGGClassifier, export_classifier

            exporter = export_classifier if isinstance(model, VGGClassifier) else export_detector
            export = exporter(model, run_dir / "export", onnx=cli.config.export_onnx)
        summary = {
            "run": meta,
            "dense": dense,
            "final": final,
            "compression": compression(dense, final),
            "channels": model.model.channels,
            "dense_channels": dense_channels,
            "export": export,
            "wandb_dir": None,
            "world_size": trainer.world_size,
            "ranks_consistent": ranks["ranks_consistent"],
            "test_metrics": {k: float(v) for k, v in results[0].items()},
        }
        budgets = (cb.budget_report(final) for cb in trainer.callbacks if hasattr(cb, "budget_report"))
        if report := next((b for b in budgets if b), None):  # which of the pruning budgets binds
            summary["budgets"] = report
        if not evaluate and (training := throughput.summary()):
            summary["training"] = training
        if cli.config.reference:
            import yaml

            own = run_dir / "config.yaml"
            reference, drop, differences = reference_drop(
                cli.config.reference, final, yaml.safe_load(own.read_text()) if own.is_file() else None)
            if differences:
                reference["budget_differences"] = differences
                print(f"warning: --reference {cli.config.reference} differs from this run in more than the pruning: "
                      f"{'; '.join(differences)}", file=sys.stderr)
            summary["reference"], summary["drop"] = reference, drop
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                summary["wandb_dir"] = wandb_dir = str(Path(lg.experiment.dir).parent)
                log_summary_to_wandb(lg.experiment, summary)
        write_summary(summary_path, summary)
        if summary["wandb_dir"] and went_offline:
            print(f"W&B ran offline (no API key, no WANDB_MODE). Upload with: wandb sync {wandb_dir}")
        print(f"summary: {summary_path}")
    end_distributed(trainer.strategy)  # every rank leaves the process group together (gloo: no abort at exit)
    return summary_path


def _is_classifier(path: str) -> bool:
    """Whether a checkpoint or export folder holds the VGG16 classifier (else the SSD detector)."""
    import json

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if p.is_dir() or p.suffix in (".json", ".safetensors"):
        spec = folder / "model.json"
        return spec.is_file() and json.loads(spec.read_text()).get("format") == "vgg16-classifier/1"
    from lightning_modules.checkpoints import read_checkpoint

    hp = read_checkpoint(p, mmap=True).get("hyper_parameters") or {}
    return "label_smoothing" in hp


def tool_main(argv: list[str]) -> None:
    """``--export`` and ``--predict``: work on a saved model alone, no config needed."""
    import argparse

    ap = argparse.ArgumentParser(prog="train.py", description="export or run a trained detector")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export", metavar="CKPT", help="export this checkpoint: model.safetensors, model.json, model.onnx")
    mode.add_argument("--predict", metavar="CKPT_OR_EXPORT", help="detect objects with this checkpoint or export folder")
    mode.add_argument("--compare", metavar="RUN", nargs="+",
                      help="run folders or summary.json files (globs work): table and pictures side by side")
    ap.add_argument("--wandb_project", help="--compare: also log the table and pictures to this W&B project")
    ap.add_argument("--images", help="--predict: a folder of images, or one image file")
    ap.add_argument("--out", help="output folder (default: <checkpoint folder>/export, or <images>_detections)")
    ap.add_argument("--score_threshold", type=float, default=0.3, help="--predict: draw and list detections >= this")
    ap.add_argument("--no_onnx", action="store_true", help="--export: skip model.onnx")
    ap.add_argument("--device", default="cpu", help="--predict: torch device (cpu, cuda, cuda:1 ...)")
    ap.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                    help="--predict: run the network through torch.compile (reduce-overhead: CUDA graphs, for small "
                         "batches on a GPU)")
    a = ap.parse_args(argv)
    if a.compare:
        from callbacks.compare import compare, log_compare_to_wandb

        res = compare(a.compare, Path(a.out or "runs/compare"))
        print(res["table"].read_text())
        if a.wandb_project:
            went_offline = configure_wandb_mode()
            wandb_dir = log_compare_to_wandb(res, a.wandb_project, Path(a.out or "runs/compare"))
            if went_offline:
                print(f"W&B ran offline (no API key, no WANDB_MODE). Upload with: wandb sync {wandb_dir}")
        for p in [res["table"], *res["images"]]:
            print(f"wrote: {p}")
        return
    if a.export:
        out = Path(a.out) if a.out else Path(a.export).resolve().parent / "export"
        if _is_classifier(a.export):
            from lightning_modules.classifier import export_classifier, load_classifier

            paths = export_classifier(load_classifier(a.export), out, onnx=not a.no_onnx)
        else:
            paths = export_detector(load_detector(a.export), out, onnx=not a.no_onnx)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return
    if not a.images:
        ap.error("--predict needs --images <folder or image file>")
    out = Path(a.out) if a.out else Path(str(Path(a.images).resolve()) + "_detections")
    from lightning_modules.classifier import load_classifier, predict_folder_classes
    from lightning_modules.common import fold_batchnorm

    classifier = _is_classifier(a.predict)
    model = (load_classifier if classifier else load_detector)(a.predict).to(a.device)
    fold_batchnorm(model.model)  # the inference form: BatchNorm folded into the convolutions, channels-last
    model.hparams["compile"], model.hparams["channels_last"] = a.compile, True
    model.architecture_changed()  # channels-last weights; compiles the network when --compile is given
    if classifier:
        print(f"predictions: {predict_folder_classes(model, a.images, out)}")
    else:
        print(f"detections: {predict_folder(model, a.images, out, a.score_threshold)}")


if __name__ == "__main__":
    try:
        tools = ("--export", "--predict", "--compare")
        if any(arg in tools or arg.startswith(tuple(t + "=" for t in tools)) for arg in sys.argv[1:]):
            tool_main(sys.argv[1:])
        else:
            main()
    except (DataError, ConfigError, ScheduleError, CheckpointError, WeightsMismatchError, FileNotFoundError,
            RanksInconsistentError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        drop_empty_run_dir()
        sys.exit(2)
