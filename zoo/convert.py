"""State-dict conversion between zoo backbones and foreign checkpoints.

`checkpoint_filter_fn`-style: foreign checkpoints (official MAE `models_mae.py`, official DINO
training checkpoints and backbone releases, DDP-wrapped, timm) are unwrapped and their keys remapped
into our modules; `load_checked` then refuses any dict that does not fit, naming the missing,
unexpected and mis-shaped keys. A timm `VisionTransformer` becomes the zoo ViT with the same weights and forward
(`from_timm`, `as_zoo_vit`: attention hooks, UNIP teachers); official UNIP checkpoints load with their last block's
own head count (`unip_model`). Official POA checkpoints (one elastic ViT holding many sizes) are sliced into
the plain ViT of a chosen width and depth (`poa_to_vit`, `poa_model`). Official DiT checkpoints (their `ema`
weights first) become zoo DiTs (`dit_model`), official FLAME checkpoints zoo FLAME image sides (`flame_model`).
The other way, `to_timm` and `timm_config` describe a zoo model as the timm model that loads its state dict unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from zoo.errors import CheckpointMismatchError, ConfigError, ZooError

log = logging.getLogger(__name__)

# Wrappers seen around state dicts in the wild: MAE/DeiT ('model'), Lightning ('state_dict'), DINO/iBOT
# ('teacher' before 'student': the teacher is the model those methods evaluate and release), misc.
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "teacher", "student", "net")
# A multi-crop wrapper (DINO's MultiCropWrapper, iBOT, DINOv2): the backbone under `backbone.`, beside
# projection heads that pretraining alone uses.
BACKBONE_PREFIX = "backbone."
PROJECTION_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")
# Keys of an MAE pretraining model that are not part of the encoder (models_mae.py naming).
MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
# The learned embedding of masked patches, a pretraining-only parameter: iBOT `masked_embed`, DINOv2 `mask_token`.
MASKED_EMBED_KEYS = ("masked_embed", "mask_token")


def unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, stripping nesting and DDP's `module.` prefixes; of a multi-crop
    wrapper (DINO), only the backbone; of a student + teacher checkpoint, the teacher."""
    sd: Any = checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            break
        if key == "teacher" and isinstance(sd.get("student"), Mapping):
            log.info("checkpoint holds a student and a teacher: loading the teacher")
        sd = sd[key]
    if not isinstance(sd, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k.removeprefix("module.")] = v
    return take_backbone(out)


def take_backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone of a multi-crop wrapper's state dict (only `backbone.*` and projection-head keys),
    its prefix stripped and the heads dropped; any other state dict unchanged."""
    if not any(k.startswith(BACKBONE_PREFIX) for k in sd):
        return sd
    heads = [k for k in sd if not k.startswith(BACKBONE_PREFIX)]
    if not all(k.startswith(PROJECTION_HEAD_PREFIXES) for k in heads):
        return sd
    if heads:
        log.info("dropped the %d keys of the projection head (%s, ...), which only pretraining uses", len(heads), heads[0])
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}


def is_mae_pretrain(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict comes from MAE pretraining (encoder + decoder, models_mae.py names)."""
    return any(k.startswith(MAE_DECODER_PREFIXES) for k in sd)


def filter_vit_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a ViT state dict (ours, timm's, an official MAE or DINO checkpoint) to `model`: drop the MAE
    decoder and masked-patch embeddings, drop a classifier the model lacks, resample the position embedding."""
    out: dict[str, torch.Tensor] = {}
    dropped = []
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith(MAE_DECODER_PREFIXES + MASKED_EMBED_KEYS):
            dropped.append(k)
            continue
        if k.startswith("head.") and k not in own:
            dropped.append(k)
            continue
        if k == "pos_embed" and k in own and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            v = resample_pos_embed(v, own[k].shape[1], model.num_prefix_tokens)
        out[k] = v
    if dropped:
        log.info("dropped %d checkpoint keys the backbone does not use (%s, ...)", len(dropped), dropped[0])
    return out


def resample_pos_embed(pos: torch.Tensor, n_tokens: int, num_prefix: int) -> torch.Tensor:
    """Bicubic resize of a square-grid position embedding to `n_tokens` (prefix rows kept)."""
    from timm.layers import resample_abs_pos_embed

    old = int(round((pos.shape[1] - num_prefix) ** 0.5))
    new = int(round((n_tokens - num_prefix) ** 0.5))
    if old * old != pos.shape[1] - num_prefix or new * new != n_tokens - num_prefix:
        raise CheckpointMismatchError(
            f"cannot resample pos_embed of {pos.shape[1]} tokens to {n_tokens}: grids are not square"
        )
    return resample_abs_pos_embed(pos, [new, new], [old, old], num_prefix_tokens=num_prefix)


def fit_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Dispatch to the family's filter; other families load keys as they are."""
    from zoo.models.vit import VisionTransformer

    if isinstance(model, VisionTransformer):
        return filter_vit_state_dict(sd, model)
    return dict(sd)


def describe_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor], limit: int = 6) -> str | None:
    """A one-line description of how `sd` fails to fit `model`, or None if it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts) or None


def load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> nn.Module:
    """Load `sd` into `model`, refusing any key that does not fit; non-strict tolerates (and logs) only
    keys missing from `sd`, never unexpected or mis-shaped ones."""
    problem = describe_mismatch(model, sd)
    if problem:
        own = model.state_dict()
        if strict or any(k not in own or tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items()):
            raise CheckpointMismatchError(
                f"{source} does not fit {getattr(model, 'zoo_arch', type(model).__name__)}: {problem}. "
                "Check the architecture (arch=...) and its arguments, or pass strict=False to skip missing keys"
            )
        log.warning("%s: loaded non-strictly: %s", source, problem)
    model.load_state_dict(sd, strict=False)
    return model


def to_timm(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(kwargs for timm's `VisionTransformer`, state dict it loads with strict=True) for a zoo ViT."""
    from zoo.models.vit import VisionTransformer, timm_kwargs

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_timm exports zoo ViTs, got {type(model).__name__}")
    return timm_kwargs(model), {k: v.detach().clone() for k, v in model.state_dict().items()}


def from_timm(model: nn.Module) -> nn.Module:
    """The zoo ViT with a timm `VisionTransformer`'s weights and forward (its attention hooks then work: `forward_qk`,
    `attention_maps`); a one-line ZooError for timm ViT variants zoo's ViT does not have (register tokens, qk-norm,
    pre-norm, no class-token position, other norms or activations)."""
    import timm.models.vision_transformer as tvit

    from zoo.factory import create_model
    from zoo.models.vit import IMAGENET_MEAN, IMAGENET_STD, VIT_ARCHS

    if not isinstance(model, tvit.VisionTransformer):
        raise ZooError(f"{type(model).__name__} is not a ViT: attention analysis and UNIP teachers need a ViT "
                       "(a zoo ViT, or timm's VisionTransformer, e.g. timm:vit_small_patch16_224)")
    blk = model.blocks[0]
    unsupported = [what for what, bad in (
        ("register tokens", getattr(model, "num_reg_tokens", 0) > 0),
        ("no class-token position embedding", getattr(model, "no_embed_class", False)),
        ("pre-norm", not isinstance(model.norm_pre, nn.Identity)),
        ("qk-norm", not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity)),
        ("a pooling head (attention pool)", getattr(model, "attn_pool", None) is not None),
        ("a non-LayerNorm norm", not isinstance(blk.norm1, nn.LayerNorm)),
        ("a non-GELU MLP", not isinstance(getattr(blk.mlp, "act", nn.GELU()), nn.GELU)),
        ("a non-square patch", model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]),
    ) if bad]
    if unsupported:
        raise ZooError(f"timm ViT {model.default_cfg.get('architecture', '?')} has {', '.join(unsupported)}, which the zoo "
                       "ViT does not: use a standard ViT (vit_*_patch*_* with a class token)")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    eps = blk.norm1.eps
    kwargs = dict(
        img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
        global_pool=model.global_pool or "", embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None, class_token=model.cls_token is not None,
        init_values=1.0 if hasattr(blk.ls1, "gamma") else None,  # the value is overwritten by the weights
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
    )
    arch = cfg.get("architecture")
    vit = create_model(arch if arch in VIT_ARCHS else TIMM_VIT_FALLBACK, **kwargs)
    if eps != 1e-6:
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    load_checked(vit, model.state_dict(), f"timm {arch or type(model).__name__}", strict=True)
    vit.pretrained_cfg.update({k: v for k, v in cfg.items() if k in ("interpolation", "crop_pct")})
    return vit.train(model.training)


def as_zoo_vit(model: nn.Module) -> nn.Module:
    """`model` if it is a zoo ViT, the converted zoo ViT if it is timm's (`from_timm`), else a one-line ZooError."""
    from zoo.models.vit import VisionTransformer

    return model if isinstance(model, VisionTransformer) else from_timm(model)


# The ViT timm builds a zoo ViT as when timm has no model of the zoo name: model_args set every shape.
TIMM_VIT_FALLBACK = "vit_base_patch16_224"


def timm_config(model: nn.Module) -> dict[str, Any] | None:
    """The config.json fields timm's `local-dir:`/`hf-hub:` loader reads (architecture, num_classes, model_args,
    pretrained_cfg additions) for a zoo model timm builds key for key; None for models timm cannot build."""
    import json

    import timm

    from zoo.models.vit import VisionTransformer, last_heads, timm_kwargs

    arch = getattr(model, "zoo_arch", None)
    if isinstance(model, VisionTransformer) and last_heads(model) is not None:
        return None  # timm's ViT has one head count: it would load the weights with another forward
    if isinstance(model, VisionTransformer) and model.blocks[0].norm1.eps != 1e-6:
        return None  # config.json cannot give timm's LayerNorm another eps (open_clip towers: 1e-5)
    if isinstance(model, VisionTransformer):
        args = {k: v for k, v in timm_kwargs(model).items() if k not in ("norm_layer", "num_classes")}
        # zoo ViTs take any input size (resampling the position embedding); the rest pins timm's defaults that
        # zoo's ViT shares, whatever the named entrypoint sets
        args.update(dynamic_img_size=True, no_embed_class=False, fc_norm=None, reg_tokens=0, qk_norm=False)
        extra = {"first_conv": "patch_embed.proj", "classifier": "head"}
        architecture = arch if arch and timm.is_model(arch) else TIMM_VIT_FALLBACK
    elif arch and isinstance(model, timm.models.ResNet) and timm.is_model(arch):  # zoo's ResNets are timm's
        args = {k: v for k, v in getattr(model, "zoo_args", {}).items() if k != "num_classes"}
        extra = {k: model.pretrained_cfg[k] for k in ("first_conv", "classifier") if model.pretrained_cfg.get(k)}
        architecture = arch
    else:
        return None
    try:
        json.dumps(args)
    except TypeError:
        log.info("%s: model arguments are not JSON, so timm cannot rebuild it from config.json", arch)
        return None
    fields = {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features}
    if isinstance(model, VisionTransformer) and model.global_pool:
        fields["global_pool"] = model.global_pool  # informational, as timm's own exports write it
    return {**fields, "model_args": args, "pretrained_cfg": extra}


# -- official POA checkpoints (alipay/POA, dinov2-based) -----------------------------------------------------
# Its elastic layers wrap the plain ones one level down: `blocks.3.norm1.norm.weight`, `blocks.3.attn.qkv.linear.weight`,
# `norm.norm.bias` (DynamicLayerNorm.norm, DynamicLinear.linear; DynamicConv2d.conv where a conv is elastic).
POA_WRAPPERS = ("linear", "conv")
POA_ELASTIC_MARK = "attn.qkv.linear.weight"
POA_HEAD_DIM = 64  # `student.head_dim` of every official POA ViT config


def _poa_key(key: str) -> str:
    """An official POA backbone key under our intact-model name: wrapper levels and dinov2 block chunks removed."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
        del parts[1]  # dinov2's BlockChunk level: blocks.{chunk}.{block}.*
    if len(parts) >= 3 and (parts[-2] in POA_WRAPPERS or (parts[-2] == "norm" and "norm" in parts[-3])):
        del parts[-2]
    return ".".join(parts)


def poa_backbone(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The intact elastic ViT of an official POA teacher checkpoint (`{'teacher': sd}`, its `backbone.*`, or that
    backbone already unwrapped) under zoo/timm names; heads and mask_token dropped."""
    sd: Any = checkpoint
    if isinstance(sd, Mapping) and isinstance(sd.get("teacher"), Mapping):
        sd = sd["teacher"]
    if not isinstance(sd, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(sd).__name__}, not POA's {{'teacher': state dict}}")
    tensors = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(BACKBONE_PREFIX) for k in tensors):
        tensors = {k.removeprefix(BACKBONE_PREFIX): v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    if not any(k.endswith(POA_ELASTIC_MARK) for k in tensors):
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise CheckpointMismatchError(
            f"not an official POA checkpoint: no elastic layers such as backbone.blocks.0.{POA_ELASTIC_MARK} "
            f"(found {sample}). POA's teacher_checkpoint.pth holds {{'teacher': {{'backbone.*', 'dino_head.*'}}}}; "
            "convert a plain ViT with `zoo convert SRC OUT --arch ARCH` instead"
        )
    return {_poa_key(k): v for k, v in tensors.items() if not k.startswith(MASKED_EMBED_KEYS + ("head.",))}


def _poa_intact_dims(sd: Mapping[str, torch.Tensor], max_width: int | None, max_depth: int | None) -> tuple[int, int]:
    """(D_max, L_max) of a POA backbone, checked against the caller's if given."""
    if "cls_token" not in sd:
        raise CheckpointMismatchError("POA checkpoint has no backbone.cls_token, so its width is unknown")
    found = sd["cls_token"].shape[-1], max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1) + 1
    for name, given, have in (("max_width", max_width, found[0]), ("max_depth", max_depth, found[1])):
        if given is not None and given != have:
            raise CheckpointMismatchError(f"{name}={given} does not match the checkpoint's intact model ({have}); "
                                          f"leave {name} out to use the checkpoint's")
    return found


def poa_to_vit(
    checkpoint_or_state_dict: Mapping[str, Any],
    width: int,
    depth: int,
    *,
    max_width: int | None = None,
    max_depth: int | None = None,
    head_dim: int = POA_HEAD_DIM,
) -> dict[str, torch.Tensor]:
    """The plain timm-layout ViT state dict of the (width, depth) sub-network of an official POA teacher
    checkpoint: POA's own extraction (leading slices, `linspace` blocks, α = D_max / D folded into the Linear
    weights) but keeping the final norm, which the official script drops by mistake."""
    sd = poa_backbone(checkpoint_or_state_dict)
    _poa_intact_dims(sd, max_width, max_depth)
    return _poa_slice(sd, width, depth, head_dim)


def _poa_slice(sd: Mapping[str, torch.Tensor], width: int, depth: int, head_dim: int) -> dict[str, torch.Tensor]:
    from zoo.models.elastic import slice_vit_state_dict

    return {k: v.detach().contiguous().clone() for k, v in slice_vit_state_dict(sd, width, depth, head_dim=head_dim).items()}


def poa_vit_kwargs(sd: Mapping[str, torch.Tensor], width: int, depth: int, head_dim: int = POA_HEAD_DIM) -> dict[str, Any]:
    """zoo `VisionTransformer` arguments of the (width, depth) sub-network of a POA backbone (`poa_backbone`)."""
    proj = sd["patch_embed.proj.weight"]
    patch, n_patches = proj.shape[-1], sd["pos_embed"].shape[1] - 1
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise CheckpointMismatchError(f"POA pos_embed has {n_patches} patch positions, not a square grid")
    max_width = proj.shape[0]
    return dict(
        img_size=side * patch, patch_size=patch, in_chans=proj.shape[1], embed_dim=width, depth=depth,
        num_heads=width // head_dim, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / max_width,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        class_token=True, global_pool="token",
    )


def _vit_arch_for(kwargs: Mapping[str, Any]) -> str:
    """The registered ViT whose shape the sub-network has, else one of its patch grid, else a standard one
    (the card's arguments set every shape either way)."""
    from zoo.models.vit import VIT_ARCHS

    def grid(cfg: Mapping[str, Any]) -> tuple[int, int]:
        return cfg.get("img_size", 224), cfg.get("patch_size", 16)

    same_grid = [a for a, cfg in VIT_ARCHS.items() if grid(cfg) == grid(kwargs)]
    exact = [a for a in same_grid if (VIT_ARCHS[a]["embed_dim"], VIT_ARCHS[a]["depth"]) == (kwargs["embed_dim"], kwargs["depth"])]
    return (exact or same_grid or [TIMM_VIT_FALLBACK])[0]


def poa_model(
    checkpoint_or_state_dict: Mapping[str, Any],
    width: int,
    depth: int,
    *,
    arch: str | None = None,
    max_width: int | None = None,
    max_depth: int | None = None,
    head_dim: int = POA_HEAD_DIM,
) -> nn.Module:
    """The (width, depth) sub-network of an official POA teacher checkpoint as a zoo ViT, ready for
    `zoo.publish(model, name, {"elastic": model.elastic, ...})`; `arch` names it (default: inferred)."""
    from zoo.factory import create_model
    from zoo.models.elastic import elastic_card

    sd = poa_backbone(checkpoint_or_state_dict)
    intact_width, intact_depth = _poa_intact_dims(sd, max_width, max_depth)
    weights = _poa_slice(sd, width, depth, head_dim)
    kwargs = poa_vit_kwargs(sd, width, depth, head_dim)
    model = create_model(arch or _vit_arch_for(kwargs), **kwargs)
    load_checked(model, weights, "POA checkpoint", strict=True)
    model.elastic = elastic_card(width, depth, intact_width, intact_depth)
    return model


# -- official UNIP checkpoints (casiatao/UNIP) ------------------------------------------------------------------
# `{'model': state dict}` with timm ViT names and a fixed sin-cos position embedding. The last block attends with the
# teacher's head count (16 for MAE-L / iBOT-L teachers, 12 for DINO-B), which the weights cannot tell: qkv is
# (3·D, D) whatever the heads. Its norm2 + MLP and the final norm never got a gradient in pretraining.
UNIP_LAST_HEADS = 16


def unip_untrained(sd: Mapping[str, torch.Tensor], depth: int) -> list[str]:
    """The parts of a UNIP backbone pretraining left at their initial values: the last block's norm2 (and so its
    MLP, trained with it or not at all) and the final norm, wherever their LayerNorms are still exactly (1, 0)."""
    out = []
    for part in ("blocks.{last}.norm2", "norm"):
        name = part.format(last=depth - 1)
        w, b = sd.get(f"{name}.weight"), sd.get(f"{name}.bias")
        if w is not None and b is not None and bool((w == 1).all()) and bool((b == 0).all()):
            out.append(name)
            if name.endswith("norm2"):
                out.append(f"blocks.{depth - 1}.mlp")
    return out


def unip_model(checkpoint_or_state_dict: Mapping[str, Any], *, last_heads: int = UNIP_LAST_HEADS,
               arch: str | None = None, head_dim_hint: int = 64) -> nn.Module:
    """An official UNIP checkpoint as a zoo ViT whose last block has `last_heads` heads (UNIP-T/S/B: 16 with the
    released MAE-L teacher). `model.unip` says which parts pretraining left untrained (reported, not hidden)."""
    from zoo.factory import create_model

    sd = {k: v for k, v in unwrap(checkpoint_or_state_dict).items() if not k.startswith(("head.", "fc_norm."))}
    proj = sd.get("patch_embed.proj.weight")
    if proj is None or "pos_embed" not in sd:
        raise CheckpointMismatchError("not a UNIP/ViT checkpoint: no patch_embed.proj.weight or pos_embed; "
                                      f"its first keys are {list(sd)[:4]}")
    width, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_patches = sd["pos_embed"].shape[1] - 1
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise CheckpointMismatchError(f"UNIP pos_embed has {n_patches} patch positions, not a square grid")
    heads = {192: 3, 384: 6, 768: 12, 1024: 16}.get(width, max(width // head_dim_hint, 1))
    kwargs = dict(img_size=side * patch, patch_size=patch, in_chans=proj.shape[1], embed_dim=width, depth=depth,
                  num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd, pos_embed="sincos", global_pool="token",
                  last_heads=last_heads if last_heads != heads else None)
    model = create_model(arch or _vit_arch_for(kwargs), **kwargs)
    load_checked(model, fit_state_dict(sd, model), "UNIP checkpoint", strict=True)
    untrained = unip_untrained(sd, depth)
    if untrained:
        log.warning("UNIP checkpoint: %s never trained (UNIP distils the last block's attention only); "
                    "features read after them (linear probes, LL-FPN) see their initial values", ", ".join(untrained))
    model.unip = {"last_heads": last_heads, "untrained": untrained}
    return model


def dit_model(checkpoint: Mapping[str, Any], *, arch: str | None = None) -> nn.Module:
    """An official DiT checkpoint (`DiT-XL-2-256x256.pt`, or a training checkpoint: its `ema` weights) as a zoo
    DiT computing what DiT computed (`freq_shift=0`, LayerNorm eps 1e-6); the arch is inferred unless given."""
    from zoo.factory import create_model
    from zoo.models.dit import DIT_ARCHS, arch_for_config, config_overrides, official_config, official_state_dict, \
        official_to_diffusers

    sd = official_state_dict(checkpoint)
    config = official_config(sd)
    if arch is None:
        if config["num_attention_heads"] is None:
            width = sd["x_embedder.proj.weight"].shape[0]
            raise ConfigError(f"DiT checkpoint of width {width}: the head count is not in the tensors; pass "
                              "--arch (one of " + ", ".join(DIT_ARCHS) + ")")
        arch, args = arch_for_config(config)
    else:
        args = config_overrides(arch, config)
    model = create_model(arch, freq_shift=0, norm_eps=1e-6, **args)  # DiT's LayerNorms all use eps 1e-6
    load_checked(model, official_to_diffusers(sd), "DiT checkpoint", strict=True)
    fixed = model.pos_embed.pos_embed
    if "pos_embed" in sd and (sd["pos_embed"].shape != fixed.shape or not torch.allclose(sd["pos_embed"].float(),
                                                                                         fixed.float(), atol=1e-4)):
        raise CheckpointMismatchError("DiT checkpoint: its pos_embed is not the fixed 2-D sin-cos embedding "
                                      f"diffusers' DiT uses (shape {tuple(sd['pos_embed'].shape)} vs "
                                      f"{tuple(fixed.shape)}); it cannot be converted faithfully")
    return model


# -- official FLAME checkpoints (MIV-XJTU/FLAME, an open_clip fork) ---------------------------------------------
# `{'epoch', 'name', 'state_dict', 'optimizer', 'scaler'}`, keys `module.`-prefixed: `visual.*` an open_clip
# VisionTransformer (GELU, LayerNorm eps 1e-5, ln_pre, no conv bias, heads = width / 64), `mm.*` the projector
# nn.Sequential(Linear, GELU, Linear, LayerNorm) (zoo's FLAME.mm index for index), `logit_scale`, `logit_bias`,
# and the frozen LLM under `text.*`. Its images are normalised with OpenAI CLIP's mean/std, resized and cropped.
FLAME_MARKS = ("visual.conv1.weight", "mm.0.weight")
FLAME_HEAD_WIDTH = 64  # open_clip CLIPVisionCfg.head_width, which FLAME's configs leave at its default
FLAME_NORM_EPS = 1e-5  # open_clip's LayerNorm is torch's, default eps
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip block names -> zoo/timm block names (q, k, v stay fused: in_proj is [q; k; v] as timm's qkv is)
_OPEN_CLIP_BLOCK = {"ln_1.": "norm1.", "attn.in_proj_": "attn.qkv.", "attn.out_proj.": "attn.proj.", "ls_1.": "ls1.",
                    "ln_2.": "norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.", "ls_2.": "ls2."}
# What FLAME's encode_image never reads: open_clip's ln_post and proj (its CLIP head; FLAME pools the projector's
# output over tokens taken before them)
_OPEN_CLIP_UNUSED = ("ln_post.", "proj")


def is_official_flame(checkpoint: Any) -> bool:
    """Whether a checkpoint is FLAME's (a training checkpoint or its bare state dict, `module.` or not)."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping):
        return False
    keys = {k.removeprefix("module.") for k in sd if isinstance(k, str)}
    return all(mark in keys for mark in FLAME_MARKS)


def _open_clip_vit_key(key: str) -> str | None:
    """An open_clip VisionTransformer key (without `visual.`) under zoo's ViT name; None for one FLAME never uses;
    anything unknown unchanged (load_checked then names it)."""
    if key.startswith(_OPEN_CLIP_UNUSED):
        return None
    fixed = {"conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token",
             "positional_embedding": "pos_embed"}
    if key in fixed:
        return fixed[key]
    if key.startswith("ln_pre."):
        return "norm_pre." + key.removeprefix("ln_pre.")
    if key.startswith("transformer.resblocks."):
        i, name = key.removeprefix("transformer.resblocks.").split(".", 1)
        for old, new in _OPEN_CLIP_BLOCK.items():
            if name.startswith(old):
                return f"blocks.{i}.{new}{name.removeprefix(old)}"
    return key


def flame_model(checkpoint: Mapping[str, Any], *, arch: str | None = None, lm: str | None = None,
                head_width: int = FLAME_HEAD_WIDTH) -> nn.Module:
    """An official FLAME checkpoint as zoo's FLAME, computing FLAME's `encode_image`: the tower's tokens before
    ln_post, the projector on every token, the mean over the patch tokens. The LLM (`text.*`) is dropped: name it
    with `lm` (FLAME-Mistral-Nemo: 'hf-hub:mistralai/Mistral-Nemo-Instruct-2407'). open_clip's ln_post and proj
    are dropped too (FLAME never reads them); the tower's unused fc_norm keeps its initial (1, 0). `arch`: a
    registered FLAME arch whose tower has the checkpoint's width (default: the one that has it, e.g.
    flame_vit_base_patch16_224 for ViT-B/16); depth, patch, image size, heads (width / `head_width`) and the
    projector's widths come from the tensors."""
    from zoo.factory import create_model
    from zoo.models.flame import FLAME_ARCHS
    from zoo.models.vit import VIT_ARCHS

    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"not a FLAME checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    sd = unwrap(checkpoint)
    if not any(k.startswith("visual.") for k in sd) or not any(k.startswith("mm.") for k in sd):
        sample = ", ".join(list(sd)[:3]) or "no tensors"
        raise CheckpointMismatchError(
            f"not an official FLAME checkpoint: no visual.* (image tower) and mm.* (projector) keys (found {sample}); "
            "FLAME's epoch_N.pt holds {'state_dict': {'module.visual.*', 'module.mm.*', 'module.logit_scale', ...}}")
    if "visual.conv1.weight" not in sd or "visual.positional_embedding" not in sd:
        raise CheckpointMismatchError("FLAME checkpoint: its image tower is not an open_clip VisionTransformer (no "
                                      "visual.conv1.weight / visual.positional_embedding); only ViT towers convert")
    if not all(f"mm.{i}.weight" in sd for i in (0, 2, 3)) or any(k.startswith(("mm.1.", "mm.4.")) for k in sd):
        raise CheckpointMismatchError("FLAME checkpoint: its projector is not Linear, GELU, Linear, LayerNorm "
                                      f"(mlp_depth 2; found {sorted(k for k in sd if k.startswith('mm.'))[:6]})")
    n_text = sum(k.startswith("text.") for k in sd)
    if n_text:
        log.info("FLAME checkpoint: dropped the frozen language model (%d text.* keys)", n_text)

    conv, pos = sd["visual.conv1.weight"], sd["visual.positional_embedding"]
    width, patch = conv.shape[0], conv.shape[-1]
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if side * side != pos.shape[0] - 1:
        raise CheckpointMismatchError(f"FLAME tower has {pos.shape[0] - 1} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    if width % head_width:
        raise ConfigError(f"FLAME tower width {width} is not a multiple of head_width={head_width}; pass the "
                          "head width its config used (open_clip's vision_cfg.head_width)")
    vision_args = dict(
        img_size=side * patch, patch_size=patch, in_chans=conv.shape[1], depth=depth, num_heads=width // head_width,
        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        qkv_bias="visual.transformer.resblocks.0.attn.in_proj_bias" in sd, pre_norm="visual.ln_pre.weight" in sd,
        norm_eps=FLAME_NORM_EPS, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        init_values=1e-5 if "visual.transformer.resblocks.0.ls_1.gamma" in sd else None,  # overwritten by the weights
    )
    if arch is None:
        fits = [a for a, (v, _) in FLAME_ARCHS.items() if VIT_ARCHS[v]["embed_dim"] == width]
        same = [a for a in fits if all(VIT_ARCHS[FLAME_ARCHS[a][0]].get(k, d) == vision_args[k]
                                       for k, d in (("img_size", 224), ("patch_size", 16), ("depth", 12)))]
        if not fits:
            raise ConfigError(f"no registered FLAME arch has a {width}-wide image tower (they have: "
                              + ", ".join(f"{a} {VIT_ARCHS[v]['embed_dim']}" for a, (v, _) in FLAME_ARCHS.items())
                              + "); register one in zoo.models.flame.FLAME_ARCHS")
        arch = (same or fits)[0]
    arch = arch.partition(".")[0]
    if arch not in FLAME_ARCHS:
        raise ConfigError(f"{arch!r} is not a FLAME arch; use one of {', '.join(FLAME_ARCHS)}")
    tower_width = VIT_ARCHS[FLAME_ARCHS[arch][0]]["embed_dim"]
    if tower_width != width:
        raise CheckpointMismatchError(f"FLAME checkpoint's image tower is {width} wide, {arch}'s {tower_width}; "
                                      "leave arch out to pick the FLAME arch of that width")

    weights: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            new = _open_clip_vit_key(k.removeprefix("visual."))
            if new is None:
                continue
            if new == "cls_token":
                v = v.reshape(1, 1, -1)
            elif new == "pos_embed":
                v = v.unsqueeze(0)
            weights["visual." + new] = v
        elif not k.startswith("text."):
            weights[k] = v  # mm.*, logit_scale, logit_bias; anything else is refused by load_checked
    if "logit_bias" not in weights and "logit_scale" in weights:
        log.info("FLAME checkpoint has no logit_bias (trained without --mp-sigmoid): using 0, its forward's value")
        weights["logit_bias"] = torch.zeros_like(weights["logit_scale"])

    args = dict(lm=lm, embed_dim=sd["mm.2.weight"].shape[0], mm_hidden=sd["mm.0.weight"].shape[0], **vision_args)
    model = create_model(arch, **args)
    for name, t in model.visual.fc_norm.state_dict().items():  # unused by FLAME (see docstring): its own init
        weights[f"visual.fc_norm.{name}"] = t
    load_checked(model, weights, "FLAME checkpoint", strict=True)
    for cfg in (model.pretrained_cfg, model.visual.pretrained_cfg):
        cfg["crop_pct"] = 1.0  # open_clip: resize the short side to the image size, then centre-crop it
    return model
