"""The conv classes a CoLoRA layer can stand in for, and what each computes beyond `nn.ConvNd`: the one place that
knows them.

A CoLoRA layer replaces a conv. It must then compute what that conv's class computes, on K0 + ΔK instead of K0,
or refuse: a subclass of nn.Conv1d/2d/3d whose own `forward` a layer ignored would give a wrong output without a
word. A class is supported when its computation is one of these kinds:

- torch's own: the class overrides neither `forward` nor `_conv_forward` (nn.Conv1d/2d/3d themselves,
  torchvision's Conv3DSimple and Conv3DNoTemporal, any subclass that only changes the constructor);
- timm's Conv2dSame: TensorFlow's "SAME" padding, computed from each input's size (`pad_same`), then a conv
  without padding;
- timm's StdConv2d / ScaledStdConv2d: weight standardisation, each output channel of the weight brought to zero
  mean and unit variance (times `gain · scale` for the scaled one) before the conv; their "Same" variants pad
  first when their `same_pad` says so.

Standardisation is applied to the merged weight, standardise(K0 + ΔK), which is what the class computes on the
weight a merge writes (K0 ← K0 + ΔK stays exact). That forward is composite: ΔK and the standardisation in torch
ops, then `functional.colora_conv` on the standardised weight with a zero adapter, so autograd carries the
gradients through the standardisation to Kp, Kd (no fused kernel sees the adapter there).

timm's classes are recognised by their module and name, and only when that module is imported (a model built by
timm has imported it): timm stays optional. The formulas are those of timm 1.0 (timm/layers/padding.py,
std_conv.py, conv2d_same.py).
"""
import copy
import dataclasses
import functools
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import adapter_shapes
from .ops import delta_weight

TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

SUPPORTED = ("nn.Conv1d/2d/3d and their subclasses that override neither forward nor _conv_forward (such as "
             "torchvision's Conv3DSimple, Conv3DNoTemporal), and timm's Conv2dSame, StdConv2d, StdConv2dSame, "
             "ScaledStdConv2d, ScaledStdConv2dSame")


@dataclasses.dataclass(frozen=True)
class ConvKind:
    """What a conv class computes beyond F.convNd(x, weight, bias, stride, padding, dilation, groups).

    `same_pad`: "never"; "always" (timm's Conv2dSame: pad_same, then no padding); "flag" (pad_same, then the
    layer's own padding, when the layer's `same_pad` attribute is true). `standardise`: None, "std" or "scaled"
    (times gain · scale). `padding_mode`: whether the class honours `padding_mode` (torch's forward does; timm's
    call F.conv2d, which pads with zeros whatever the attribute says).
    """

    name: str
    same_pad: str = "never"
    standardise: Optional[str] = None
    padding_mode: bool = True

    def pads_input(self, layer: nn.Module) -> bool:
        return self.same_pad == "always" or (self.same_pad == "flag" and bool(layer.same_pad))

    def conv_arguments(self, layer: nn.Module, x: Tensor, pointwise: Tensor, depthwise: Tensor):
        """(x, weight, pointwise, depthwise, padding, padding_mode, cacheable) for `functional.colora_conv`, so that
        it computes this class's forward on K0 + ΔK; `cacheable`: whether the layer's merged-weight cache may
        hold what the conv runs on (not when the weight is standardised: the cache holds K0 + ΔK itself)."""
        padding, padding_mode = layer.padding, layer.padding_mode if self.padding_mode else "zeros"
        if self.pads_input(layer):
            x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
            if self.same_pad == "always":
                padding = 0
        if self.standardise is None:
            return x, layer.weight, pointwise, depthwise, padding, padding_mode, True
        merged = layer.weight + delta_weight(pointwise, depthwise, layer.groups, layer.order)
        # The adapter is already inside the standardised weight; the zero one adds nothing and trains nothing.
        kp_shape, kd_shape = adapter_shapes(merged.shape, layer.groups, layer.order)
        zeros = dict(device=merged.device, dtype=merged.dtype)
        return (x, self.transform_weight(layer, merged), torch.zeros(kp_shape, **zeros),
                torch.zeros(kd_shape, **zeros), padding, padding_mode, False)

    def transform_weight(self, layer: nn.Module, weight: Tensor) -> Tensor:
        """The weight the class convolves with, given its stored `weight` (timm's F.batch_norm call, verbatim)."""
        if self.standardise is None:
            return weight
        gain = (layer.gain * layer.scale).view(-1) if self.standardise == "scaled" else None
        return F.batch_norm(weight.reshape(1, layer.out_channels, -1), None, None, weight=gain, training=True,
                            momentum=0.0, eps=layer.eps).reshape_as(weight)


PLAIN = ConvKind("torch")

# (module, class) → kind, for the classes that define their own forward.
_TIMM_KINDS: Dict[Tuple[str, str], ConvKind] = {
    ("timm.layers.conv2d_same", "Conv2dSame"): ConvKind("timm Conv2dSame", same_pad="always", padding_mode=False),
    ("timm.layers.std_conv", "StdConv2d"): ConvKind("timm StdConv2d", standardise="std", padding_mode=False),
    ("timm.layers.std_conv", "StdConv2dSame"): ConvKind("timm StdConv2dSame", same_pad="flag", standardise="std",
                                                        padding_mode=False),
    ("timm.layers.std_conv", "ScaledStdConv2d"): ConvKind("timm ScaledStdConv2d", standardise="scaled",
                                                          padding_mode=False),
    ("timm.layers.std_conv", "ScaledStdConv2dSame"): ConvKind("timm ScaledStdConv2dSame", same_pad="flag",
                                                              standardise="scaled", padding_mode=False),
}


def pad_same(x: Tensor, kernel_size, stride, dilation) -> Tensor:
    """timm's `pad_same` (TensorFlow's "SAME"): zero-pad each spatial dim so that a conv without padding gives
    ceil(size / stride) outputs, the odd element after."""
    pads = []
    for size, k, s, d in reversed(list(zip(x.shape[x.dim() - len(kernel_size):], kernel_size, stride, dilation))):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _owner(cls: type, attr: str) -> type:
    """The class in cls's MRO whose `attr` runs."""
    return next(c for c in cls.__mro__ if attr in vars(c))


def _timm_kind(owner: type) -> Optional[ConvKind]:
    """The kind of timm class `owner`, when it is that class itself (the module imported holds it under its name),
    not one that merely shares the name."""
    kind = _TIMM_KINDS.get((owner.__module__, owner.__qualname__))
    module = sys.modules.get(owner.__module__)
    return kind if kind is not None and getattr(module, owner.__qualname__, None) is owner else None


def _hooks(conv: nn.Module) -> str:
    kinds = [name for name, hooks in (("forward pre-hooks", conv._forward_pre_hooks),
                                      ("forward hooks", conv._forward_hooks),
                                      ("backward hooks", conv._backward_hooks),
                                      ("backward pre-hooks", conv._backward_pre_hooks)) if hooks]
    return " and ".join(kinds)


def kind_or_reason(conv: nn.Module):
    """(the ConvKind of `conv`, None), or (None, why a CoLoRA layer cannot compute what `conv` computes); the
    reason does not list what is supported (`SUPPORTED`): an error naming several convs says that once."""
    cls = type(conv)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(conv, TORCH_CONVS):
        return None, f"{cls.__name__} is not an nn.Conv1d/2d/3d"
    if torch.nn.utils.parametrize.is_parametrized(conv):
        return None, (f"{cls.__name__} is parametrized (torch.nn.utils.parametrize computes its weight), which a "
                      "CoLoRA layer would not repeat; remove the parametrization first")
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return None, f"{cls.__name__} is a lazy conv not yet initialised; run one forward through it first"
    hooks = _hooks(conv)
    if hooks:
        return None, (f"{cls.__name__} has {hooks} (weight_norm, spectral_norm or your own), which the CoLoRA layer "
                      "replacing it would not run")
    forward = _owner(cls, "forward")
    if forward in TORCH_CONVS:
        culprit, method = _owner(cls, "_conv_forward"), "_conv_forward"
        if culprit in TORCH_CONVS:
            return PLAIN, None
    else:
        culprit, method = forward, "forward"
        kind = _timm_kind(forward)
        if kind is not None:
            return kind, None
    where = "" if culprit is cls else f" (in {culprit.__module__}.{culprit.__qualname__})"
    return None, f"{name} overrides {method}{where}, a computation CoLoRA does not know"


@functools.lru_cache(maxsize=None)
def _torch_conv_attributes(conv_cls: type) -> frozenset:
    """The instance attributes every `conv_cls` (nn.Conv1d/2d/3d) has."""
    return frozenset(vars(conv_cls(1, 1, 1, device="meta")))


def own_state(conv: nn.Module, conv_cls: type) -> Tuple[str, ...]:
    """The names of what `conv` holds beyond an nn.ConvNd's state: parameters other than weight and bias, buffers,
    submodules and plain attributes (timm's gain, eps, scale, same_pad)."""
    params = [n for n in conv._parameters if n not in ("weight", "bias")]
    attrs = [n for n in vars(conv) if n not in _torch_conv_attributes(conv_cls)]
    return tuple(params + list(conv._buffers) + list(conv._modules) + attrs)


def copy_state(source: nn.Module, target: nn.Module, names: Sequence[str], clone: bool) -> None:
    """Give `target` the state `names` of `source`, registered as it is there (parameter, buffer and its
    persistence, submodule, attribute): the tensors themselves (their parameters frozen, as a CoLoRA layer's base
    is), or with `clone` copies keeping `requires_grad`."""
    for name in names:
        if name in source._parameters:
            p = source._parameters[name]
            if p is not None and clone:
                p = nn.Parameter(p.detach().clone(), p.requires_grad)
            elif p is not None:
                p.requires_grad_(False)
            target.register_parameter(name, p)
        elif name in source._buffers:
            b = source._buffers[name]
            target.register_buffer(name, b.clone() if clone and b is not None else b,
                                   persistent=name not in source._non_persistent_buffers_set)
        elif name in source._modules:
            module = source._modules[name]
            target.add_module(name, copy.deepcopy(module) if clone else module)
        else:
            setattr(target, name, vars(source)[name])
