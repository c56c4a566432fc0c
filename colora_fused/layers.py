"""CoLoRAConv1d/2d/3d: drop-in `nn.ConvNd` subclasses with a frozen base and a trainable Kp ⊛ Kd residual."""
import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import conv_kinds
from . import functional
from . import mixed
from . import ops
from ._conv import MergeSpec, adapter_rank, adapter_shapes, adapter_terms, check_rank
from .config import CoLoRAConfig, with_options
from .functional import chosen_backend, colora_conv

DEFAULT = "default"  # the adapter a layer is built with: its own pointwise, depthwise, bias_delta


class _Adapter(nn.Module):
    """A named adapter of a CoLoRA layer: `pointwise` (Kp), `depthwise` (Kd), `bias_delta` (Δb, or None when
    `c_out` is 0), shaped as the layer's own."""

    def __init__(self, kp_shape, kd_shape, c_out: int, device, dtype):
        super().__init__()
        self.pointwise = nn.Parameter(torch.empty(kp_shape, device=device, dtype=dtype))
        self.depthwise = nn.Parameter(torch.empty(kd_shape, device=device, dtype=dtype))
        self.bias_delta = nn.Parameter(torch.empty(c_out, device=device, dtype=dtype)) if c_out else None


class _CoLoRAConvNd:
    """The CoLoRA part shared by the three layers; each also subclasses the matching `nn.ConvNd` (`_conv_cls`).

    Constructor as torch's, plus the adapter options, read from `config` (a `CoLoRAConfig`, whose selection
    fields a layer ignores) with keyword options overriding its fields (`config.with_options`): `order`
    ("pointwise_first" | "depthwise_first"), `train_bias` (None: a Δb exists iff the base conv has a bias),
    `backend` (`backends.NAMES`: "auto" | "triton" | "hybrid" | "torch" | "reference") and `rank` (an int r ≥ 1 of
    terms, ΔK = Σ_i Kp[i] ⊛ Kd[i]; at r = 1 Kp is [C_out, C_in/groups] and Kd [C_out or C_in, *k], the paper's
    shapes; at r > 1 both get a leading r).

    Attributes: `disable_adapters` (False; PEFT's name): True makes forward the plain base conv (K0, b0).
    `cache_merged_weight` (True): the torch and hybrid backends keep K0 + ΔK in one buffer per dtype between calls,
    rebuilt when K0, Kp or Kd changed (`ops.MergedWeightCache`; one weight-sized copy per layer); False merges
    on every forward and backward instead.

    What the layer computes is what its base conv's class computes (`conv_kinds`): `from_conv` of a timm
    StdConv2d gives a layer that standardises K0 + ΔK, of a Conv2dSame one that pads each input as TensorFlow's
    "SAME"; `conv_kind` says which, `base_class` is that class (the `nn.ConvNd` itself for a layer built by the
    constructor), and `to_conv` gives one back.

    Named adapters (`colora_fused.adapters`): besides its own adapter, "default" (`pointwise`, `depthwise`,
    `bias_delta`), a layer may hold more in `colora_adapters` (created by the first `add_adapter`).
    `active_adapters` (("default",)) names those the forward sums: ΔK = Σ over them of their terms, Δb the sum
    of their Δb.
    """

    _conv_cls: type
    conv_kind: conv_kinds.ConvKind = conv_kinds.PLAIN
    _base_class: Optional[type] = None
    _base_state: Tuple[str, ...] = ()  # what from_conv took over beyond the nn.ConvNd's own state (timm's eps, gain)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, config: Optional[CoLoRAConfig] = None,
                 **options):
        config = _layer_config(config, options, type(self).__name__)
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                bias, padding_mode, device, dtype)
        self._init_adapters(config)

    def _init_adapters(self, config: CoLoRAConfig) -> None:
        """The CoLoRA state of a layer whose conv state is set: the adapter options of `config`, the frozen base
        and a fresh "default" adapter (ΔK = 0)."""
        self.order, self.rank, self.backend = config.order, config.rank, config.backend
        self.disable_adapters = False
        self.active_adapters = (DEFAULT,)
        self._mixed_batch: Optional[mixed.MixedBatch] = None  # set inside `per_sample.adapters_per_sample`
        self.cache_merged_weight = True
        self._merge_cache = ops.MergedWeightCache()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        kp_shape, kd_shape = adapter_shapes(self.weight.shape, self.groups, self.order, self.rank)
        self.pointwise = nn.Parameter(torch.empty(kp_shape, **factory))
        self.depthwise = nn.Parameter(torch.empty(kd_shape, **factory))
        has_bias_delta = self.bias is not None if config.train_bias is None else config.train_bias
        self.bias_delta = nn.Parameter(torch.empty(self.out_channels, **factory)) if has_bias_delta else None
        self.reset_adapter_()

    @property
    def base_class(self) -> type:
        """The class of the conv this layer stands in for, whose computation it repeats on K0 + ΔK."""
        return self._base_class or self._conv_cls

    @classmethod
    def refusal(cls, conv: nn.Module) -> Optional[str]:
        """Why `from_conv(conv)` would refuse `conv` (a class whose computation `conv_kinds` does not know, a
        CoLoRA layer, state named as the layer's own), or None when it wraps it."""
        if not isinstance(conv, cls._conv_cls):
            return f"{type(conv).__name__} is not an nn.{cls._conv_cls.__name__}"
        if isinstance(conv, _CoLoRAConvNd):
            return f"{type(conv).__name__} is a CoLoRA layer already"
        _, reason = conv_kinds.kind_or_reason(conv)
        if reason is not None:
            return reason
        clash = sorted(set(conv_kinds.own_state(conv, cls._conv_cls)) & _reserved_names(cls))
        if clash:
            return f"{type(conv).__name__} holds {', '.join(clash)}, names a CoLoRA layer uses for itself"
        return None

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Optional[CoLoRAConfig] = None, **options):
        """Wrap `conv`, reusing (not copying) its weight, bias and whatever else its class holds (timm's gain, eps,
        ...), the parameters frozen; the adapter options as for the constructor (`config`, keyword overrides).
        `conv` is an nn.ConvNd of this dimension or a subclass `conv_kinds` supports; anything else raises
        TypeError naming its class (and what is supported), and nothing changes."""
        reason = cls.refusal(conv)
        if reason is not None:
            raise TypeError(f"{cls.__name__}.from_conv: {reason} (CoLoRA supports {conv_kinds.SUPPORTED})")
        config = _layer_config(config, options, f"{cls.__name__}.from_conv")
        kind, _ = conv_kinds.kind_or_reason(conv)
        layer = cls.__new__(cls)
        cls._conv_cls.__init__(layer, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                               device="meta", dtype=conv.weight.dtype)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._base_state = conv_kinds.own_state(conv, cls._conv_cls)
        conv_kinds.copy_state(conv, layer, layer._base_state, clone=False)
        layer.conv_kind, layer._base_class = kind, type(conv)
        layer._init_adapters(config)
        layer.train(conv.training)
        return layer

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "depthwise"):
            self.reset_adapter_()

    @torch.no_grad()
    def reset_adapter_(self, name: str = "default"):
        """Kd = 0, Δb = 0, Kp Glorot-uniform (fan_in = C_in/groups, fan_out = C_out; each term at rank r) for the
        adapter `name`: its ΔK = 0 again."""
        adapter = self.adapter(name)
        fan_in, fan_out = adapter.pointwise.shape[-1], adapter.pointwise.shape[-2]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        adapter.pointwise.uniform_(-bound, bound)
        adapter.depthwise.zero_()
        if adapter.bias_delta is not None:
            adapter.bias_delta.zero_()
        return self

    def add_adapter(self, name: str, rank: int = 1, train_bias: Optional[bool] = None) -> None:
        """A new adapter `name` of `rank` terms beside "default", fresh (ΔK = 0, Kp drawn, Kd = Δb = 0), trainable
        and not yet active; `train_bias` as for the layer (None: a Δb iff the base conv has a bias)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter names are Python identifiers (they become state-dict keys), got {name!r}")
        if name in self.adapter_names():
            raise ValueError(f"{type(self).__name__} already has an adapter {name!r}")
        check_rank(rank)
        if not hasattr(self, "colora_adapters"):
            self.colora_adapters = nn.ModuleDict()
        kp_shape, kd_shape = adapter_shapes(self.weight.shape, self.groups, self.order, rank)
        has_bias_delta = self.bias is not None if train_bias is None else bool(train_bias)
        self.colora_adapters[name] = _Adapter(kp_shape, kd_shape, self.out_channels if has_bias_delta else 0,
                                              self.weight.device, self.weight.dtype)
        self.reset_adapter_(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (not "default") and drop it from the active ones."""
        if name == DEFAULT:
            raise ValueError('the "default" adapter is the layer\'s own and cannot be deleted')
        self.adapter(name)
        del self.colora_adapters[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def adapter_names(self) -> List[str]:
        """"default", then the named adapters in the order they were added."""
        return [DEFAULT] + list(getattr(self, "colora_adapters", {}))

    def adapter(self, name: str) -> nn.Module:
        """The module holding adapter `name`'s `pointwise`, `depthwise`, `bias_delta`: the layer itself for
        "default". Raises KeyError naming the adapters there are."""
        if name == DEFAULT:
            return self
        named = getattr(self, "colora_adapters", {})
        if name not in named:
            raise KeyError(f"{type(self).__name__} has no adapter {name!r}; it has {self.adapter_names()}")
        return named[name]

    def factors(self, names: Optional[Sequence[str]] = None):
        """(Kp, Kd, Δb) of the adapters `names` (default: the active ones) as one adapter: their terms stacked
        along the rank dim (a plain adapter's own tensors when it is alone), Δb summed (None when none has one).
        None for Kp and Kd when `names` is empty."""
        names = self.active_adapters if names is None else tuple(names)
        adapters = [self.adapter(n) for n in names]
        if len(adapters) == 1:
            a = adapters[0]
            return a.pointwise, a.depthwise, a.bias_delta
        if not adapters:
            return None, None, None
        terms = [adapter_terms(a.pointwise, a.depthwise) for a in adapters]
        deltas = [a.bias_delta for a in adapters if a.bias_delta is not None]
        return (torch.cat([kp for kp, _ in terms]), torch.cat([kd for _, kd in terms]),
                sum(deltas[1:], deltas[0]) if deltas else None)

    def delta_weight(self, names: Sequence[str] = (DEFAULT,)) -> Tensor:
        """ΔK = Kp ⊛ Kd (summed over the terms at rank r, and over the adapters `names`), shaped like `weight`."""
        kp, kd, _ = self.factors(names)
        return ops.delta_weight(kp, kd, self.groups, self.order)

    @torch.no_grad()
    def check_mergeable(self, names: Sequence[str] = (DEFAULT,)) -> None:
        """Raise ValueError if merging the adapters `names` would write a non-finite value into the base weight
        or bias."""
        finite = lambda t: t is None or bool(torch.isfinite(t).all())  # noqa: E731
        kp, kd, db = self.factors(names)
        if not (finite(kp) and finite(kd) and finite(db)):
            raise ValueError(f"{type(self).__name__}: the adapters hold non-finite values; merge refused, "
                             "weights unchanged")
        # |K0 + ΔK| ≤ max|K0| + r·max|Kp|·max|Kd|: only when that bound could overflow is ΔK built to look.
        bound = (self.weight.abs().amax().double() + adapter_rank(kp) * kp.abs().amax().double()
                 * kd.abs().amax().double())
        if bound >= torch.finfo(self.weight.dtype).max and not finite(self.weight + self.delta_weight(names)):
            raise ValueError(f"{type(self).__name__}: K0 + ΔK overflows {self.weight.dtype}; merge refused, "
                             "weights unchanged")
        if self.bias is not None and db is not None and not finite(self.bias + db):
            raise ValueError(f"{type(self).__name__}: b0 + Δb overflows {self.bias.dtype}; merge refused, "
                             "weights unchanged")

    @torch.no_grad()
    def merge_(self, names: Sequence[str] = (DEFAULT,)):
        """K0 ← K0 + ΔK, b0 ← b0 + Δb (eq. 10–11) of the adapters `names`, then reset them. The output of the
        layer with those adapters active is unchanged."""
        self.check_mergeable(names)
        merge_layers_([self], names)
        return self

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """A conv of `base_class` (the class `from_conv` was given; an `nn.ConvNd` otherwise) holding K0 + ΔK and
        b0 + Δb of the active adapters, and copies of the rest of its state (for inference and export); this
        layer is untouched."""
        _, _, db = self.factors()
        has_bias = self.bias is not None or db is not None
        conv = self._conv_cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                              self.dilation, self.groups, has_bias, self.padding_mode, device="meta",
                              dtype=self.weight.dtype)
        if self.base_class is not self._conv_cls:
            # A subclass's constructor may take other arguments (torchvision's Conv3DSimple does): the conv is built
            # as torch's, then given its class; its state is torch's plus what from_conv took over, restored below.
            conv.__class__ = self.base_class
        conv_kinds.copy_state(self, conv, self._base_state, clone=True)
        delta = self.delta_weight(self.active_adapters) if self.active_adapters else torch.zeros_like(self.weight)
        conv.weight = nn.Parameter(self.weight + delta, requires_grad=self.weight.requires_grad)
        if has_bias:
            bias = ops._summed_bias(self.bias, db).clone()
            base_grad = self.bias.requires_grad if self.bias is not None else False
            conv.bias = nn.Parameter(bias, requires_grad=base_grad)
        conv.train(self.training)
        return conv

    def adapter_parameters(self, names: Optional[Sequence[str]] = None):
        """The adapter tensors of the adapters `names` (default: all of them, "default" first)."""
        adapters = [self.adapter(n) for n in (self.adapter_names() if names is None else names)]
        return [p for a in adapters for p in (a.pointwise, a.depthwise, a.bias_delta) if p is not None]

    def _colora_arguments(self, input: Tensor, names: Optional[Sequence[str]] = None):
        """The arguments of `colora_conv` that compute `base_class`'s forward on K0 + ΔK of the adapters `names`
        (default: the active ones; `conv_kinds`), and whether the merged-weight cache may serve it."""
        kp, kd, db = self.factors(names)
        x, weight, kp, kd, padding, padding_mode, cacheable = self.conv_kind.conv_arguments(self, input, kp, kd)
        return (x, weight, self.bias, kp, kd, db, self.stride, padding, self.dilation, self.groups, padding_mode,
                self.order, self.backend), cacheable

    def forward(self, input: Tensor) -> Tensor:
        if self.disable_adapters:
            return self.base_class.forward(self, input)
        if getattr(self, "_mixed_batch", None) is not None:
            return self._forward_mixed(input, self._mixed_batch)
        return self._forward_set(input, self.active_adapters)

    def _forward_set(self, input: Tensor, names: Sequence[str], cache: bool = True) -> Tensor:
        """The forward with the adapters `names` summed (the base conv alone when there is none)."""
        if not names:
            return self.base_class.forward(self, input)
        args, cacheable = self._colora_arguments(input, names)
        cache = cache and self.cache_merged_weight and cacheable
        return colora_conv(*args, merge_cache=self._merge_cache if cache else None)

    def _forward_mixed(self, input: Tensor, batch: "mixed.MixedBatch") -> Tensor:
        """A mixed batch (`per_sample.adapters_per_sample`): sample n with the adapters batch.sets[index[n]]."""
        size = input.shape[0] if input.dim() == self.weight.dim() else 1
        if size != batch.index.shape[0]:
            raise ValueError(f"adapters_per_sample: layer {batch.name!r} ({type(self).__name__}) got a batch of "
                             f"{size} samples, but {batch.index.shape[0]} adapter assignments were given")
        if len(batch.sets) == 1:
            return self._forward_set(input, batch.sets[0])
        index = batch.index.to(input.device)
        if self.conv_kind.standardise is not None:
            # standardise(K0 + ΔK) is not K0 plus a separable residual: one merged, standardised weight per set.
            return mixed.per_set(lambda s, part: self._forward_set(part, batch.sets[s], cache=False), input, index,
                                 len(batch.sets), batch.counts)
        x, weight, _, _, padding, padding_mode, _ = self.conv_kind.conv_arguments(self, input, None, None)
        adapters = [self.factors(names) if names else None for names in batch.sets]
        return mixed.colora_conv_mixed(x, weight, self.bias, adapters, index, self.stride, padding, self.dilation,
                                       self.groups, padding_mode, self.order, self.backend, counts=batch.counts)

    def clear_merged_cache(self) -> None:
        """Drop the cached K0 + ΔK (it is rebuilt at the next forward): needed only after writes through
        `param.data`, which bypass the version counters the cache watches."""
        self._merge_cache.clear()

    def chosen_backend(self, input: Tensor) -> str:
        """The path forward(input) takes now: "torch" (merged K0 + ΔK, one library conv), "triton" (fused
        kernels), "reference", "composite" (torch.func / forward AD) or "base" (`disable_adapters`); see
        `functional.chosen_backend`."""
        if self.disable_adapters or not self.active_adapters:
            return "base"
        with torch.no_grad():
            args, _ = self._colora_arguments(input)
        return chosen_backend(*args)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.adapter_parameters())
        rank = f", rank={self.rank}" if self.rank > 1 else ""
        active = f", active_adapters={list(self.active_adapters)}" if self.active_adapters != (DEFAULT,) else ""
        base = f", base={self.base_class.__name__}" if self.base_class is not self._conv_cls else ""
        return (f"{super().extra_repr()}, order={self.order}{rank}, backend={self.backend}, adapter_params={n}"
                f"{active}{base}")


def _layer_config(config: Optional[CoLoRAConfig], options, caller: str) -> CoLoRAConfig:
    """The config a layer is built from: `config` with `options` overriding its adapter fields; its rank an int
    (a {name: rank} plan is resolved per conv by `apply_colora` / `get_colora_model`)."""
    config = with_options(config, options, caller)
    if not isinstance(config.rank, int):
        raise ValueError(f"{caller}: rank must be an int >= 1 for one layer, got the plan {config.rank!r} "
                         "(apply_colora and get_colora_model take a {name: rank} plan)")
    return config


@functools.lru_cache(maxsize=None)
def _reserved_names(cls: type) -> frozenset:
    """The attribute names a layer of `cls` uses itself: a conv holding one of them cannot lend it its state."""
    layer = cls(1, 1, 1, device="meta")
    return frozenset(dir(cls)) | frozenset(vars(layer)) | frozenset(layer._parameters) | {"colora_adapters"}


@torch.no_grad()
def merge_layers_(layers: Sequence[_CoLoRAConvNd], names: Sequence[str] = (DEFAULT,)) -> None:
    """K0 ← K0 + ΔK, b0 ← b0 + Δb (eq. 10–11) of the adapters `names` for every layer, then reset those adapters;
    outputs are unchanged.

    On CUDA one Triton launch per dtype combination merges them all (`functional.merge_`). A layer with Δb and no
    b0 gets a frozen b0 = Δb. The caller has run `check_mergeable` on each: nothing here refuses a non-finite
    delta.
    """
    factors = {id(layer): layer.factors(names) for layer in layers}
    new_bias = {id(layer): torch.zeros_like(factors[id(layer)][2]) for layer in layers
                if factors[id(layer)][2] is not None and layer.bias is None}
    functional.merge_([MergeSpec(layer.weight, new_bias.get(id(layer), layer.bias), *factors[id(layer)][:2],
                                 factors[id(layer)][2], layer.groups, layer.order) for layer in layers])
    for layer in layers:
        if id(layer) in new_bias:
            layer.bias = nn.Parameter(new_bias[id(layer)], requires_grad=False)
        # Versions already tell the cache that K0 changed; dropping the buffer also frees it until the next forward.
        layer.clear_merged_cache()
        for name in names:
            layer.reset_adapter_(name)


class CoLoRAConv1d(_CoLoRAConvNd, nn.Conv1d):
    """A frozen `nn.Conv1d` plus the CoLoRA residual (Kp ⊛ Kd) ⊛ x + Δb; built like `nn.Conv1d` or by `from_conv`."""

    _conv_cls = nn.Conv1d


class CoLoRAConv2d(_CoLoRAConvNd, nn.Conv2d):
    """A frozen `nn.Conv2d` plus the CoLoRA residual (Kp ⊛ Kd) ⊛ x + Δb; built like `nn.Conv2d` or by `from_conv`."""

    _conv_cls = nn.Conv2d


class CoLoRAConv3d(_CoLoRAConvNd, nn.Conv3d):
    """A frozen `nn.Conv3d` plus the CoLoRA residual (Kp ⊛ Kd) ⊛ x + Δb; built like `nn.Conv3d` or by `from_conv`."""

    _conv_cls = nn.Conv3d

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last_3d) gives that format to every 4-d and 5-d tensor, and torch
        # refuses it for 4-d ones: Kd [C, kd, kh, kw] (and its grad) goes through `fn` as a 5-d view instead.
        return super()._apply(lambda t: fn(t.unsqueeze(0)).squeeze(0) if t.dim() == 4 else fn(t), recurse)


CONV_TO_COLORA = {nn.Conv1d: CoLoRAConv1d, nn.Conv2d: CoLoRAConv2d, nn.Conv3d: CoLoRAConv3d}
