"""The Method contract every pretraining recipe implements (see DESIGN.md, "The Method contract").

The engine never knows which method it runs: it builds the method's module, feeds it batches made
by `data_spec()` (the method's own transform and collate), steps the optimizer on
`training_step(...)["loss"]`, evaluates the schedules the method declares, calls the hooks,
checkpoints the module whole (less the frozen parts loaded by name), evaluates `backbone()` and
publishes what `export()` returns. Methods never write loops, checkpoint code or loggers; their
losses are plain functions.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from zoo.engine.contract import Export, Progress
from zoo.errors import ConfigError, ZooError
from zoo.schedule import Schedule

__all__ = ["Method", "DataSpec", "Export", "Progress", "check_same_input", "check_vit_overrides", "recipes_publishing"]


@dataclass
class DataSpec:
    """What a method reads from the shards and how a sample becomes what `training_step` gets.

    `transform(sample)` runs in the loader workers on the decoded sample (zoo field names, PIL
    images, arrays, dicts) and returns the per-sample dict (multi-crop views as a list, several
    modalities, masks); None gives the default: the image through `train_transform(backbone,
    **train_transform)` plus the other requested fields as decoded. `collate(list of dicts)` builds
    the batch (default: torch's `default_collate`), also in the workers, so per-batch random work
    (block masks) is seeded with the loader. `index=True` adds `__index__`, a sample's stable
    position in the dataset (the same in every epoch and on every rank), for memory banks.
    `drop_last=False` when `training_step` accepts a short batch: the epoch's last, partial batch is kept.
    `prepare(shards, builtin)` maps the training shard pattern to the one the loader reads, once per run
    before loading (rank 0 first): shards the method derives from the data and caches (FLAME's text
    embeddings), or a check that names the command that makes them; `builtin` is True for zoo's own data.
    `builtin_size`: the side of generated built-in images when the method reads them larger than its backbone's
    input (targets at several scales); None: the backbone's input size.
    """

    fields: tuple[str, ...] = ("image",)  # required sample fields (zoo field names)
    optional_fields: tuple[str, ...] = ()
    train_transform: dict[str, Any] = field(default_factory=dict)  # kwargs of the default image transform
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    index: bool = False
    drop_last: bool = True  # False when the method's step accepts a short batch
    prepare: Callable[[str, bool], str] | None = None
    builtin_size: int | None = None  # built-in data generated at this size, not the backbone's input (SatMAE++'s 2x targets)

    def sample_transform(self, backbone: nn.Module) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The transform the loader applies: the method's own, or the default single-image one."""
        if self.transform is not None:
            return self.transform
        from zoo.data.transforms import train_transform

        image = train_transform(backbone.pretrained_cfg, **self.train_transform)
        keep = tuple(k for k in (*self.fields, *self.optional_fields) if k != "image")

        def default(sample: dict[str, Any]) -> dict[str, Any]:
            out = {k: sample[k] for k in keep if k in sample}
            out["image"] = image(sample["image"])
            return out

        return default


class Method(nn.Module):
    """Base class: holds everything trainable and frozen, so the engine checkpoints it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduled: dict[str, float] = {}  # current values of `schedules()`, set by the engine each step
        self._frozen: dict[int, str | None] = {}  # id(module) -> the zoo.load name it came from (None: state)
        self.register_state_dict_post_hook(_drop_loaded_frozen)
        self.register_load_state_dict_post_hook(_allow_missing_loaded_frozen)

    # -- the step ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar tensor}; other entries are logged as metrics."""
        raise NotImplementedError

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Samples in a batch (the engine never reads a field itself): the length of the first
        tensor, or of the first tensor in the first list (multi-crop views)."""
        for key, value in batch.items():
            if key.startswith("__"):
                continue
            if torch.is_tensor(value):
                return len(value)
            if isinstance(value, (list, tuple)) and value and torch.is_tensor(value[0]):
                return len(value[0])
        raise ZooError(f"{type(self).__name__}: no tensor in the batch ({sorted(batch)}) to count samples by; "
                       "override Method.batch_size")

    # -- hooks --------------------------------------------------------------------------------------
    def schedules(self) -> dict[str, Schedule]:
        """Values the engine schedules for this method (EMA momentum, teacher temperature, loss weights),
        evaluated before every step into `self.scheduled[name]`; the recipe's `schedules:` overrides them."""
        return {}

    def on_data(self, samples: int | None) -> None:
        """The training set's sample count (None when unknown), once the data is found and before a resume
        loads state: size what is kept per sample (a memory bank indexed by `__index__`)."""

    def before_optimizer_step(self, progress: Progress) -> None:
        """After backward and gradient clipping, before the optimizer step (e.g. cancel some gradients)."""

    def on_step_end(self, progress: Progress) -> None:
        """After the optimizer step (EMA teachers, clamps); `progress.step` counts the step just taken."""

    # -- frozen parts -------------------------------------------------------------------------------
    def freeze(self, module: nn.Module, *, loaded_from: str | None = None) -> nn.Module:
        """Declare `module` frozen: eval mode, no gradients, so no optimizer or clipping. Loaded by name
        (`loaded_from`), it is also left out of checkpoints: the constructor loads it again on resume.
        Without a name it is state (an EMA teacher) and stays in checkpoints."""
        module.requires_grad_(False)
        module.eval()
        self._frozen[id(module)] = loaded_from
        return module

    def load_frozen(self, name: str, *, like: nn.Module | None = None,
                    convert: Callable[[nn.Module], nn.Module] | None = None, **kwargs: Any) -> nn.Module:
        """`zoo.load(name)` as a frozen part (a teacher, a language model), through `convert` if given (e.g.
        `zoo.convert.as_zoo_vit`); `like` checks that it sees the same patch grid as that model."""
        import zoo
        from zoo.errors import UnknownNameError

        try:
            model = zoo.load(name, **kwargs)
        except UnknownNameError as e:
            makers = recipes_publishing(name)
            hint = f"; make it with `zoo pretrain {makers[0]}`" if makers else ""
            raise ConfigError(f"{type(self).__name__}: cannot load the frozen model {name!r}{hint}: {e}") from None
        if convert is not None:
            model = convert(model)
        if like is not None:
            check_same_input(model, like, f"{type(self).__name__}: frozen {name!r}")
        return self.freeze(model, loaded_from=name)

    def frozen_modules(self) -> dict[str, tuple[nn.Module, str | None]]:
        """Attribute path -> (frozen module, the name it was loaded from or None)."""
        return {n: (m, self._frozen[id(m)]) for n, m in self.named_modules() if id(m) in self._frozen}

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for module, _ in self.frozen_modules().values():
            module.eval()
        return self

    # -- optimizer groups ---------------------------------------------------------------------------
    def param_groups(self, weight_decay: float, layer_decay: float | None = None,
                     lr_mult: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: no decay for biases, norms and 1-D parameters
        (the rule MAE uses via timm's `param_groups_weight_decay`); with `layer_decay`, MAE/BEiT's
        layer-wise lr decay over the backbone: `lr_scale = layer_decay ** (depth + 1 - layer)` with the
        stem at layer 0, block i at i + 1, and everything else at depth + 1, i.e. scale 1; `lr_mult`
        multiplies the lr of parameters whose name matches a pattern (`{"*patch_embed*": 0.2}`)."""
        layer_of, top = self._backbone_layers() if layer_decay is not None else ({}, 0)
        patterns = dict(lr_mult or {})
        used: set[str] = set()
        groups: dict[tuple[bool, float], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decay = not (p.ndim <= 1 or name.endswith(".bias"))
            scale = layer_decay ** (top - layer_of.get(name, top)) if layer_decay is not None else 1.0
            for pattern, mult in patterns.items():
                if fnmatch.fnmatchcase(name, pattern):
                    scale *= mult
                    used.add(pattern)
            group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                       "lr_scale": scale, "decay": decay})
            group["params"].append(p)
        for pattern in patterns.keys() - used:
            example = next((n for n, p in self.named_parameters() if p.requires_grad), "?")
            raise ConfigError(f"optim.lr_mult pattern {pattern!r} matches no trainable parameter of "
                              f"{type(self).__name__}; names look like {example!r} (shell wildcards, e.g. '*patch_embed*')")
        return list(groups.values())

    def _backbone_layers(self) -> tuple[dict[str, int], int]:
        """(method parameter name -> layer in the backbone, depth + 1), read from the backbone's
        timm-style `group_matcher` (stem regex, then the block-index regex)."""
        backbone = self.backbone()
        if not hasattr(backbone, "group_matcher"):
            raise ZooError(f"{type(self).__name__}: optim.layer_decay needs a backbone with a "
                           "group_matcher (a zoo ViT); set optim.layer_decay: null")
        matcher = backbone.group_matcher(coarse=False)
        stem, block = re.compile(matcher["stem"]), re.compile(matcher["blocks"][0][0])
        prefix = next(n for n, m in self.named_modules() if m is backbone)
        prefix = prefix + "." if prefix else ""
        top = len(backbone.blocks) + 1
        layers = {}
        for name, _ in backbone.named_parameters():
            found = block.match(name)
            layers[prefix + name] = 0 if stem.match(name) else int(found.group(1)) + 1 if found else top
        return layers, top

    def repeated_blocks(self) -> list[nn.Module]:
        """The repeated layers (every child of a `*blocks` Sequential/ModuleList): the units FSDP
        shards one by one and `compile: true` compiles one by one (regional compilation)."""
        return [block for name, m in self.named_modules()
                if name.rsplit(".", 1)[-1].endswith("blocks") and isinstance(m, (nn.Sequential, nn.ModuleList))
                for block in m]

    # -- data, backbone, exports --------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        return DataSpec()

    def backbone(self) -> nn.Module:
        """The live main backbone (a zoo model): its preprocessing feeds the default transform, and
        online kNN, the final evals and `init_from` use it."""
        raise NotImplementedError(f"{type(self).__name__} must implement backbone()")

    def export(self, name: str) -> dict[str, Export | nn.Module]:
        """The models to publish by FULL name (`arch.tag`), given the recipe's `output.publish` name:
        by default the backbone under that name. Each name must start with its model's arch."""
        return {name: self.backbone()}

    def init_backbone(self, source: nn.Module, name: str) -> None:
        """`init_from`: load published weights into the backbone before step 0."""
        from zoo.convert import fit_state_dict, load_checked

        target = self.backbone()
        load_checked(target, fit_state_dict(source.state_dict(), target), f"init_from {name!r}")

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """Pictures of the method on a batch (the engine calls it at the end, in eval mode, no grad,
        outside the training RNG streams); the files written."""
        return []


def check_vit_overrides(method: type, name: str, overrides: Mapping[str, Any], model: type | None = None,
                        model_name: str = "ViT") -> None:
    """Arguments that are neither `method`'s own nor the model's (`model`, default zoo's ViT) are ConfigErrors
    naming the key and the valid ones (they would otherwise surface as a TypeError deep in the model)."""
    import inspect

    from zoo.models.vit import VisionTransformer
    from zoo.registry import close_matches

    model_args = list(inspect.signature(model or VisionTransformer).parameters)
    own = [n for n, p in inspect.signature(method).parameters.items() if p.kind is not p.VAR_KEYWORD and n != "arch"]
    for key in overrides:
        if key not in model_args:
            hint = close_matches(key, own + model_args, n=1)
            raise ConfigError(f"{name}: unknown argument {key!r} (neither a {name} argument nor a {model_name} argument)"
                              + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" {name}'s arguments: {', '.join(own)}; the {model_name}'s: {', '.join(model_args)}")


def recipes_publishing(name: str) -> list[str]:
    """The installed recipes whose run publishes `name` (output.publish), e.g. a teacher another recipe loads."""
    import yaml

    from zoo.config import installed_recipes

    found = []
    for recipe, path in installed_recipes().items():
        try:
            publish = (yaml.safe_load(Path(path).read_text()) or {}).get("output", {}).get("publish")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if publish == name:
            found.append(recipe)
    return found


def check_same_input(model: nn.Module, like: nn.Module, what: str) -> None:
    """Refuse a model that cannot see `like`'s images as the same patch grid (a teacher for a student):
    the channels must match, and the model's patch size must tile `like`'s input into `like`'s grid."""
    def describe(m: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, ...] | None]:
        size = tuple((getattr(m, "pretrained_cfg", {}) or {}).get("input_size", ()))
        pe = getattr(m, "patch_embed", None)
        return size, tuple(getattr(pe, "patch_size", ())) or None, tuple(getattr(pe, "grid_size", ())) or None

    (size_m, patch_m, _), (size_l, patch_l, grid_l) = describe(model), describe(like)
    bad = bool(size_m and size_l and size_m[0] != size_l[0])
    if patch_m and grid_l and size_l:
        bad |= (size_l[1] // patch_m[0], size_l[2] // patch_m[1]) != grid_l
    if bad:
        arch_m, arch_l = getattr(model, "zoo_arch", type(model).__name__), getattr(like, "zoo_arch", type(like).__name__)
        raise ConfigError(
            f"{what} ({arch_m}: input {size_m}, patch {patch_m}) does not fit the student ({arch_l}: input {size_l}, "
            f"patch {patch_l}, grid {grid_l}): it must take the same channels and cut the student's images into the "
            "same patch grid; choose such a model or change model.arch"
        )


def _loaded_prefixes(method: Method) -> list[str]:
    return [f"{n}." for n, (_, name) in method.frozen_modules().items() if name is not None]


def _drop_loaded_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: frozen parts loaded by name are not checkpointed (re-loaded by name)."""
    for p in _loaded_prefixes(module):
        for key in [k for k in state_dict if k.startswith(prefix + p)]:
            del state_dict[key]


def _allow_missing_loaded_frozen(module: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook: their keys are missing from checkpoints on purpose."""
    prefixes = tuple(_loaded_prefixes(module))
    if prefixes:
        kept = [k for k in incompatible.missing_keys if not k.startswith(prefixes)]
        incompatible.missing_keys[:] = kept
