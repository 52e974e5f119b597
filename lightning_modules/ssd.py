"""SSD300 / SSD512 on VGG16, with per-layer widths named as in the papers.

Plain ``nn.Module`` parts only (no Lightning): the builder, the L2Norm layer and the default boxes.
The heads are torchvision's ``SSDHead`` and the default boxes come from torchvision's
``DefaultBoxGenerator``; what is written here by hand is the VGG16 trunk + extras with *named,
re-sizable* convolutions, which torchvision's ``SSDFeatureExtractorVGG`` does not offer (its layers
are anonymous ``Sequential`` entries and its SSD512 variant has the wrong extra layers, see METHOD.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSDHead


@dataclass(frozen=True)
class ConvSpec:
    """One named convolution of the detector (the papers' layer names)."""

    name: str
    width: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    pool_after: str | None = None  # "max" (2x2/2), "max_ceil" (2x2/2, ceil mode) or "pool5" (3x3/1, pad 1)


# VGG16 trunk as in the original SSD (Liu et al. 2016): pool3 uses ceil mode (75 -> 38 at 300 px),
# pool5 is 3x3/1 and fc6/fc7 become conv6 (3x3, dilation 6) and conv7 (1x1).
_VGG = (
    ConvSpec("conv1_1", 64), ConvSpec("conv1_2", 64, pool_after="max"),
    ConvSpec("conv2_1", 128), ConvSpec("conv2_2", 128, pool_after="max"),
    ConvSpec("conv3_1", 256), ConvSpec("conv3_2", 256), ConvSpec("conv3_3", 256, pool_after="max_ceil"),
    ConvSpec("conv4_1", 512), ConvSpec("conv4_2", 512), ConvSpec("conv4_3", 512, pool_after="max"),
    ConvSpec("conv5_1", 512), ConvSpec("conv5_2", 512), ConvSpec("conv5_3", 512, pool_after="pool5"),
    ConvSpec("conv6", 1024, padding=6, dilation=6), ConvSpec("conv7", 1024, kernel=1, padding=0),
)
_EXTRAS_300 = (
    ConvSpec("conv8_1", 256, kernel=1, padding=0), ConvSpec("conv8_2", 512, stride=2),
    ConvSpec("conv9_1", 128, kernel=1, padding=0), ConvSpec("conv9_2", 256, stride=2),
    ConvSpec("conv10_1", 128, kernel=1, padding=0), ConvSpec("conv10_2", 256, padding=0),
    ConvSpec("conv11_1", 128, kernel=1, padding=0), ConvSpec("conv11_2", 256, padding=0),
)
# SSD512 (original Caffe model): conv10_2 / conv11_2 are 3x3 stride 2 pad 1 and conv12_2 is 4x4 pad 1.
_EXTRAS_512 = (
    ConvSpec("conv8_1", 256, kernel=1, padding=0), ConvSpec("conv8_2", 512, stride=2),
    ConvSpec("conv9_1", 128, kernel=1, padding=0), ConvSpec("conv9_2", 256, stride=2),
    ConvSpec("conv10_1", 128, kernel=1, padding=0), ConvSpec("conv10_2", 256, stride=2),
    ConvSpec("conv11_1", 128, kernel=1, padding=0), ConvSpec("conv11_2", 256, stride=2),
    ConvSpec("conv12_1", 128, kernel=1, padding=0), ConvSpec("conv12_2", 256, kernel=4, padding=1),
)


@dataclass(frozen=True)
class PriorSpec:
    """Default-box settings of the original SSD (Liu et al. 2016, Caffe prototxts)."""

    sources: tuple[str, ...]
    feature_maps: tuple[int, ...]
    steps: tuple[int, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    variances: tuple[float, float] = (0.1, 0.2)


PRIORS = {
    300: PriorSpec(
        sources=("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"),
        feature_maps=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    512: PriorSpec(
        sources=("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2"),
        feature_maps=(64, 32, 16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128, 256, 512),
        min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
        max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
}
# Default-box sizes other than VOC's (PRIORS), by name: the original SSD's COCO models (Caffe prototxts; for SSD300
# min sizes 21, 45, 99, 153, 207, 261 and max sizes 45 ... 315, i.e. smaller boxes for COCO's small objects).
PRIOR_PRESETS = {
    "coco300": ((21.0, 45.0, 99.0, 153.0, 207.0, 261.0), (45.0, 99.0, 153.0, 207.0, 261.0, 315.0)),
    "coco512": ((20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
                (51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72)),
}


def resolve_prior_sizes(size: int, prior_sizes: str | dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(min_sizes, max_sizes) in pixels, one per detection branch: VOC's (``None``), a preset of ``PRIOR_PRESETS``
    (``"coco300"``, ``"coco512"``), or ``{"min_sizes": [...], "max_sizes": [...]}``."""
    if prior_sizes is None:
        return PRIORS[size].min_sizes, PRIORS[size].max_sizes
    if isinstance(prior_sizes, str):
        if prior_sizes not in PRIOR_PRESETS:
            raise ValueError(f"prior_sizes {prior_sizes!r} is not a preset ({', '.join(PRIOR_PRESETS)}); or give "
                             "{min_sizes: [...], max_sizes: [...]}")
        mins, maxs = PRIOR_PRESETS[prior_sizes]
    else:
        mins, maxs = tuple(prior_sizes.get("min_sizes", ())), tuple(prior_sizes.get("max_sizes", ()))
    mins, maxs = tuple(float(v) for v in mins), tuple(float(v) for v in maxs)
    n = len(PRIORS[size].sources)
    if len(mins) != n or len(maxs) != n:
        raise ValueError(f"SSD{size} has {n} detection branches: prior_sizes needs {n} min_sizes and {n} max_sizes, "
                         f"got {len(mins)} and {len(maxs)}")
    if any(a <= 0 or b <= a for a, b in zip(mins, maxs)):
        raise ValueError(f"prior_sizes: every min size must be > 0 and below its max size, got {mins} / {maxs}")
    return mins, maxs


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The 13 VGG16 convolutions in torchvision's ``vgg16().features`` order.
VGG_CONV_NAMES = tuple(s.name for s in _VGG[:13])


def layer_specs(size: int) -> tuple[ConvSpec, ...]:
    """All named convolutions of SSD``size`` in forward order."""
    if size not in PRIORS:
        raise ValueError(f"size must be 300 or 512, got {size}")
    return _VGG + (_EXTRAS_300 if size == 300 else _EXTRAS_512)


def default_boxes(size: int, num_branches: int | None = None, prior_sizes: str | dict | None = None) -> Tensor:
    """Default boxes as (cx, cy, w, h) in [0, 1], (8732, 4) for SSD300 and (24564, 4) for SSD512.

    torchvision's ``DefaultBoxGenerator`` does the geometry, one branch at a time with scales (min_size_k / size,
    max_size_k / size): the original rule, whose extra square box is sqrt(min_size_k * max_size_k) of each branch's
    own sizes. (One generator for all branches would take max_size_k as min_size_{k+1}: the same boxes for VOC's
    sizes and the presets, where they are equal, but not for ``prior_sizes`` given per branch.)
    """
    spec = PRIORS[size]
    k = len(spec.sources) if num_branches is None else num_branches
    mins, maxs = resolve_prior_sizes(size, prior_sizes)
    return torch.cat([
        DefaultBoxGenerator([list(spec.aspect_ratios[i])], scales=[mins[i] / size, maxs[i] / size],
                            steps=[spec.steps[i]])._grid_default_boxes([[f, f]], [size, size])
        for i, f in enumerate(spec.feature_maps[:k])])


def num_anchors(size: int) -> list[int]:
    return [2 + 2 * len(a) for a in PRIORS[size].aspect_ratios]


def l2norm_pruner():
    """Torch-Pruning handler for ``L2Norm`` (a layer its dependency graph does not know): its per-channel scale
    follows conv4_3's channels."""
    import torch_pruning as tp

    class L2NormPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = L2Norm

        def prune_out_channels(self, layer: L2Norm, idxs) -> nn.Module:
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = nn.Parameter(layer.weight.data[keep].clone())
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: L2Norm) -> int:
            return layer.weight.shape[0]

        get_in_channels = get_out_channels

    return L2NormPruner()


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet; SSD's conv4_3, scale 20)."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class SSD(nn.Module):
    """SSD detector. ``forward`` returns the raw head outputs ``(loc, conf)``:
    ``loc`` (N, P, 4) box offsets against the default boxes and ``conf`` (N, P, num_classes + 1) logits,
    class 0 being background. Decoding lives in :mod:`lightning_modules.box_ops`.
    """

    def __init__(self, size: int, num_classes: int, channels: dict[str, int], num_branches: int,
                 batch_norm: bool = False, prior_sizes: str | dict | None = None):
        super().__init__()
        self.size = size
        self.prior_sizes = prior_sizes
        self.num_classes = num_classes
        self.num_branches = num_branches
        spec = PRIORS[size]
        self.sources = spec.sources[:num_branches]
        last_source = self.sources[-1]
        self.specs: tuple[ConvSpec, ...] = ()
        self.layers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        in_ch = 3
        for s in layer_specs(size):
            width = channels[s.name]
            self.layers[s.name] = nn.Conv2d(in_ch, width, s.kernel, s.stride, s.padding, s.dilation)
            if batch_norm:
                self.norms[s.name] = nn.BatchNorm2d(width)
            self.specs += (s,)
            in_ch = width
            if s.name == last_source:
                break
        self.l2norm = L2Norm(channels["conv4_3"])
        self.head = SSDHead([channels[n] for n in self.sources], num_anchors(size)[:num_branches], num_classes + 1)
        self.register_buffer("priors", default_boxes(size, num_branches, prior_sizes), persistent=False)

    @property
    def channels(self) -> dict[str, int]:
        """Current width (output channels) of every named layer."""
        return {name: conv.out_channels for name, conv in self.layers.items()}

    # ------------------------------------------------ the pruning contract (lightning_modules/contract.py)
    never_prune = ("conv1_1",)  # the input layer: its filters see the image directly

    def layer_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in layer_specs(self.size))

    def head_consumers(self, name: str) -> list[nn.Conv2d]:
        """The loc/conf head convolutions that read ``name``'s channels (none unless it is a detection source)."""
        if name not in self.sources:
            return []
        k = list(self.sources).index(name)
        return [self.head.classification_head.module_list[k], self.head.regression_head.module_list[k]]

    def consumers(self, name: str) -> list[nn.Module]:
        """The next trunk convolution, then the heads of a source layer (conv4_3's L2Norm only rescales)."""
        names = list(self.layers)
        i = names.index(name)
        return ([self.layers[names[i + 1]]] if i + 1 < len(names) else []) + self.head_consumers(name)

    def example_input(self, batch: int = 1) -> Tensor:
        ref = next(self.parameters())
        return torch.zeros(batch, 3, self.size, self.size, device=ref.device, dtype=ref.dtype)

    def at_widths(self, widths: dict[str, int], num_branches: int | None = None) -> SSD:
        full = resolve_channels(self.size, None, 1.0)
        widths = {n: widths.get(n, full[n]) for n in full}  # layers dropped with their branches: any width
        return build_ssd(self.size, self.num_classes + 1, widths, 1.0, num_branches or self.num_branches, False,
                         bool(len(self.norms)), self.prior_sizes)

    def param_dims(self) -> dict[str, tuple[str | None, str | None]]:
        """For each parameter: which layer's channels index its dim 0 and dim 1 (None: unaffected)."""
        from lightning_modules.contract import chain_param_dims

        dims = chain_param_dims([s.name for s in self.specs])
        dims["l2norm.weight"] = ("conv4_3", None)
        for head in ("classification_head", "regression_head"):
            for k, src in enumerate(self.sources):
                dims[f"head.{head}.module_list.{k}.weight"] = (None, src)
                dims[f"head.{head}.module_list.{k}.bias"] = (None, None)
        return dims

    def tp_pruners(self) -> dict:
        return {L2Norm: l2norm_pruner()}

    @torch.no_grad()
    def drop_branches(self, k: int) -> None:
        """Keep only the first k detection branches (paper A's "pruned-kdet"): later extra layers, their heads and
        their default boxes go."""
        if k >= len(self.sources):
            return
        last = self.sources[k - 1]
        names = [s.name for s in self.specs]
        cut = names.index(last) + 1
        for n in names[cut:]:
            del self.layers[n]
            if n in self.norms:
                del self.norms[n]
        self.specs = self.specs[:cut]
        self.sources = self.sources[:k]
        self.num_branches = k
        for head in (self.head.classification_head, self.head.regression_head):
            head.module_list = nn.ModuleList(list(head.module_list)[:k])
        self.priors = default_boxes(self.size, k, self.prior_sizes).to(self.priors.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = []
        for s in self.specs:
            x = self.layers[s.name](x)
            if s.name in self.norms:
                x = self.norms[s.name](x)
            x = F.relu(x, inplace=True)
            if s.name == "conv4_3":
                features.append(self.l2norm(x))
            elif s.name in self.sources:
                features.append(x)
            if s.pool_after == "max":
                x = F.max_pool2d(x, 2, 2)
            elif s.pool_after == "max_ceil":
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            elif s.pool_after == "pool5":
                x = F.max_pool2d(x, 3, 1, 1)
        out = self.head(features)
        return out["bbox_regression"], out["cls_logits"]


def resolve_channels(size: int, channels: dict[str, int] | None = None, width_mult: float = 1.0) -> dict[str, int]:
    """Widths of every layer: the paper defaults times ``width_mult`` (at least 1), then ``channels`` overrides."""
    names = [s.name for s in layer_specs(size)]
    out = {s.name: max(1, int(round(s.width * width_mult))) for s in layer_specs(size)}
    for name, width in (channels or {}).items():
        if name not in out:
            raise ValueError(f"unknown layer {name!r} in channels; SSD{size} layers are: {', '.join(names)}")
        if int(width) < 1:
            raise ValueError(f"channels[{name!r}] must be >= 1, got {width}")
        out[name] = int(width)
    return out


def _init_weights(model: SSD, background_prior: float = 0.99) -> None:
    """Xavier weights, zero biases; the conf head's background logit starts at log(0.99 C / 0.01) so every
    default box starts as "background with probability 0.99" (the prior init of RetinaNet, Lin et al. 2017).
    Ours, not the original SSD's: with zero biases the first iterations' hard-negative loss is ~10x larger and
    from-scratch training (the CPU demo) loses hundreds of iterations to it."""
    for conv in model.layers.values():
        nn.init.xavier_uniform_(conv.weight)
        nn.init.zeros_(conv.bias)
    c = model.num_classes
    if background_prior > 0:
        bias = math.log(background_prior * c / (1 - background_prior))
        for conv in model.head.classification_head.module_list:
            with torch.no_grad():
                conv.bias.view(-1, c + 1)[:, 0] = bias


def load_vgg16_imagenet(model: SSD) -> None:
    """Copy torchvision's ImageNet VGG16 into conv1_1..conv5_3: the conv weights of ``VGG16_Weights.
    IMAGENET1K_FEATURES`` (the standard SSD start), or, for a model with BatchNorm, ``vgg16_bn``'s
    ``VGG16_BN_Weights.IMAGENET1K_V1`` conv weights *and* BatchNorm scales, shifts and running statistics (the start
    of the project's default method at full scale, which works on BatchNorm scales: ``experiments/voc_ssd300_default.yaml``).

    Only layers whose width matches the dense VGG16 are loaded, so this is for the unpruned trunk.
    """
    import torchvision.models as tvm

    bn = len(model.norms) > 0
    weights_name = "VGG16_BN_Weights.IMAGENET1K_V1" if bn else "VGG16_Weights.IMAGENET1K_FEATURES"
    try:
        vgg = tvm.vgg16_bn(weights=tvm.VGG16_BN_Weights.IMAGENET1K_V1) if bn else \
            tvm.vgg16(weights=tvm.VGG16_Weights.IMAGENET1K_FEATURES)
    except Exception as err:  # network errors surface as URLError, OSError, RuntimeError...
        raise RuntimeError(
            f"could not load torchvision's ImageNet VGG16{'-BN' if bn else ''} weights ({weights_name}): "
            f"{err}. They are downloaded on first use into the torch hub cache (~/.cache/torch/hub/checkpoints); "
            "on an offline machine copy the file there first, or run with --model.pretrained_backbone false."
        ) from err
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in vgg.features if isinstance(m, nn.BatchNorm2d)]
    for i, (name, src) in enumerate(zip(VGG_CONV_NAMES, convs)):
        dst = model.layers[name]
        if dst.weight.shape != src.weight.shape:
            raise ValueError(
                f"pretrained_backbone needs the full VGG16 width at {name}: model has {tuple(dst.weight.shape)}, "
                f"ImageNet weights are {tuple(src.weight.shape)}"
            )
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            if bn:
                model.norms[name].load_state_dict(norms[i].state_dict())


def build_ssd(
    size: int = 300,
    num_classes: int = 21,
    channels: dict[str, int] | None = None,
    width_mult: float = 1.0,
    num_branches: int | None = None,
    pretrained_backbone: bool = False,
    batch_norm: bool = False,
    prior_sizes: str | dict | None = None,
) -> SSD:
    """Build SSD``size`` on VGG16.

    ``num_classes`` counts the object classes *with* background, as in the papers' "21 classes" for VOC;
    ``channels`` maps the papers' layer names to widths (the rest follow ``width_mult``);
    ``num_branches`` keeps only the first k detection branches (paper A's "pruned-kdet");
    ``batch_norm`` adds BatchNorm after every convolution (not in the original SSD; it lets small models
    train from scratch quickly, as the CPU demo must, since ImageNet weights cannot be fetched there, and it gives
    the channel gates the default method prunes on; with ``pretrained_backbone`` the trunk starts from torchvision's
    ImageNet ``vgg16_bn``);
    ``prior_sizes`` sets the default-box sizes (``resolve_prior_sizes``: VOC's by default, ``"coco300"`` ...).
    """
    n_src = len(PRIORS[size].sources) if size in PRIORS else 0
    if size not in PRIORS:
        raise ValueError(f"size must be 300 or 512, got {size}")
    k = n_src if num_branches is None else int(num_branches)
    if not 1 <= k <= n_src:
        raise ValueError(f"num_branches must be in 1..{n_src} for SSD{size}, got {num_branches}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    resolve_prior_sizes(size, prior_sizes)  # a bad setting fails here, naming what is wrong
    model = SSD(size, num_classes - 1, resolve_channels(size, channels, width_mult), k, batch_norm, prior_sizes)
    _init_weights(model)
    if pretrained_backbone:
        load_vgg16_imagenet(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Exported models: model.safetensors (weights, no pickle) + model.json (everything needed to rebuild and use them)

EXPORT_FORMAT = "ssd-pruning/1"


class WeightsMismatchError(ValueError):
    """Weights that do not fit the architecture they are loaded into."""


def check_state_dict(own: dict[str, Tensor], incoming: dict[str, Tensor], source: str) -> None:
    """Fail with the first mismatched layer and both shapes (instead of PyTorch's wall of size mismatches)."""
    for key, value in own.items():
        if key not in incoming:
            raise WeightsMismatchError(f"{source}: no weights for {key} (model expects shape {tuple(value.shape)})")
        if tuple(incoming[key].shape) != tuple(value.shape):
            raise WeightsMismatchError(
                f"{source}: {key} has shape {tuple(incoming[key].shape)}, the model expects {tuple(value.shape)} — "
                "the weights come from a different (pruned?) architecture; load them with the architecture they "
                "were saved with (a checkpoint or model.json carries it)")
    extra = [k for k in incoming if k not in own]
    if extra:
        raise WeightsMismatchError(f"{source}: weights for layers the model does not have, first: {extra[0]}")


def export_spec(model: SSD, classes: list[str], decode: dict | None = None) -> dict:
    """The model.json contents: architecture, classes, input convention and decoding settings."""
    return {
        "format": EXPORT_FORMAT,
        "architecture": {
            "size": model.size,
            "channels": model.channels,
            "num_branches": model.num_branches,
            "batch_norm": len(model.norms) > 0,
            "prior_sizes": model.prior_sizes,
        },
        "classes": list(classes),
        "input": {
            "size": [model.size, model.size],
            "layout": "NCHW, RGB",
            "range": "0-255 (uint8 or float)",
            "mean": [m * 255 for m in IMAGENET_MEAN],
            "std": [s * 255 for s in IMAGENET_STD],
            "resize": "plain resize of the whole image to size x size (no letterbox)",
        },
        "priors": {
            "num_priors": int(model.priors.shape[0]),
            "format": "cx, cy, w, h normalised to [0, 1] (torchvision DefaultBoxGenerator)",
            "feature_maps": list(PRIORS[model.size].feature_maps[: model.num_branches]),
            "steps": list(PRIORS[model.size].steps[: model.num_branches]),
            "min_sizes": list(resolve_prior_sizes(model.size, model.prior_sizes)[0][: model.num_branches]),
            "max_sizes": list(resolve_prior_sizes(model.size, model.prior_sizes)[1][: model.num_branches]),
            "aspect_ratios": [list(a) for a in PRIORS[model.size].aspect_ratios[: model.num_branches]],
        },
        "decode": {
            "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
            "conf_threshold": 0.01,
            "nms_threshold": 0.45,
            "top_k": 200,
            **(decode or {}),
        },
        "outputs": {"loc": "[N, num_priors, 4] box offsets", "conf": "[N, num_priors, num_classes + 1] logits, 0 = background"},
        "params": sum(p.numel() for p in model.parameters()),
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_exported(model: SSD, out_dir, classes: list[str], decode: dict | None = None,
                  extra: dict | None = None) -> dict[str, str]:
    """Write ``model.safetensors`` and ``model.json`` (plus the ``extra`` keys) into ``out_dir``, each atomically.
    Returns their paths."""
    import json

    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec = {**export_spec(model, classes, decode), **(extra or {})}
    _atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": EXPORT_FORMAT}))
    _atomic_write_bytes(out / "model.json", (json.dumps(spec, indent=2) + "\n").encode())
    return {"safetensors": str(out / "model.safetensors"), "json": str(out / "model.json")}


def read_export_spec(path) -> tuple[dict, Path]:
    """Find and parse model.json for ``path`` (the export folder, model.json or model.safetensors)."""
    import json

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    spec_path, weights_path = folder / "model.json", folder / "model.safetensors"
    for f in (spec_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: an exported model is a folder with model.json and model.safetensors")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{spec_path} is not valid JSON ({err}); the export is corrupt — export it again") from err
    if not isinstance(spec, dict) or spec.get("format") != EXPORT_FORMAT or "architecture" not in spec:
        raise ValueError(f"{spec_path} is not an SSD export of this project (expected format {EXPORT_FORMAT!r})")
    return spec, weights_path


def load_exported(path) -> SSD:
    """Rebuild an exported model from ``model.json`` + ``model.safetensors``: no pickle, no callbacks, no Lightning.

    ``path`` is the export folder (or either file in it). The returned ``SSD`` is in eval mode and carries the
    parsed model.json as ``model.export_spec`` (classes, input normalisation, decoding settings).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec, weights_path = read_export_spec(path)
    arch = spec["architecture"]
    model = build_ssd(arch["size"], len(spec["classes"]) + 1, arch["channels"], 1.0, arch["num_branches"],
                      False, arch.get("batch_norm", False), arch.get("prior_sizes"))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is truncated or corrupt ({err}); export the model again") from err
    check_state_dict(model.state_dict(), state, str(weights_path))
    model.load_state_dict(state)
    model.eval()
    model.export_spec = spec
    return model
