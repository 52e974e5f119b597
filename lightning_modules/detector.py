"""The SSD LightningModule: loss, optimiser and schedule, decoding, VOC07 + COCO-style mAP."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from lightning_modules.box_ops import MultiBoxLoss, decode, packed_field
from lightning_modules.common import NonFiniteLossError  # noqa: F401 (public here)
from lightning_modules.common import (OPTIMIZERS, ClassBalance, EvalHooks, LossGuard, NetRunner, check_compile,
                                      log_training_loss)
from lightning_modules.metrics import VOCMeanAveragePrecision
from lightning_modules.ssd import IMAGENET_MEAN, IMAGENET_STD, SSD, build_ssd


COCO_MAX_DETS = 100  # detections per image COCO's AP counts


class SSDDetector(ClassBalance, LossGuard, NetRunner, EvalHooks, pl.LightningModule):
    """SSD300/SSD512 detector.

    Args:
        classes: object class names (background excluded); linked from the data module, so ``num_classes``
            (``len(classes) + 1``) follows the data set.
        size: 300 or 512.
        channels: per-layer widths by the papers' layer names (a pruned model's architecture).
        width_mult: scales every default width (small demo models).
        num_branches: keep only the first k detection branches.
        pretrained_backbone: start conv1_1..conv5_3 from torchvision's ImageNet VGG16 features (with ``batch_norm``:
            from ImageNet ``vgg16_bn``, BatchNorm included).
        batch_norm: BatchNorm after every convolution (off in the SSD recipe; on for the from-scratch demo).
        init_checkpoint: start from the weights of a trained SSD (a Lightning checkpoint of this module;
            paper A's setting). Only the weights are taken: optimiser, epoch and schedule start afresh.
        optimizer: "sgd" (the recipe) or "adamw".
        lr, momentum, weight_decay: optimiser settings (SSD recipe: SGD 1e-3, 0.9, 5e-4 at batch 32).
        warmup_iters: linear warm-up from ``warmup_factor * lr`` over this many iterations.
        lr_milestones: iterations at which the learning rate is multiplied by ``lr_gamma``
            (recipe: 80k and 100k of 120k). ``cosine_iters`` > 0 replaces the steps by a cosine decay to 0
            over that many iterations; ``"run"``: over the whole run (Lightning's estimated stepping batches), so
            the decay reaches 0 at the last step whatever the data set's size (the demo: 1,100 on its synthetic set).
        conf_threshold, nms_threshold, top_k: test-time decoding (recipe: 0.01, 0.45, 200).
        use_07_metric: VOC2007 11-point AP (True) or all-point AP.
        coco_map: also log COCO-style mAP@[.5:.95], @.5, @.75 (torchmetrics, faster_coco_eval backend).
        channels_last: keep weights and activations in channels-last memory format (faster convolutions on
            tensor-core GPUs, with ``--trainer.precision bf16-mixed`` / ``16-mixed``); kept through surgeries.
        compile: run the network through ``torch.compile`` (true, or a mode: ``reduce-overhead`` adds CUDA graphs,
            ``max-autotune``); compiled afresh after every surgery. On a GPU the decoder's NMS matrices are then
            built by one compiled kernel too (``box_ops.decode(compile=True)``, the same detections), and the
            training loss (matching, its terms and hard negatives, and their backward: ~130 operations) runs as one
            compiled graph (``MultiBoxLoss(compile=True)``; the same loss up to float rounding). On a CPU the loss
            stays eager (its top-k form reads a size back, which a graph cannot).
        prior_sizes: default-box sizes: VOC's (None), ``"coco300"`` / ``"coco512"`` (the original SSD's COCO
            boxes), or ``{min_sizes: [...], max_sizes: [...]}`` in pixels, one per branch (e.g. small traffic signs).
    """

    def __init__(
        self,
        classes: list[str],
        size: int = 300,
        channels: dict[str, int] | None = None,
        width_mult: float = 1.0,
        num_branches: int | None = None,
        pretrained_backbone: bool = False,
        batch_norm: bool = False,
        init_checkpoint: str | None = None,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_iters: int = 500,
        warmup_factor: float = 1.0 / 3,
        lr_milestones: list[int] = (80_000, 100_000),
        lr_gamma: float = 0.1,
        cosine_iters: int | str = 0,
        neg_pos_ratio: int = 3,
        conf_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        top_k: int = 200,
        use_07_metric: bool = True,
        coco_map: bool = True,
        channels_last: bool = False,
        prior_sizes: str | dict | None = None,
        compile: bool | str = False,
    ):
        super().__init__()
        check_compile(compile)
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if cosine_iters != "run" and (isinstance(cosine_iters, str) or cosine_iters < 0):
            raise ValueError(f"cosine_iters must be a number of iterations >= 0 or 'run', got {cosine_iters!r}")
        self.classes = list(classes)
        self.model: SSD = build_ssd(size, len(self.classes) + 1, channels, width_mult, num_branches, pretrained_backbone,
                                    batch_norm, prior_sizes)
        if init_checkpoint:
            self.load_weights(init_checkpoint)
        self.loss_fn = MultiBoxLoss(neg_pos_ratio=neg_pos_ratio, compile=bool(compile))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.metrics = torch.nn.ModuleDict()
        self.ap_per_class: dict[str, dict[str, float | None]] = {}  # stage -> class -> AP@0.5 (None: no objects)
        self._warned_missing: set = set()
        for stage in ("val", "test"):
            self.metrics[f"{stage}_voc"] = VOCMeanAveragePrecision(len(self.classes), use_07_metric=use_07_metric)
            if coco_map:
                self.metrics[f"{stage}_coco"] = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")

    # ----------------------------------------------------------------- memory format
    def setup(self, stage: str) -> None:
        self.architecture_changed()

    # ----------------------------------------------------------------- architecture in checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["architecture"] = {"channels": self.model.channels, "num_branches": self.model.num_branches}
        self._save_class_counts(checkpoint)
        from pytorch_lightning.loggers import WandbLogger

        for lg in (self.trainer.loggers if self._trainer is not None else []):
            if isinstance(lg, WandbLogger) and lg._experiment is not None:
                checkpoint["wandb_run_id"] = lg.version  # a resumed run continues the same W&B run

    def _rebuild(self, arch: dict | None) -> None:
        """Rebuild ``self.model`` at a saved architecture (a pruned model's widths differ from the config's)."""
        if arch and (arch["channels"] != self.model.channels or arch["num_branches"] != self.model.num_branches):
            hp = self.hparams
            device = self.model.priors.device
            self.model = build_ssd(hp.size, len(self.classes) + 1, arch["channels"], 1.0, arch["num_branches"],
                                   False, hp.batch_norm, hp.get("prior_sizes")).to(device)
            self.hparams["channels"] = arch["channels"]
            self.hparams["num_branches"] = arch["num_branches"]
            self.architecture_changed()

    def _check_and_state(self, checkpoint: dict, source: str) -> dict:
        from lightning_modules.checkpoints import model_state_dict
        from lightning_modules.ssd import check_state_dict

        self._rebuild(checkpoint.get("architecture"))
        state = model_state_dict(checkpoint) if "state_dict" in checkpoint else {}
        if state:  # a clear message naming the first mismatched layer, before a strict load
            check_state_dict(self.model.state_dict(), state, source)
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild the saved (pruned) architecture before Lightning loads the weights, and check they fit."""
        self._check_and_state(checkpoint, "checkpoint")
        self._load_class_counts(checkpoint)

    def load_weights(self, path: str) -> None:
        """Load detector weights from a checkpoint of this module (``weights_only=True``: no pickled code runs)."""
        from lightning_modules.checkpoints import CheckpointError, read_checkpoint

        if path == "REQUIRED":
            raise ValueError("this experiment starts from a trained SSD: pass --model.init_checkpoint <checkpoint path>")
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            raise ValueError(f"init_checkpoint: {err}") from err
        self.model.load_state_dict(self._check_and_state(ckpt, f"init_checkpoint {path}"))

    # ----------------------------------------------------------------- forward / loss
    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 RGB batch -> ImageNet-normalised float (done on the device, on whole batches)."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.get("channels_last") else x

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.net()(self.preprocess(images))

    @staticmethod
    def _mean_over_ranks(num_pos: Tensor) -> Tensor:
        """Under DDP: the mean number of positives per rank (all-reduced), so that DDP's gradient averaging gives
        exactly the gradient of one process on the whole global batch (SSD normalises by the positives)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return num_pos
        total = num_pos.detach().clone()
        dist.all_reduce(total)
        return total / dist.get_world_size()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        loc, conf = self(images)
        losses = self.loss_fn(loc, conf, self.model.priors, targets, self._mean_over_ranks)
        self._count_labels(packed_field(targets, "labels")[0], len(self.classes))
        self._last_step = (loc, conf, targets)
        self.guard_loss(  # every rank at once under DDP
            losses["loss"], {"loc": losses["loc"], "conf": losses["conf"]},
            "Training stopped; the last good checkpoint is kept (see the run's checkpoints/ folder). Lower --model.lr "
            "or lengthen the warm-up (--model.warmup_iters), and check the data for broken boxes.")
        bs = images.shape[0]
        log_training_loss(self, losses["loss"], bs, lr=self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/loss_loc", losses["loc"], batch_size=bs)
        self.log("train/loss_conf", losses["conf"], batch_size=bs)
        return losses["loss"]

    def class_balanced_loss(self) -> Tensor:
        """The last training step's MultiBox loss with every default box weighted by its target class's
        ``class_weights()`` (background 1): each class counts as much as it does in mAP (the loss a pruning
        criterion may differentiate instead of the training loss: ``SparsityInduction(taylor_loss=...)``)."""
        loc, conf, targets = self._step_outputs()
        w = torch.cat([torch.ones(1, device=loc.device), self.class_weights().to(loc.device)])
        return self.loss_fn(loc, conf, self.model.priors, targets, self._mean_over_ranks, class_weights=w)["loss"]

    # ----------------------------------------------------------------- evaluation
    quality = "map50"  # the pruning contract's quality figure: VOC07 mAP@0.5

    @torch.no_grad()
    def evaluate(self, loader, max_batches: int | None = None) -> float:
        """VOC mAP@0.5 of the current model on ``loader`` (its first ``max_batches`` batches), in eval mode; the
        module's own metrics are left untouched (the pruning contract's ``evaluate``)."""
        import itertools

        from lightning_fabric.utilities.apply_func import move_data_to_device

        metric = VOCMeanAveragePrecision(len(self.classes), use_07_metric=self.hparams.use_07_metric).to(self.device)
        was_training = self.training
        self.eval()
        try:
            for images, targets in itertools.islice(loader, max_batches):
                if not targets:
                    continue
                images, targets = move_data_to_device((images, targets), self.device)
                voc_preds, voc_targets, _, _ = self.metric_inputs(self.predict_batch(images), targets)
                metric.update(voc_preds, voc_targets)
            return float(metric.compute()["map"])
        finally:
            self.train(was_training)

    def predict_batch(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections with normalised xyxy boxes."""
        loc, conf = self(images)
        hp = self.hparams
        return decode(loc, conf, self.model.priors, hp.conf_threshold, hp.nms_threshold, hp.top_k,
                      compile=bool(hp.get("compile")))

    @staticmethod
    def metric_inputs(dets: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]):
        """Detections and targets in each metric's convention: VOC (1-based inclusive pixels, difficult flagged)
        and COCO (continuous pixels, the 100 best detections per image, difficult objects as crowd regions)."""
        voc_preds, voc_targets, coco_preds, coco_targets = [], [], [], []
        sizes = packed_field(targets, "orig_size")[0].view(-1, 2).tolist()  # one host sync for the batch
        for d, t, (h, w) in zip(dets, targets, sizes):
            px = d["boxes"] * d["boxes"].new_tensor([w, h, w, h])
            # continuous 0-based -> VOC 1-based inclusive pixels, the devkit's convention
            voc_boxes = torch.stack([px[:, 0] + 1, px[:, 1] + 1, px[:, 2], px[:, 3]], dim=1)
            voc_preds.append({"boxes": voc_boxes, "scores": d["scores"], "labels": d["labels"]})
            voc_targets.append({"boxes": t["voc_boxes"], "labels": t["voc_labels"], "difficult": t["voc_difficult"]})
            gt = t["voc_boxes"].clone()
            gt[:, :2] -= 1
            # COCO counts the 100 best detections per image (maxDets=100; decode sorts by score), and a difficult /
            # crowd object is an ignore region, as COCO evaluation treats iscrowd
            top = d["scores"].argsort(descending=True)[:COCO_MAX_DETS]
            coco_preds.append({"boxes": px[top], "scores": d["scores"][top], "labels": d["labels"][top]})
            coco_targets.append({"boxes": gt, "labels": t["voc_labels"], "iscrowd": t["voc_difficult"].long()})
        return voc_preds, voc_targets, coco_preds, coco_targets

    def _eval_step(self, batch, stage: str) -> None:
        images, targets = batch
        if not targets:
            return
        voc_preds, voc_targets, coco_preds, coco_targets = self.metric_inputs(self.predict_batch(images), targets)
        self.metrics[f"{stage}_voc"].update(voc_preds, voc_targets)
        if f"{stage}_coco" in self.metrics:
            self.metrics[f"{stage}_coco"].update(coco_preds, coco_targets)

    def _eval_epoch_end(self, stage: str) -> None:
        voc = self.metrics[f"{stage}_voc"].compute()
        self.metrics[f"{stage}_voc"].reset()
        self.log(f"{stage}/map50", voc["map"], prog_bar=True, sync_dist=False)
        ap = voc["ap_per_class"].reshape(-1).tolist()  # torchmetrics squeezes a one-class result to 0-d
        self.ap_per_class[stage] = {name: None if math.isnan(a) else a for name, a in zip(self.classes, ap)}
        missing = tuple(name for name, a in self.ap_per_class[stage].items() if a is None)
        if missing and (stage, missing) not in self._warned_missing:
            self._warned_missing.add((stage, missing))
            rank_zero_warn(f"{stage} split: no (non-difficult) objects of class(es) {', '.join(map(repr, missing))}: "
                           "their AP is undefined (NaN) and left out of the mean, as in the VOC devkit")
        for name, a in self.ap_per_class[stage].items():
            if a is not None:
                self.log(f"{stage}/ap50/{name}", a)
        if f"{stage}_coco" in self.metrics:
            coco = self.metrics[f"{stage}_coco"].compute()
            self.metrics[f"{stage}_coco"].reset()
            for key in ("map", "map_50", "map_75"):
                self.log(f"{stage}/coco_{key}", coco[key])

    # ----------------------------------------------------------------- optimisation
    def cosine_iters(self) -> int:
        """The cosine's length in iterations: ``cosine_iters``, or for ``"run"`` the run's stepping batches (read once,
        when the optimiser is configured)."""
        if self.hparams.cosine_iters != "run":
            return self.hparams.cosine_iters
        if getattr(self, "_run_iters", None) is None:
            self._run_iters = max(1, int(self.trainer.estimated_stepping_batches))
        return self._run_iters

    def lr_factor(self, it: int) -> float:
        """Learning-rate multiplier at iteration ``it``: linear warm-up, then steps (or cosine)."""
        hp = self.hparams
        cosine = self.cosine_iters()
        if cosine > 0:
            factor = 0.5 * (1 + math.cos(math.pi * min(it, cosine) / cosine))
        else:
            factor = hp.lr_gamma ** sum(it >= m for m in hp.lr_milestones)
        if it < hp.warmup_iters:
            factor *= hp.warmup_factor + (1 - hp.warmup_factor) * it / hp.warmup_iters
        return factor

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # biases, BatchNorm and L2Norm scales: no decay
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:  # "adamw" (checked when the module was built)
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        self._run_iters = None  # "run": the cosine's length, read from the trainer by the first lr_factor call
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
