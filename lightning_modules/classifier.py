"""VGG16 for small-image classification (CIFAR-10, GTSRB): paper A's classification rows.

The variant is the one the CIFAR pruning literature uses (Li et al. 2017, "Pruning Filters for Efficient ConvNets";
Liu et al. 2017, "Network Slimming"): VGG16's 13 3x3 convolutions conv1_1 ... conv5_3 (64, 64 | 128, 128 |
256 x 3 | 512 x 3 | 512 x 3, a 2x2 max-pool after each block), each followed by BatchNorm and ReLU, then a small
head: flatten, Linear(512 * s * s, 512), BatchNorm1d, ReLU, Linear(512, classes), with s = input size / 32.
At 32x32 and 10 classes: 14,991,946 parameters and 314.3 M MACs per image (Torch-Pruning's count) (``tests/test_classifier.py`` checks
both); ratios such as paper A's "125x" depend on this choice.

The network implements the pruning contract (``lightning_modules/contract.py``): every conv is prunable (the input
layer too, as in Li et al.), conv5_3's consumer is the first linear layer (channel i = its input columns
``i*s*s .. (i+1)*s*s - 1``).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.common import (OPTIMIZERS, ClassBalance, EvalHooks, LossGuard, NetRunner, check_compile,
                                     log_training_loss)

VGG16_WIDTHS = {"conv1_1": 64, "conv1_2": 64, "conv2_1": 128, "conv2_2": 128, "conv3_1": 256, "conv3_2": 256,
                "conv3_3": 256, "conv4_1": 512, "conv4_2": 512, "conv4_3": 512, "conv5_1": 512, "conv5_2": 512,
                "conv5_3": 512}
POOL_AFTER = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def resolve_vgg_widths(channels: dict[str, int] | None = None, width_mult: float = 1.0) -> dict[str, int]:
    out = {n: max(1, int(round(w * width_mult))) for n, w in VGG16_WIDTHS.items()}
    unknown = set(channels or {}) - set(out)
    if unknown:
        raise ValueError(f"unknown VGG16 layer(s) {sorted(unknown)}; the layers are {', '.join(out)}")
    out.update(channels or {})
    return out


class VGG16(nn.Module):
    """VGG16 with BatchNorm for ``size`` x ``size`` inputs (a multiple of 32); ``forward`` returns logits."""

    never_prune: tuple[str, ...] = ()

    def __init__(self, num_classes: int, channels: dict[str, int], size: int = 32, hidden: int = 512):
        super().__init__()
        if size % 32:
            raise ValueError(f"VGG16 needs an input size that is a multiple of 32, got {size}")
        self.size, self.num_classes, self.hidden = size, num_classes, hidden
        self.layers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        in_ch = 3
        for name in VGG16_WIDTHS:
            self.layers[name] = nn.Conv2d(in_ch, channels[name], 3, padding=1)
            self.norms[name] = nn.BatchNorm2d(channels[name])
            in_ch = channels[name]
        self.span = (size // 32) ** 2  # spatial positions per channel after the last pool
        self.classifier = nn.Sequential(nn.Linear(in_ch * self.span, hidden), nn.BatchNorm1d(hidden),
                                        nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def channels(self) -> dict[str, int]:
        return {n: c.out_channels for n, c in self.layers.items()}

    def forward(self, x: Tensor) -> Tensor:
        for name, conv in self.layers.items():
            x = F.relu(self.norms[name](conv(x)), inplace=True)
            if name in POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return self.classifier(torch.flatten(x, 1))

    # ------------------------------------------------ the pruning contract
    def layer_names(self) -> tuple[str, ...]:
        return tuple(VGG16_WIDTHS)

    def consumers(self, name: str) -> list[nn.Module]:
        names = list(self.layers)
        i = names.index(name)
        return [self.layers[names[i + 1]]] if i + 1 < len(names) else [self.classifier[0]]

    def example_input(self, batch: int = 1) -> Tensor:
        ref = next(self.parameters())
        return torch.zeros(batch, 3, self.size, self.size, device=ref.device, dtype=ref.dtype)

    def at_widths(self, widths: dict[str, int]) -> VGG16:
        return VGG16(self.num_classes, widths, self.size, self.hidden)

    def param_dims(self) -> dict[str, tuple[str | None, str | None]]:
        from lightning_modules.contract import chain_param_dims

        dims = chain_param_dims(list(self.layers))
        dims["classifier.0.weight"] = (None, list(self.layers)[-1])  # span columns per channel
        return dims

    def tp_pruners(self) -> dict:
        return {}


def build_vgg16(num_classes: int = 10, channels: dict[str, int] | None = None, width_mult: float = 1.0,
                size: int = 32, hidden: int | None = None) -> VGG16:
    """VGG16 at ``width_mult`` (the hidden linear layer too, unless ``hidden`` is given), ``channels`` overriding."""
    return VGG16(num_classes, resolve_vgg_widths(channels, width_mult), size,
                 hidden=hidden or max(8, int(round(512 * width_mult))))


class VGGClassifier(ClassBalance, LossGuard, NetRunner, EvalHooks, pl.LightningModule):
    """VGG16 classifier (see the module docstring for the variant), the usual CIFAR recipe: SGD lr 0.1, momentum
    0.9, weight decay 5e-4, lr x0.1 at 50 % and 75 % of the epochs (``lr_milestones`` as fractions), batch 64-128.

    Args:
        classes: class names (the data module's; linked by train.py).
        size: input side (32 for CIFAR-10 and GTSRB as configured).
        channels / width_mult: per-layer widths (a pruned model's) or a uniform scale for small runs (the hidden
            linear layer scales with it).
        label_smoothing: cross-entropy label smoothing (0: plain cross-entropy).
        hidden: width of the hidden linear layer (default 512 x width_mult).
        channels_last: channels-last weights and activations (tensor-core GPUs with bf16); kept through surgeries.
        compile: run the network through ``torch.compile`` (true or a mode, e.g. ``reduce-overhead``); compiled
            afresh after every surgery.
    """

    quality = "top1"  # the pruning contract's quality figure

    def __init__(self, classes: list[str], size: int = 32, channels: dict[str, int] | None = None,
                 width_mult: float = 1.0, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, lr_milestones: list[float] = (0.5, 0.75), lr_gamma: float = 0.1,
                 warmup_epochs: float = 0.0, label_smoothing: float = 0.0, channels_last: bool = False,
                 hidden: int | None = None, compile: bool | str = False):
        super().__init__()
        check_compile(compile)
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.classes = list(classes)
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.classes}")
        self.model = build_vgg16(len(self.classes), channels, width_mult, size, hidden)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255, persistent=False)
        k = min(5, len(self.classes))
        # average="micro": the fraction of images classified right (torchmetrics' default, "macro", is the mean
        # per-class recall, which differs on imbalanced test sets)
        self.metrics = nn.ModuleDict({f"{s}_top{t}": MulticlassAccuracy(len(self.classes), top_k=t if t == 1 else k,
                                                                        average="micro")
                                      for s in ("val", "test") for t in (1, 5)})

    def setup(self, stage: str) -> None:
        self.architecture_changed()

    def preprocess(self, images: Tensor) -> Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.get("channels_last") else x

    def forward(self, images: Tensor) -> Tensor:
        return self.net()(self.preprocess(images))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self._count_labels(labels, len(self.classes))
        self._last_step = (logits, labels)
        self.guard_loss(  # every rank at once under DDP
            loss, advice="Training stopped; the last good checkpoint is kept (see the run's "
            "checkpoints/ folder). Lower --model.lr or lengthen --model.warmup_epochs.")
        log_training_loss(self, loss)
        return loss

    def class_balanced_loss(self) -> Tensor:
        """The last training step's cross-entropy with each image weighted by its class's ``class_weights()``
        (a weighted mean, as ``F.cross_entropy(weight=...)``): the loss a pruning criterion may differentiate
        instead of the training loss (``SparsityInduction(taylor_loss=...)``)."""
        logits, labels = self._step_outputs()
        return F.cross_entropy(logits, labels, weight=self.class_weights().to(logits.device),
                               label_smoothing=self.hparams.label_smoothing)

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        for t in (1, 5):
            self.metrics[f"{stage}_top{t}"].update(logits, labels)

    def _eval_epoch_end(self, stage: str) -> None:
        for t in (1, 5):
            self.log(f"{stage}/top{t}", self.metrics[f"{stage}_top{t}"].compute(), prog_bar=t == 1)
            self.metrics[f"{stage}_top{t}"].reset()

    @torch.no_grad()
    def evaluate(self, loader, max_batches: int | None = None) -> float:
        """Top-1 accuracy of the current model on ``loader`` (its first ``max_batches`` batches), in eval mode."""
        import itertools

        metric = MulticlassAccuracy(len(self.classes), top_k=1, average="micro").to(self.device)
        was_training = self.training
        self.eval()
        try:
            for images, labels in itertools.islice(loader, max_batches):
                metric.update(self(images.to(self.device)), labels.to(self.device))
            return float(metric.compute())
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_batch(self, images: Tensor) -> list[dict]:
        probs = self(images).softmax(-1)
        score, label = probs.max(-1)
        return [{"label": int(i), "class": self.classes[int(i)], "score": float(s)} for s, i in zip(score, label)]

    # architecture in checkpoints (a pruned model's widths differ from the config's)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["architecture"] = {"channels": self.model.channels, "hidden": self.model.hidden}
        self._save_class_counts(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._load_class_counts(checkpoint)
        arch = checkpoint.get("architecture")
        if arch and arch["channels"] != self.model.channels:
            device = next(self.model.parameters()).device
            self.model = self.model.at_widths(arch["channels"]).to(device)
            self.hparams["channels"] = arch["channels"]
            self.architecture_changed()

    def lr_factor(self, epoch_float: float) -> float:
        hp = self.hparams
        if hp.warmup_epochs and epoch_float < hp.warmup_epochs:
            return (epoch_float + 1e-3) / hp.warmup_epochs
        total = max(self.trainer.max_epochs, 1) if self._trainer is not None else 1
        return hp.lr_gamma ** sum(epoch_float >= m * total for m in hp.lr_milestones)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=True)
        else:  # "adamw" (checked when the module was built)
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        steps = max(1, math.ceil(self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs, 1)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: self.lr_factor(it / steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_classifier(module: VGGClassifier, out_dir, onnx: bool = True) -> dict[str, str]:
    """``model.safetensors`` (weights), ``model.json`` (architecture: widths, input size, classes, normalisation) and
    ``model.onnx`` (input uint8-range float images ``[N, 3, S, S]`` RGB, normalisation inside, output logits)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = module.model
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    spec = {"format": "vgg16-classifier/1", "architecture": {"channels": net.channels, "size": net.size,
                                                            "hidden": net.hidden},
            "classes": list(module.classes),
            "input": {"size": [net.size, net.size], "layout": "NCHW, RGB", "range": "0-255",
                      "mean": [m * 255 for m in CIFAR_MEAN], "std": [s * 255 for s in CIFAR_STD]},
            "params": sum(p.numel() for p in net.parameters())}
    (out / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    paths = {"safetensors": str(out / "model.safetensors"), "json": str(out / "model.json")}
    if onnx:
        import copy

        class Normalized(nn.Module):
            def __init__(self, m: VGGClassifier):
                super().__init__()
                self.net = copy.deepcopy(m.model).cpu().eval()
                self.register_buffer("mean", m.mean.detach().cpu().clone())
                self.register_buffer("std", m.std.detach().cpu().clone())

            def forward(self, x: Tensor) -> Tensor:
                return self.net((x - self.mean) / self.std)

        path = out / "model.onnx"
        torch.onnx.export(Normalized(module).eval(), torch.zeros(1, 3, net.size, net.size), str(path),
                          input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "N"}},
                          opset_version=17, dynamo=False)
        paths["onnx"] = str(path)
    return paths


def load_classifier(path) -> VGGClassifier:
    """A ``VGGClassifier`` (eval mode, CPU) from a Lightning checkpoint or an export folder, at its saved widths."""
    import inspect
    import json
    from pathlib import Path

    from lightning_modules.checkpoints import CheckpointError, model_state_dict, read_checkpoint

    p = Path(path)
    accepted = set(inspect.signature(VGGClassifier.__init__).parameters) - {"self"}
    if p.is_dir() or p.suffix in (".json", ".safetensors"):
        from safetensors.torch import load_file

        folder = p if p.is_dir() else p.parent
        spec = json.loads((folder / "model.json").read_text())
        if spec.get("format") != "vgg16-classifier/1":
            raise CheckpointError(f"{folder / 'model.json'} is not a VGG16 classifier export")
        arch = spec["architecture"]
        module = VGGClassifier(spec["classes"], size=arch["size"], channels=arch["channels"], hidden=arch["hidden"])
        module.model.load_state_dict(load_file(str(folder / "model.safetensors")))
    else:
        ckpt = read_checkpoint(p)
        hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in accepted}
        if "classes" not in hp:
            raise CheckpointError(f"{p} has no VGGClassifier hyper-parameters")
        arch = ckpt.get("architecture") or {}
        hp["hidden"] = arch.get("hidden") or hp.get("hidden") or max(8, int(round(512 * hp.get("width_mult", 1.0))))
        hp["channels"] = arch.get("channels") or hp.get("channels")
        hp["width_mult"] = 1.0
        module = VGGClassifier(**hp)
        module.model.load_state_dict(model_state_dict(ckpt))
    return module.eval()


@torch.no_grad()
def predict_folder_classes(module: VGGClassifier, images_dir, out_dir, batch_size: int = 64):
    """Class and score for every image of ``images_dir`` (or that one image file; resized to the model's input), in
    ``predictions.json``; unreadable files are skipped and listed."""
    import json
    from pathlib import Path

    import cv2
    import numpy as np

    from lightning_modules.export import IMAGE_SUFFIXES, image_files, read_images, report_skipped

    src, dst = Path(images_dir), Path(out_dir)
    files = image_files(src, IMAGE_SUFFIXES + (".ppm",))
    dst.mkdir(parents=True, exist_ok=True)
    size, results, skipped = module.model.size, {}, {}
    device = next(module.parameters()).device
    for i in range(0, len(files), batch_size):
        chunk, images = read_images(files[i:i + batch_size], skipped)
        if not chunk:
            continue
        x = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
        preds = module.predict_batch(torch.from_numpy(x).permute(0, 3, 1, 2).to(device))
        results.update({f.name: {**p, "score": round(p["score"], 4)} for f, p in zip(chunk, preds)})
    report_skipped(src, skipped, len(files))
    out = dst / "predictions.json"
    out.write_text(json.dumps({"classes": list(module.classes), "images": results,
                               **({"skipped": skipped} if skipped else {})}, indent=2) + "\n")
    return out
