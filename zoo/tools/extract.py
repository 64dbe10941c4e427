"""Publish a (width, depth) sub-network of an intact POA model without retraining (`zoo extract`).

The source is a published intact POA model (its card holds the elastic space it was trained on,
`elastic.widths`) or a POA run directory (its `config.yaml` and latest checkpoint: the EMA teacher's intact
ViT). Reading a run means building the run's method, so this sits with the tools, above `zoo.engine` and
`zoo.recipes`; the slicing itself is `zoo.models.elastic.extract`.

    path = extract_and_publish("vit_nano_patch4_32.poa_fractal", 64, 4)   # -> ..._w64_d4 in the store
    path = extract_and_publish("runs/poa_vit_nano_patch4_32_fractals", 96, 3, name="vit_nano_patch4_32.poa_w96")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.errors import CheckpointMismatchError, ConfigError, ZooError
from zoo.hub import CONFIG_FILE, NAME_RE, load, publish, read_config, store_dir
from zoo.models.elastic import check_size, extract
from zoo.models.vit import VisionTransformer

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # what the engine writes into every run directory
COPIED_PROVENANCE = ("recipe", "data", "steps")  # what an extracted size inherits from its parent's card


@dataclass
class Intact:
    """An intact elastic ViT and what the sizes cut from it inherit."""

    vit: VisionTransformer
    space: dict[str, Any]  # the trained elastic space: {"widths", "depths", "width", "depth"}
    parent: str  # what a sub-network's card names as its parent: a store name, a folder or a run directory
    extracted_from: str  # the exact source: the name or folder, or the run's checkpoint file
    base_name: str | None  # the default name's stem: the source's published name (a run's output.publish)
    provenance: dict[str, Any] = field(default_factory=dict)

    def trained(self, width: int, depth: int) -> bool:
        """Whether POA trained this size: a width and a depth of the elastic space, or the intact network."""
        s = self.space
        return (width in s["widths"] and depth in s["depths"]) or (width, depth) == (s["width"], s["depth"])


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run directory (the engine's `config.yaml`), not a published model folder."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / RUN_CONFIG).is_file() and not (p / CONFIG_FILE).is_file()


def load_intact(source: str | os.PathLike) -> Intact:
    """The intact POA ViT of a published name or folder, or of a POA run directory's latest checkpoint."""
    source = os.fspath(source)
    in_store = bool(NAME_RE.match(source)) and (store_dir() / source / CONFIG_FILE).is_file()
    if not in_store and is_run_dir(source):
        return _from_run(Path(source).expanduser())
    path = Path(source).expanduser()
    if not in_store and path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise ZooError(f"{path} is neither a published model folder (no {CONFIG_FILE}) nor a run directory "
                       f"(no {RUN_CONFIG}); give an intact POA model's name or folder, or a POA run directory")
    return _from_published(source, in_store)


def _from_published(source: str, in_store: bool) -> Intact:
    if in_store or Path(source).expanduser().is_dir():  # read the card before loading any weights
        card = read_config(store_dir() / source if in_store else Path(source).expanduser())
        _elastic_space(source, card if isinstance(card, dict) else {})
    model = load(source)
    card = getattr(model, "zoo_card", None) or {}
    space = _elastic_space(source, card)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{source} is a {type(model).__name__}, not a zoo VisionTransformer; only an intact POA "
                          "ViT has sub-networks to extract")
    space = {"width": model.embed_dim, "depth": len(model.blocks), **space}
    folder = Path(source).expanduser().resolve()
    if in_store or folder.parent == store_dir().expanduser().resolve():
        parent = card.get("name") or folder.name  # a store model: by name
    else:
        parent = str(folder) if folder.is_dir() else source
    prov = card.get("provenance") or {}
    provenance = {k: prov[k] for k in COPIED_PROVENANCE if prov.get(k) is not None}
    if card.get("weights_sha256"):
        provenance["parent_weights_sha256"] = card["weights_sha256"]
    return Intact(model, space, parent, parent, card.get("name") or folder.name, provenance)


def _elastic_space(source: str, card: dict[str, Any]) -> dict[str, Any]:
    """The elastic space an intact POA model's card records; a clear refusal for anything else."""
    elastic = card.get("elastic")
    if isinstance(elastic, dict) and elastic.get("widths") and elastic.get("depths"):
        return {k: elastic[k] for k in ("widths", "depths", "width", "depth") if k in elastic}
    if isinstance(elastic, dict) and "parent" in elastic:
        raise ConfigError(f"{source} is itself a sub-network (w{elastic.get('width')} d{elastic.get('depth')}) of "
                          f"{elastic['parent']}; extract from the intact model {elastic['parent']} instead")
    raise ConfigError(f"{source} is not an intact POA model: its card has no elastic.widths (the elastic space a "
                      "POA run publishes with its intact model); give an intact POA model or a POA run directory")


def _from_run(run_dir: Path) -> Intact:
    from zoo.config import load_config
    from zoo.engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from zoo.engine.trainer import build_method, data_description, fingerprint
    from zoo.recipes.poa import POA
    from zoo.registry import RECIPES

    cfg = load_config(run_dir / RUN_CONFIG)
    factory = RECIPES.get(cfg.method.name).factory
    if not (isinstance(factory, type) and issubclass(factory, POA)):
        raise ConfigError(f"{run_dir} is a {cfg.method.name} run, not a POA run: only POA trains sub-networks "
                          "that can be extracted; give a POA run directory or an intact POA model")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint yet; wait for the run's first one "
                              f"(output.checkpoint_every: {cfg.output.checkpoint_every} steps) or its end")
    state = load_checkpoint(ckpt, fingerprint=fingerprint(cfg))
    with torch.random.fork_rng(devices=[]):  # building draws a random init: leave the caller's streams alone
        method = build_method(cfg)
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(f"{ckpt} does not fit the method {RUN_CONFIG} builds ({first}); "
                                      "was the run directory's config edited?") from None
    vit = method.backbone().eval()  # the EMA teacher's intact ViT, as POA exports it
    space = {"widths": list(method.widths), "depths": list(method.depths), "width": vit.embed_dim,
             "depth": len(vit.blocks)}
    pairs = (("recipe", cfg.method.name), ("data", data_description(cfg)), ("steps", int(state["step"])))
    provenance = {k: v for k, v in pairs if v is not None}
    resolved = run_dir.resolve()
    return Intact(vit, space, str(resolved), str(ckpt.resolve()), cfg.output.publish, provenance)


def extract_and_publish(
    source: str | os.PathLike,
    width: int,
    depth: int,
    *,
    name: str | None = None,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Publish the (width, depth) sub-network of an intact POA model (a name, folder or POA run directory)
    as NAME (default `{source name}_w{W}_d{L}`) and return its folder. A size outside the trained elastic
    space is published with a warning: a valid slice that POA never trained."""
    intact = load_intact(source)
    try:
        check_size(intact.vit, width, depth)
    except ConfigError as e:
        raise ConfigError(f"{intact.parent}: {e}") from None
    if name is None:
        if not intact.base_name:
            raise ConfigError(f"{source} is a run without output.publish, so there is no default name; pass "
                              f"--name ARCH.TAG (e.g. --name {intact.vit.zoo_arch}.poa_w{width}_d{depth})")
        name = f"{intact.base_name}_w{width}_d{depth}"
    trained = intact.trained(width, depth)
    if not trained:
        log.warning("w%d d%d is a valid slice of %s but was never trained (its elastic space: widths %s x depths "
                    "%s); expect weaker features than from a trained size", width, depth, intact.parent,
                    intact.space["widths"], intact.space["depths"])
    sub = extract(intact.vit, width, depth)
    card = {
        "elastic": {**sub.elastic, "parent": intact.parent, "trained": trained},
        "provenance": {**intact.provenance, "extracted_from": intact.extracted_from},
    }
    return publish(sub, name, card, root=root, overwrite=overwrite)


__all__ = ["Intact", "is_run_dir", "load_intact", "extract_and_publish"]
