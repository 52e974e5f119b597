"""Train (and compress) an SSD detector: ``python train.py --config experiments/<name>.yaml [--key value ...]``.

Runs ``fit``, then ``test`` on the final model, writes ``summary.json`` into the run directory and prints
``summary: <path>`` as its last line. Every key of the config can be overridden on the command line.
"""

from __future__ import annotations

import netrc
import os
import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import WandbLogger

from callbacks.report import compression, model_stats, write_summary
from callbacks.state import ScheduleError
from datamodules.voc import DataError
from lightning_modules.detector import NonFiniteLossError


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


class SSDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name (default: timestamp)")
        parser.link_arguments("data.init_args.classes", "model.init_args.classes", apply_on="parse")
        parser.link_arguments("data.init_args.image_size", "model.init_args.size", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        """Give every run its own folder ``<default_root_dir>/<run_name>`` for logs, checkpoints and summary.
        The name is fixed once and handed to DDP child processes through the environment."""
        cfg = self.config
        run_dir = os.environ.get("SSD_RUN_DIR")
        if not run_dir:
            root = Path(cfg.trainer.default_root_dir or "runs")
            name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
            run_dir = str(root / name)
            os.environ["SSD_RUN_DIR"] = run_dir
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        cfg.trainer.default_root_dir = run_dir
        logger = cfg.trainer.logger
        for lg in logger if isinstance(logger, list) else [logger]:
            if hasattr(lg, "class_path") and lg.class_path.endswith("WandbLogger"):
                lg.init_args.save_dir = run_dir


def main(args: list[str] | None = None) -> Path:
    went_offline = configure_wandb_mode()
    cli = SSDCLI(
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    run_dir = Path(trainer.default_root_dir)
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            lg.experiment.config.update({"resolved_config": cli.config.as_dict()}, allow_val_change=True)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cli.config.ckpt_path)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    results = trainer.test(model, datamodule=dm)
    summary_path = run_dir / "summary.json"
    if trainer.is_global_zero:
        final = model_stats(model.model, model.hparams.size)
        final["map50"] = float(results[0]["test/map50"])
        dense = next((cb.state.dense_stats for cb in trainer.callbacks
                      if getattr(getattr(cb, "state", None), "dense_stats", None)), None) or final
        wandb_dir = None
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                wandb_dir = str(Path(lg.experiment.dir).parent)
                lg.experiment.summary.update({f"final/{k}": v for k, v in final.items()})
        summary = {
            "dense": dense,
            "final": final,
            "compression": compression(dense, final),
            "channels": model.model.channels,
            "export": {},
            "wandb_dir": wandb_dir,
            "world_size": trainer.world_size,
            "test_metrics": {k: float(v) for k, v in results[0].items()},
        }
        write_summary(summary_path, summary)
        if wandb_dir and went_offline:
            print(f"W&B ran offline (no API key, no WANDB_MODE). Upload with: wandb sync {wandb_dir}")
        print(f"summary: {summary_path}")
    return summary_path


if __name__ == "__main__":
    try:
        main()
    except (DataError, ScheduleError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
