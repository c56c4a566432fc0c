"""The models ``colora-finetune`` trains: a backbone with the paper's head (or a torchvision classifier re-sized),
its pretrained weights, and which of its parameters each strategy trains."""
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import colora_fused as cf
from ..serialization import load_merged

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UsageError(ValueError):
    """A bad option, model name, weights file or checkpoint; reported as one line before training starts."""


def reason(error):
    """The first line of an exception's message (or its type): what a one-line error report quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class PaperHead(nn.Module):
    """The paper's decision stage: 1×1 conv ``channels → reduced``, ReLU, then two fully connected layers.

    The feature map is average-pooled to ``pool × pool`` first (the identity for VGG-16 / ResNet-50 at 224²,
    whose last feature map is 7×7), so the head has a fixed size for any input resolution. With 4 classes this
    reproduces the paper's counts (Table 4): VGG-16 15.58M parameters, head 0.87M ("0.9M"), CoLoRA adapters +
    head 2.55M ("2.5M trained by backpropagation"); ResNet-50 + CoLoRA 14.5M trained of 38.0M.
    """

    def __init__(self, channels, num_classes, reduced=128, hidden=128, pool=7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.fc1 = nn.Linear(reduced * pool * pool, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.relu(self.reduce(self.pool(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class HeadNet(nn.Module):
    """``head(features(x))``: a convolutional backbone and the paper's head."""

    def __init__(self, features, head):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


def small_cnn_features(in_channels):
    """Four 3×3 convs with two 2× max-pools: the demo's backbone for 8×8 digits."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )


@dataclass
class ModelSpec:
    model: nn.Module
    head: list  # qualified names of the modules trained from scratch
    in_channels: int
    mean: tuple
    std: tuple
    image_size: int = None  # None: the data's own size


def read_state_dict(path):
    """A state dict from ``path`` (``torch.load(weights_only=True)`` or safetensors), never running code."""
    if not os.path.isfile(path):
        raise UsageError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            sd = load_merged(path)[0]
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is a usage error here
        raise UsageError(f"cannot read weights {path}: {reason(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"weights {path} hold no state dict of tensors")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())


def key_mismatch(expected, given):
    """How the tensors ``given`` differ from the shapes ``expected`` (both keyed by name), or None if they fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in given.items()
                 if k in expected and tuple(v.shape) != tuple(expected[k])]
    parts = [f"{len(ks)} {label} (e.g. {', '.join(ks[:3])})"
             for label, ks in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if ks]
    return "; ".join(parts) or None


def load_weights(module, sd, source, what, ignore=()):
    """Copy ``sd`` into ``module``, all or nothing; keys under the ``ignore`` prefixes are skipped."""
    expected = {k: v.shape for k, v in module.state_dict().items() if not k.startswith(ignore)}
    keep = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    mismatch = key_mismatch(expected, keep)
    if mismatch:
        raise UsageError(f"weights {source} do not fit {what}: {mismatch}")
    module.load_state_dict(keep, strict=False)


def build_model(name, num_classes, in_channels, weights=None, weights_path="weights", head_hidden=128):
    """The model ``name`` with a fresh ``num_classes`` head, backbone weights from the state dict ``weights``.

    ``vgg16`` / ``resnet50``: torchvision's backbone (torchvision key layout for ``weights``; its classifier
    keys are ignored) with :class:`PaperHead`. ``smallcnn``: the demo's CNN (its own layout, ``head.*``
    ignored). Any other torchvision classification model by name: loaded whole but for its classifier, the
    last ``nn.Linear``, which is replaced by one with ``num_classes`` outputs.
    """
    if name == "smallcnn":
        model = HeadNet(small_cnn_features(in_channels), PaperHead(64, num_classes, reduced=16, hidden=64, pool=2))
        if weights is not None:
            load_weights(model, weights, weights_path, "smallcnn", ignore=("head.",))
        return ModelSpec(model, ["head"], in_channels, (0.5,), (0.5,))
    import torchvision  # here, not at the top: the demo's smallcnn does without its ~1 s import

    if name in ("vgg16", "resnet50"):
        tv = getattr(torchvision.models, name)(weights=None)
        if weights is not None:
            load_weights(tv, weights, weights_path, name, ignore=("classifier.", "fc.", "head."))
        if name == "vgg16":
            features, channels = tv.features, 512
        else:
            stages = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            features = nn.Sequential(OrderedDict((k, getattr(tv, k)) for k in stages))
            channels = 2048
        model = HeadNet(features, PaperHead(channels, num_classes, hidden=head_hidden))
        return ModelSpec(model, ["head"], 3, IMAGENET_MEAN, IMAGENET_STD, 224)
    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError):
        raise UsageError(f"unknown model {name!r}: use vgg16, resnet50, smallcnn or a torchvision classification "
                         "model name") from None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"model {name!r} has no nn.Linear classifier to re-size")
    if weights is not None:
        load_weights(model, weights, weights_path, name, ignore=(linears[-1] + ".",))
    old = model.get_submodule(linears[-1])
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Linear(old.in_features, num_classes))
    return ModelSpec(model, [linears[-1]], 3, IMAGENET_MEAN, IMAGENET_STD, 224)


def in_head(name, head):
    """Whether the parameter or module ``name`` belongs to one of the modules ``head`` names."""
    return any(name == h or name.startswith(h + ".") for h in head)


def setup_strategy(spec, strategy, order="pointwise_first", backend="auto", rank=1):
    """Make ``spec.model`` train as ``strategy``; returns the CoLoRA layer names (empty unless ``colora``).

    ``colora``: ``cf.get_colora_model`` wraps every backbone conv (``rank``: the terms of each, or {conv name:
    rank}, an allocation plan whose left-out convs stay plain) and freezes all but the adapters and the head, as
    PEFT does with ``modules_to_save``; ``head``: all but the head frozen; ``full``: nothing frozen. Frozen
    includes BatchNorm's affine parameters; its running statistics still follow the new data in training mode.
    """
    model = spec.model
    if strategy == "colora":
        backbone = lambda n, m: not in_head(n, spec.head) and (isinstance(rank, int) or n in rank)  # noqa: E731
        cf.get_colora_model(model, cf.CoLoRAConfig(target_modules=backbone, modules_to_save=list(spec.head),
                                                   order=order, backend=backend, rank=rank))
        return [n for n, _ in cf.colora_layers(model)]
    for n, p in model.named_parameters():
        p.requires_grad_(strategy == "full" or in_head(n, spec.head))
    return []
