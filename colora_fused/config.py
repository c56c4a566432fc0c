"""`CoLoRAConfig`: what `get_colora_model` wraps and trains, as one object that round-trips through JSON.

The config travels to the layers: `get_colora_model` and `apply_colora` hand it to `from_conv`, which reads
the fields outside `SELECTION_FIELDS` (`LAYER_FIELDS`) from it. A new adapter option is a field here and the code
in `layers` that reads it; every keyword-taking entry point (the layer constructors, `from_conv`,
`apply_colora`, `allocate_rank`) accepts it as an override by its field name (`with_options`).
"""
import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import backends
from ._conv import check_order, check_rank

Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
Rank = Union[int, Dict[str, int]]
UNSUPPORTED = ("error", "skip")  # what to do with a selected conv whose class CoLoRA cannot repeat
# The fields that pick and freeze the modules (`get_colora_model`, `apply_colora`); the layers read the others.
SELECTION_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "unsupported")


def _check_selector(field: str, value: Selector) -> Selector:
    """None, a regex string, a list of qualified names (a tuple becomes a list), or a callable (name, module)."""
    if value is None or isinstance(value, str) or callable(value):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"CoLoRAConfig.{field}: expected None, a regex string, a list of module names or a callable "
                    f"(name, module) -> bool; got {value!r}")


@dataclasses.dataclass
class CoLoRAConfig:
    """The settings of `get_colora_model`, named as in PEFT's `LoraConfig` where the idea is the same.

    - `target_modules`: the convs to wrap — a regex searched in the qualified module name, a list of qualified
      names, or a callable `(name, module) -> bool` (`apply_colora`'s `include`). None, the default, wraps the
      convs whose adapter (Kp + Kd at `rank`) is smaller than their weight: the k×k convs, not the 1×1 ones
      (Kp alone is as large as their weight) nor the depthwise ones (Kd alone is). "all" (that exact string, not
      a regex) wraps every conv.
    - `exclude_modules`: the same forms; convs it selects are left plain (`apply_colora`'s `exclude`).
    - `modules_to_save`: names of modules kept fully trainable (the classifier, say); a module matches when
      its qualified name equals a name or ends with "." + name, as in PEFT. Everything else is frozen.
    - `order`, `train_bias`, `backend`: as in `CoLoRAConv2d.from_conv`.
    - `rank`: the Kp ⊛ Kd terms of each wrapped conv, 1 as in the paper (PEFT's `r`); or a plan
      `{qualified conv name: rank}` (`RankPlan.ranks`, what `allocate_rank` gives), each conv at its own rank.
      With a plan, `target_modules=None` wraps the plan's convs (every one of them, small adapter or not); a conv
      selected otherwise that the plan does not name, or a plan name that is no conv of the model, raises
      ValueError: a plan says every wrapped conv's rank, so a gap or a typo is not guessed over.
    - `unsupported`: "error" (default) refuses a selection holding a conv whose class computes what a CoLoRA layer
      cannot repeat (`conv_kinds`: a custom `forward`), naming it; "skip" leaves such convs plain (and frozen)
      and logs a warning listing them.

    `to_dict()` gives a JSON-serialisable dict and `from_dict(d)` reads it back; a callable selector has no
    JSON form, so `to_dict` refuses it (TypeError) instead of writing something that cannot be read back.
    """

    target_modules: Selector = None
    exclude_modules: Selector = None
    modules_to_save: Optional[List[str]] = None
    order: str = "pointwise_first"
    train_bias: Optional[bool] = None
    backend: str = "auto"
    rank: Rank = 1
    unsupported: str = "error"

    def __post_init__(self):
        self.target_modules = _check_selector("target_modules", self.target_modules)
        self.exclude_modules = _check_selector("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            names = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"CoLoRAConfig.modules_to_save: expected a list of module names, "
                                f"got {self.modules_to_save!r}")
            self.modules_to_save = list(names)
        check_order(self.order)
        backends.check(self.backend)
        self.rank = _check_plan(self.rank) if isinstance(self.rank, Mapping) else check_rank(self.rank)
        if self.unsupported not in UNSUPPORTED:
            raise ValueError(f"CoLoRAConfig.unsupported: expected one of {UNSUPPORTED}, got {self.unsupported!r}")
        if self.train_bias is not None and not isinstance(self.train_bias, bool):
            raise TypeError(f"CoLoRAConfig.train_bias: expected None, True or False, got {self.train_bias!r}")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain JSON values. Raises TypeError when a selector is a callable."""
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if callable(value):
                raise TypeError(f"CoLoRAConfig.{field} is a callable ({getattr(value, '__name__', value)!r}), "
                                "which has no JSON form; give a regex or a list of module names to save the config")
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CoLoRAConfig":
        """The config `to_dict` wrote. Unknown keys raise ValueError naming them (a typo must not be dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CoLoRAConfig.from_dict: unknown keys {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)


LAYER_FIELDS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CoLoRAConfig)
                                     if f.name not in SELECTION_FIELDS)


def _check_plan(plan: Mapping) -> Dict[str, int]:
    if not plan:
        raise ValueError("CoLoRAConfig.rank: an empty {name: rank} plan wraps no conv; give an int or name convs")
    for name, rank in plan.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"CoLoRAConfig.rank: a plan's keys are qualified conv names, got {name!r}")
        try:
            check_rank(rank)
        except ValueError as err:
            raise ValueError(f"CoLoRAConfig.rank[{name!r}]: {err}") from None
    return dict(plan)


def with_options(config: Optional[CoLoRAConfig], options: Dict[str, Any], caller: str,
                 allowed: Sequence[str] = LAYER_FIELDS) -> CoLoRAConfig:
    """`config` (the defaults when None) with the fields `options` names replaced: what an entry point taking
    both a config and keyword options runs. A name outside `allowed` raises TypeError naming those there are."""
    if config is None:
        config = CoLoRAConfig()
    elif not isinstance(config, CoLoRAConfig):
        raise TypeError(f"{caller}: config must be a CoLoRAConfig, got {config!r}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{caller}: unexpected keyword arguments {', '.join(unknown)}; the options are "
                        f"{', '.join(allowed)}")
    return dataclasses.replace(config, **options) if options else config
