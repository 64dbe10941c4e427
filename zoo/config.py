"""Recipe YAML -> validated config objects, with `--set a.b=c` dotted overrides.

A recipe has the sections method, model, data, optim, schedule, eval, output and a few
top-level run keys. Typed sections are dataclasses validated generically from their type
hints; `method` and `model` hold free-form args that the method's constructor or the
model's factory checks (`validate_method_args`). Every mistake is one `ConfigError` line
that names the full dotted key and, for a typo, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import string
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from zoo.errors import ConfigError
from zoo.registry import close_matches
from zoo.schedule import Schedule

__all__ = [
    "MethodConfig", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "EvalConfig",
    "OutputConfig", "RunConfig", "load_config", "installed_recipes", "parse_override", "to_dict", "save_config",
    "validate_method_args",
]


# ---------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Mapping | list):
                continue  # unhashable; the base class reports it
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}; keep only one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats ('1e-3'), so saved configs load back equal."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = all(not isinstance(x, dict | list) for x in data)  # `betas: [0.9, 0.95]`, sections stay block
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = str(e.problem or e.context or "")
        if e.context and e.problem:
            started = f" started at line {e.context_mark.line + 1}" if e.context_mark else ""
            what += f" ({e.context}{started})"
        raise ConfigError(f"{source} is not valid YAML{where}: {' '.join(what.split())}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    except ConfigError as e:  # a duplicate key found by _Loader
        raise ConfigError(f"{source}: {e}") from None


# ---------------------------------------------------------------- generic validation


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short enough for a one-line message."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """What a type hint asks for, in words: 'a number', 'a list of 2 numbers', 'one of ...'."""
    origin, targs = get_origin(tp), get_args(tp)
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in targs)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in targs)
    if origin is tuple:
        if len(targs) == 2 and targs[1] is Ellipsis:
            return f"a list of {_plural(targs[0])}"
        return f"a list of {len(targs)} {_plural(targs[0]) if len(set(targs)) == 1 else 'items'}"
    if origin is list:
        return f"a list of {_plural(targs[0])}" if targs else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, "items")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if tp is str and value is not None and not isinstance(value, list | dict):
        hint = " (quote it in YAML)"
    return ConfigError(f"{key} must be {_describe(tp)}, got {_show(value)}{hint}")


_YAML_BOOL_WORDS = {True: ("yes", "on", "true", "y"), False: ("no", "off", "false", "n")}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against type hint `tp` and normalized (int -> float, list -> tuple, dict -> section).

    Annotations it does not understand (an nn.Module, a Callable...) are passed through unchecked.
    """
    origin, targs = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section (`eval:` with nothing under it) means defaults
            value = {}
        if isinstance(value, Mapping):
            return _from_dict(tp, value)
        raise _type_error(key, tp, value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in targs:
            return None
        arms = [a for a in targs if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own message is the clearest one
            return _convert(value, arms[0], key)
        for arm in arms:
            try:
                return _convert(value, arm, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` / `off` as false
            words = [a for a in targs if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]]
            if len(words) == 1:
                return words[0]
        if value in targs and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in targs)):
            return value
        hint = close_matches(str(value), [str(a) for a in targs], n=1) if isinstance(value, str) else []
        msg = f"{key} must be {_describe(tp)}, got {_show(value)}"
        raise ConfigError(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # `steps: 1e5`
            return int(value)
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(key, tp, value)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(_convert(v, targs[0], f"{key}[{i}]") for i, v in enumerate(value))
        if targs and len(value) != len(targs):
            raise _type_error(key, tp, value)
        if not targs:
            return tuple(value)
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, targs)))
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise _type_error(key, tp, value)
        return [_convert(v, targs[0], f"{key}[{i}]") for i, v in enumerate(value)] if targs else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key} keys must be strings, got {_show(k)}")
            out[k] = _convert(v, targs[1], f"{key}.{k}") if targs else v
        return out
    return value


def _unknown_key(key: str, prefix: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    full = f"{prefix}.{key}" if prefix else key
    hint = close_matches(str(key), valid, n=1)
    if hint:
        suggestion = f"did you mean {(f'{prefix}.{hint[0]}' if prefix else hint[0])!r}?"
    else:
        suggestion = "valid: " + ", ".join(valid)
    where = "" if prefix else " at the top level"
    return ConfigError(f"unknown key {full!r}{where}; {suggestion}")


class _Section:
    """Mixin for config dataclasses: generic type checks from the hints, then `_check` for ranges."""

    _section: ClassVar[str] = ""  # dotted prefix used in messages
    _free: ClassVar[str | None] = None  # name of the field that collects free-form keys

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(getattr(self, f.name), hints[f.name], self._key(f.name)))
        if self._free is not None:  # free-form args sit beside the typed keys in YAML: no name may clash
            for name in set(getattr(self, self._free)) & {f.name for f in dataclasses.fields(self)}:
                raise ConfigError(f"{self._key(self._free)} may not contain {name!r}; set {self._key(name)} instead")
        self._check()

    def _check(self) -> None:
        """Range and cross-field checks that a type hint cannot express."""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls._section}.{name}" if cls._section else name

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)} must be {what}, got {_show(getattr(self, name))}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build section `cls` from a mapping: unknown keys and missing required keys are errors."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields if f.name != cls._free]
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in data.items():
        if k in names:
            kwargs[k] = v
        elif cls._free is not None and isinstance(k, str):
            extra[k] = v
        else:
            raise _unknown_key(k, cls._section, names)
    if cls._free is not None:
        kwargs[cls._free] = extra
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            if dataclasses.is_dataclass(_hints(cls)[f.name]):
                kwargs[f.name] = {}  # a missing section: report its missing keys instead
            else:
                key = cls._key(f.name)
                raise ConfigError(f"missing required key {key!r}; add it to the recipe or pass --set {key}=...")
    return cls(**kwargs)


# ---------------------------------------------------------------- the sections


@dataclass
class MethodConfig(_Section):
    """`method: {name: mae, mask_ratio: 0.75, ...}`: the name picks the recipe, the rest are its args."""

    _section: ClassVar[str] = "method"
    _free: ClassVar[str | None] = "args"

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        self._require(bool(self.name), "name", "a method name such as 'mae'")


@dataclass
class ModelConfig(_Section):
    """`model: {arch: vit_tiny_patch4_32, depth: 4, ...}`: the arch and overrides of its factory's args."""

    _section: ClassVar[str] = "model"
    _free: ClassVar[str | None] = "args"

    arch: str
    args: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        self._require(bool(self.arch), "arch", "an architecture name such as 'vit_tiny_patch4_32'")


@dataclass
class DataConfig(_Section):
    """Where the training samples come from: webdataset shards, or a built-in generator when `train` is unset."""

    _section: ClassVar[str] = "data"

    train: str | None = None  # shard pattern, e.g. 'shards/train-{00000..00015}.tar', or 'builtin:NAME'
    batch_size: int = 64  # per process; the global batch is batch_size * accum_steps * world size
    num_workers: int = 0
    resampled: bool = False  # sample shards with replacement; epochs are virtual (epoch_samples)
    epoch_samples: int | None = None  # samples per (virtual) epoch; default: the shards' size from their metadata
    shuffle: int = 1000  # sample shuffle buffer; 0 turns it off
    builtin: str | None = None  # 'fractals', 'scenes', 'digits': generated once into $ZOO_HOME/data when train is unset
    builtin_n: int = 10_000  # samples to generate from `builtin`
    weights: list[float] | None = None  # one per '::'-joined source of `train` (needs resampled: true): the mix

    def _check(self) -> None:
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.num_workers >= 0, "num_workers", ">= 0")
        self._require(self.epoch_samples is None or self.epoch_samples >= 1, "epoch_samples", ">= 1 or null")
        self._require(self.shuffle >= 0, "shuffle", ">= 0")
        self._require(self.builtin_n >= 1, "builtin_n", ">= 1")
        self._require(self.weights is None or self.resampled, "weights",
                      "used with resampled: true (weighted sources are drawn with replacement)")


@dataclass
class OptimConfig(_Section):
    """The optimizer, and the lr rule: lr = blr * global_batch / 256 (or its square root) unless lr is given."""

    _section: ClassVar[str] = "optim"

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float | None = None
    blr: float = 1.5e-4
    lr_scaling: Literal["linear", "sqrt"] = "linear"  # blr * (global_batch / 256), or * sqrt(global_batch / 256)
    lr_mult: dict[str, float] = field(default_factory=dict)  # lr multipliers by parameter-name wildcard
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine from weight_decay to this (DINO: 0.04 -> 0.4); null: constant
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    momentum: float = 0.9  # sgd, lars
    clip_grad: float | None = None  # max global grad norm; null: no clipping
    accum_steps: int = 1  # gradient accumulation micro-steps per optimizer step
    layer_decay: float | None = None  # per-block lr decay (fine-tuning); null: off

    def _check(self) -> None:
        self._require(self.lr is None or self.lr > 0, "lr", "> 0 or null")
        self._require(self.blr > 0, "blr", "> 0")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(self.weight_decay_end is None or self.weight_decay_end >= 0, "weight_decay_end", ">= 0 or null")
        self._require(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        self._require(all(m >= 0 for m in self.lr_mult.values()), "lr_mult", "a mapping of patterns to multipliers >= 0")
        self._require(all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        self._require(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "> 0 or null")
        self._require(self.accum_steps >= 1, "accum_steps", ">= 1")
        self._require(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", "in (0, 1] or null")

    def resolved_lr(self, global_batch: int) -> float:
        """The peak learning rate: `lr` if set, else blr * global_batch / 256 (MAE, DINO) or its
        square root (DINOv2, POA: `lr_scaling: sqrt`)."""
        if self.lr is not None:
            return self.lr
        ratio = global_batch / 256
        return self.blr * (ratio if self.lr_scaling == "linear" else math.sqrt(ratio))


@dataclass
class ScheduleConfig(_Section):
    """How long to train (exactly one of steps or epochs) and the lr schedule's shape (also used by
    the weight-decay schedule): warmup, then cosine/linear/constant to min_lr, `truncate` < 1 for
    POA's truncated cosine."""

    _section: ClassVar[str] = "schedule"

    steps: int | None = None  # optimizer steps
    epochs: float | None = None  # sugar: the engine converts to steps from the dataset size
    warmup_steps: int | None = None
    warmup_frac: float | None = None  # warmup as a fraction of the total steps
    warmup_epochs: float | None = None
    min_lr: float = 0.0
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    truncate: float = 1.0  # lay the cosine over steps / truncate and stop at steps (POA: 0.78)

    def _check(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            fix = ("got neither; add one, e.g. --set schedule.steps=1000" if self.steps is None else
                   "got both; remove one, e.g. --set schedule.epochs=null")
            raise ConfigError(f"schedule needs exactly one of 'schedule.steps' or 'schedule.epochs', {fix}")
        self._require(self.steps is None or self.steps >= 1, "steps", ">= 1")
        self._require(self.epochs is None or self.epochs > 0, "epochs", "> 0")
        given = [k for k in ("warmup_steps", "warmup_frac", "warmup_epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"set only one of {' and '.join(repr('schedule.' + k) for k in given)}")
        self._require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", ">= 0")
        self._require(self.warmup_frac is None or 0 <= self.warmup_frac < 1, "warmup_frac", "in [0, 1)")
        self._require(self.warmup_epochs is None or self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        self._require(self.min_lr >= 0, "min_lr", ">= 0")
        self._require(0 < self.truncate <= 1, "truncate", "in (0, 1]")

    def lr_schedule(self, peak: float) -> Schedule:
        """The learning rate over the run: warmup to `peak`, then `kind` down to `min_lr`."""
        return Schedule(peak, self.min_lr, shape=self.kind, warmup_steps=self.warmup_steps,
                        warmup_epochs=self.warmup_epochs, warmup_frac=self.warmup_frac, truncate=self.truncate)

    def warmup(self, total_steps: int, steps_per_epoch: int | None = None) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps (clamped to the run)."""
        return self.lr_schedule(1.0).warmup_length(total_steps, steps_per_epoch)


@dataclass
class EvalConfig(_Section):
    """Online kNN monitoring during training and the protocols run on the final backbone."""

    _section: ClassVar[str] = "eval"

    train: str | None = None  # labelled shards (or 'builtin:digits'); no eval runs when train or val is unset
    val: str | None = None
    every: int = 0  # steps between online kNN evals; 0: only the final evaluation at the end
    k: int | list[int] = 20  # several (POA: [20, 10]): knn_top1 at the first, knn_top1_k{k} at the others
    temperature: float = 0.07  # kNN vote temperature (DINO's T)
    final: list[Literal["knn", "linear"]] = field(default_factory=lambda: ["knn"])  # on the final models, into their cards
    linear_variants: list[str] | None = None  # features the final linear probe chooses among (default cls, cls+avg)

    def _check(self) -> None:
        self._require(self.every >= 0, "every", ">= 0")
        ks = [self.k] if isinstance(self.k, int) else self.k
        self._require(bool(ks) and all(v >= 1 for v in ks), "k", ">= 1 (one value or a non-empty list)")
        self._require(self.temperature > 0, "temperature", "> 0")


@dataclass
class OutputConfig(_Section):
    """The run directory, what is written there and how often, and the zoo name to publish under."""

    _section: ClassVar[str] = "output"

    dir: str = "runs/{name}"  # `{name}` is replaced by `name`
    name: str | None = None  # default: chosen by the engine from the recipe
    publish: str | None = None  # zoo name 'arch.tag', e.g. 'vit_tiny_patch4_32.mae_fractal'; null: don't publish
    checkpoint_every: int = 500  # steps; 0: only at the end
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = True  # also write TensorBoard events to tb/ when tensorboard is installed
    plots: bool = True  # plots/: metric curves and the method's pictures, at the end

    def _check(self) -> None:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.dir) if f is not None}
        except ValueError as e:
            raise ConfigError(f"output.dir {self.dir!r} is not a valid template ({e}); "
                              "use '{name}' or no braces") from None
        if fields - {"name"}:
            raise ConfigError(f"output.dir may only use '{{name}}', got {self.dir!r}")
        self._require(self.name is None or (bool(self.name) and "/" not in self.name), "name",
                      "a non-empty name without '/'")
        self._require(self.publish is None or re.fullmatch(r"[^.\s/]+\.[^\s/]+", self.publish) is not None,
                      "publish", "a zoo name 'arch.tag' such as 'vit_tiny_patch4_32.mae_fractal'")
        self._require(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        self._require(self.keep_last >= 1, "keep_last", ">= 1")
        self._require(self.log_every >= 1, "log_every", ">= 1")

    def run_dir(self, default_name: str) -> Path:
        """The run directory, with `{name}` filled by `name` or else `default_name`."""
        return Path(self.dir.format(name=self.name or default_name))


@dataclass
class RunConfig(_Section):
    """A whole recipe: what to train, on what, how, and where the results go."""

    method: MethodConfig
    model: ModelConfig
    schedule: ScheduleConfig  # required: a recipe must say how long to train
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides of the method's scheduled values
    init_from: str | None = None  # start from published weights (any zoo.load name), before step 0
    seed: int = 0
    amp: Literal["no", "bf16"] = "no"
    compile: bool = False  # torch.compile each repeated block of the method (regional compilation)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the method

    def _check(self) -> None:
        self._require(self.seed >= 0, "seed", ">= 0")


# ---------------------------------------------------------------- loading, overrides, saving


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'optim.lr=1e-3'` -> (['optim', 'lr'], 0.001); the value is read as YAML so types come out right."""
    key, sep, raw = str(text).partition("=")
    if not sep:
        raise ConfigError(f"malformed override {text!r}; expected KEY=VALUE, e.g. optim.lr=1e-3")
    parts = _split_key(key, text)
    try:
        value = _yaml_load(raw, f"the value of override {text!r}")
    except ConfigError as e:
        raise ConfigError(f"{e}; quote it to pass a string") from None
    return parts, value


def _split_key(key: str, text: str) -> list[str]:
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"malformed override {text!r}; expected KEY=VALUE with a dotted KEY, e.g. optim.lr=1e-3")
    return parts


def _set_path(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {'.'.join(parts)!r}: {where!r} is {_show(child)}, not a section")
        node = child
    node[parts[-1]] = value


RECIPE_PACKAGE = "zoo.recipes"  # where the installed recipe YAMLs live, beside the methods


def installed_recipes() -> dict[str, Path]:
    """Recipe name -> YAML path of every recipe shipped with zoo (found without importing the methods)."""
    import importlib.util

    spec = importlib.util.find_spec(RECIPE_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return {p.stem: p for folder in folders for p in sorted(Path(folder).glob("*.yaml"))}


def _read(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:  # a bare name: an installed recipe
        found = installed_recipes()
        if str(source) in found:
            return _read(found[str(source)])
        hint = close_matches(str(source), list(found), n=3)
        raise ConfigError(f"no recipe file or installed recipe named {str(source)!r}"
                          + (f"; did you mean {', '.join(hint)}?" if hint else "") + " (`zoo recipes` lists them)")
    if not path.is_file():
        msg = f"recipe file '{path}' does not exist"
        siblings = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
        hint = close_matches(path.name, siblings, n=1)
        raise ConfigError(msg + (f"; did you mean '{path.parent / hint[0]}'?" if hint else "; check the path"))
    data = _yaml_load(path.read_text(encoding="utf-8"), f"recipe file '{path}'")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file '{path}' must hold a mapping of sections (method, model, ...), "
                          f"got {type(data).__name__}")
    return data


def load_config(source: str | Path | Mapping[str, Any] | RunConfig,
                overrides: Iterable[str] | Mapping[str, Any] | None = ()) -> RunConfig:
    """A validated RunConfig from a recipe YAML path, a dict or a RunConfig, with dotted overrides applied.

    `overrides` are `'KEY=VALUE'` strings (the value read as YAML) or a mapping of dotted key ->
    value. Keys into `method`/`model` may add new args; keys into the typed sections must exist.
    """
    if isinstance(source, RunConfig):
        raw = to_dict(source)
    elif isinstance(source, Mapping):
        raw = _plain(source)
    elif isinstance(source, str | Path):
        raw = _read(source)
    else:
        raise ConfigError(f"a recipe is a YAML path, a dict or a RunConfig, got {type(source).__name__}")
    if overrides is None:  # argparse's `--set` (action="append") when not given
        overrides = ()
    if isinstance(overrides, str):  # a lone 'k=v' string, not an iterable of characters
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        items = [(_split_key(str(k), f"{k}=..."), _plain(v)) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for parts, value in items:
        _set_path(raw, parts, value)
    return _from_dict(RunConfig, raw)


def _plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars, so overrides never touch the caller's objects."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain YAML-able data in recipe layout (method/model args inline with name/arch)."""

    def section(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if f.name == type(obj)._free:
                    out.update(_plain(value))
                else:
                    out[f.name] = section(value)
            return out
        return _plain(value=obj)

    return section(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (e.g. `RUN_DIR/config.yaml`); `load_config` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- free-form args


def validate_method_args(fn: Callable[..., Any], args: Mapping[str, Any], where: str = "method") -> dict[str, Any]:
    """Check free-form `args` against `fn`'s signature (a class or factory); return them type-normalized.

    An arg the signature lacks is a ConfigError naming `where.arg` and the closest parameter;
    a `**kwargs` signature accepts any name. Values are checked against annotations it understands.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables without a signature: nothing to check
        return dict(args)
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # annotations that do not resolve here (TYPE_CHECKING imports): skip type checks
        hints = {}
    owner = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    out: dict[str, Any] = {}
    for name, value in args.items():
        if name not in params:
            if open_ended:
                out[name] = value
                continue
            hint = close_matches(str(name), list(params), n=1)
            valid = "valid: " + (", ".join(p for p in params if p != "arch") or "none")
            suggestion = f"did you mean '{where}.{hint[0]}'? {valid}" if hint else valid
            raise ConfigError(f"unknown {where} arg '{where}.{name}' for {owner}; {suggestion}")
        out[name] = _convert(value, hints[name], f"{where}.{name}") if name in hints else value
    return out
