"""Names -> weights.

`load(name)` resolves, in order: a model published in the zoo store (`$ZOO_HOME/models/NAME`),
`hf-hub:org/repo` (a zoo or timm repo, a diffusers DiT or DiT pipeline such as `facebook/DiT-XL-2-256`),
`timm:NAME`, `open_clip:ARCH/TAG`, an `http(s)://...#sha256=HEX` URL, a name in the pretrained table (`zoo.pretrained`: official releases, pinned by sha256 or by `zoo.lock`),
and a local directory (a zoo folder, one timm's `save_for_hf` wrote, a diffusers DiT or pipeline folder) or
weights file. Published folders are readable by timm (`local-dir:`), for whole CLIP models by open_clip,
and for DiTs by diffusers' `from_pretrained`: see `make_card` and `publish`. Weights are safetensors;
pickles load only with `weights_only=True`; every remote file is checked against its sha256
before use and a failed download leaves nothing behind.

`create_model` and `list_models` (exported as `zoo.create_model` / `zoo.list_models`) live here,
above `zoo.factory`, because their `pretrained=True` forms need the hub; the factory builds
architectures only and never imports this module.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from zoo.convert import fit_state_dict, flame_model, is_official_flame, load_checked, timm_config, unwrap
from zoo.errors import (
    CheckpointMismatchError,
    ChecksumError,
    ConfigError,
    DownloadError,
    UnknownNameError,
    UnsafeCheckpointError,
    ZooError,
)
from zoo import factory
from zoo import lock as _lock
from zoo import pretrained as _pretrained
from zoo.factory import split_name
from zoo.home import zoo_home
from zoo.models.clip import open_clip_config
from zoo.models.dit import diffusers_card
from zoo.models import lm as _lm
from zoo.progress import progress_bar
from zoo.registry import MODELS, close_matches, matching

log = logging.getLogger(__name__)

CARD_FORMAT = "zoo.model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # what open_clip's local-dir:/hf-hub: loaders read
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained reads
DIFFUSERS_PIPELINE_FILE = "model_index.json"  # a diffusers pipeline folder/repo (its DiT under transformer/)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9][A-Za-z0-9_\-]*)?$")



def register_weights(name: str, source: str, *, sha256: str | None = None, **load_kwargs: Any) -> None:
    """Make `zoo.load(name)` fetch `source` (URL, `hf-hub:` id or path), pinned to `sha256` for URLs; the entry
    joins the pretrained table (`zoo list --pretrained`) for this process."""
    if source.startswith(("http://", "https://")) and not sha256 and "#sha256=" not in source:
        raise ZooError(f"weights {name!r}: a URL source must be pinned with sha256=")
    if sha256 is None and "#sha256=" in source:
        source, sha256 = parse_pinned_url(source)
    _pretrained.register(_pretrained.make_entry(name, {"source": source, "sha256": sha256, "args": load_kwargs},
                                                registered=True))


# -- the store -----------------------------------------------------------------------------------
def store_dir() -> Path:
    return zoo_home() / "models"


def store_names(pattern: str | None = None) -> list[str]:
    """Names of the models published in the local store."""
    root = store_dir()
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())
    return matching(names, pattern)


def pretrained_names(pattern: str | None = None) -> list[str]:
    """Every name `load` resolves without a path: the store plus the pretrained table (`zoo.pretrained`)."""
    return sorted(set(store_names(pattern)) | {e.name for e in _pretrained.entries(pattern)})


def is_timm_config(cfg: Any) -> bool:
    """Whether a parsed config.json is timm's (written by `timm.models.save_for_hf`) rather than a zoo card."""
    return isinstance(cfg, dict) and "architecture" in cfg and "arch" not in cfg


def read_config(folder: str | Path) -> Any:
    """The parsed `config.json` of a folder, whatever wrote it."""
    cfg_path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e}); republish the model or fix the file") from None


def read_card(name_or_dir: str | Path) -> dict[str, Any]:
    """The `config.json` card of a published model (a store name or a directory)."""
    path = Path(name_or_dir)
    if not (path / CONFIG_FILE).is_file():
        path = store_dir() / str(name_or_dir)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise UnknownNameError(_unknown_message(str(name_or_dir)))
    card = read_config(path)
    if is_timm_config(card):
        raise ConfigError(f"{cfg_path} is timm's config (architecture {card['architecture']!r}), not a zoo card; "
                          f"zoo.load({str(path)!r}) builds it with timm")
    if not isinstance(card, dict) or "arch" not in card:
        raise ConfigError(f"{cfg_path} has no 'arch' entry; it is not a zoo model card")
    return card


def describe(path: str | Path) -> dict[str, Any]:
    """What a published folder or a weights file says about itself (`zoo info PATH`): its zoo card, its timm
    config, or for a bare weights file its tensors."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ZooError(f"{path} has no {CONFIG_FILE}; it is not a published model folder")
        cfg = read_config(path)
        if is_timm_config(cfg):
            return {"name": path.name, "format": "timm", "arch": f"timm:{cfg['architecture']}",
                    "loads_with": f"zoo.load({str(path)!r}) or timm.create_model('local-dir:{path}')", **cfg}
        return read_card(path)
    if not path.is_file():
        raise ZooError(f"no such file or folder: {path}")
    card = _safetensors_card(path) if path.suffix == ".safetensors" else None
    if card is None and path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        beside = read_config(path.parent)
        card = beside if isinstance(beside, dict) and "arch" in beside else None
    if card is not None:
        return {"file": str(path), **card}
    sd = read_state_dict(path)
    return {"file": str(path), "tensors": len(sd), "params": sum(v.numel() for v in sd.values()),
            "arch": f"unknown: pass arch=, e.g. zoo.load({str(path)!r}, arch='vit_base_patch16_224')"}


# -- publish -------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    """The commit of the zoo source that produced a model (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Card keys a caller may set (with their types), and keys zoo writes itself; any other key is free-form.
CARD_FIELDS: dict[str, tuple[type, ...]] = {
    "provenance": (dict,), "eval": (dict,), "description": (str,), "license": (str,),
    "recipe": (str, type(None)), "data": (str, list, type(None)), "steps": (int, type(None)),
}
CARD_WRITTEN = ("format", "name", "arch", "args", "params", "pretrained_cfg", "weights_sha256",
                "architecture", "num_classes", "num_features", "global_pool", "model_args", "_class_name",
                "_diffusers_version")
# pretrained_cfg entries a card keeps (all fields of timm's PretrainedCfg, which timm's loaders build from it).
PRETRAINED_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes",
                       "first_conv", "classifier")


def check_card_fields(card: dict[str, Any]) -> None:
    """Refuse a known card key of the wrong type, a key zoo writes itself, a near-miss of a known key
    (a typo), or a value JSON cannot hold; any other key passes through as free-form."""
    for key, value in card.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"card keys must be non-empty strings, got {key!r}")
        if key in CARD_FIELDS:
            types = CARD_FIELDS[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ConfigError(f"card key {key!r} must be {want}, got {type(value).__name__} {value!r}")
            continue
        if key in CARD_WRITTEN:
            raise ConfigError(f"card key {key!r} is written by zoo from the model itself; drop it from the card")
        typo = difflib.get_close_matches(key, list(CARD_FIELDS), n=1, cutoff=0.8)
        if typo:
            raise ConfigError(f"card key {key!r} looks like a typo of {typo[0]!r}; use {typo[0]!r} "
                              "(or another name for a free-form field)")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"card key {key!r} holds a {type(value).__name__}, which JSON cannot store; "
                              "use strings, numbers, lists or dicts") from None


def make_card(model: nn.Module, name: str, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a published model: architecture, preprocessing, provenance, eval results, free-form
    fields, and the fields timm's loaders read where timm can build the model (`zoo.convert.timm_config`)."""
    card = dict(card or {})
    arch = getattr(model, "zoo_arch", None)
    if arch is None:
        raise ZooError(
            f"cannot publish a {type(model).__name__} that zoo did not build; create it with zoo.create_model(ARCH)"
        )
    check_card_fields(card)
    provenance = {
        "recipe": card.pop("recipe", None),
        "data": card.pop("data", None),
        "steps": card.pop("steps", None),
        **card.pop("provenance", {}),
    }
    provenance.setdefault("git_commit", _git_commit())
    provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    from zoo.version import __version__

    provenance.setdefault("zoo_version", __version__)
    pcfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(getattr(model, "pretrained_cfg", {})).items()}
    pcfg["num_classes"] = getattr(model, "num_classes", pcfg.get("num_classes"))
    timm_fields = timm_config(model) or {}
    pcfg.update(timm_fields.pop("pretrained_cfg", {}))
    foreign = {**timm_fields, **(diffusers_card(model) or {}), **(_lm.transformers_card(model) or {})}
    return {
        "format": CARD_FORMAT,
        "name": name,
        "arch": arch,
        "args": dict(getattr(model, "zoo_args", {})),
        "params": sum(p.numel() for p in model.parameters()),
        "pretrained_cfg": {k: pcfg[k] for k in PRETRAINED_CFG_KEYS if k in pcfg},
        "provenance": provenance,
        "eval": card.pop("eval", {}),
        **card,
        **foreign,
    }


def publish(
    model: nn.Module, name: str, card: dict[str, Any] | None = None, *, root: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write `model` as `ROOT/NAME/{model.safetensors,config.json}` (ROOT: the zoo store) and return the directory.

    The directory appears whole or not at all (written aside, then renamed into place).
    """
    if not NAME_RE.match(name):
        raise ZooError(f"invalid model name {name!r}: use 'arch.tag' with letters, digits, '_' and '-'")
    root = Path(root) if root is not None else store_dir()
    dest = root / name
    if dest.exists() and not overwrite:
        raise ZooError(f"{dest} already exists; pass overwrite=True (or --overwrite) to replace it")
    meta = make_card(model, name, card)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(sd, tmp / WEIGHTS_FILE, metadata={"zoo_card": json.dumps(meta)})
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if (oc_cfg := open_clip_config(model)) is not None:
            _write_open_clip_files(tmp, oc_cfg)
        if "_class_name" in meta:  # diffusers' from_pretrained reads config.json and this weights file name
            _link_or_copy(tmp / WEIGHTS_FILE, tmp / DIFFUSERS_WEIGHTS_FILE)
        _lm.save_lm_files(model, tmp)  # an LM's tokenizer (transformers' file names)
        if dest.exists():
            old = dest.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s -> %s", name, dest)
    return dest


def _write_open_clip_files(folder: Path, oc_cfg: dict[str, Any]) -> None:
    """open_clip_config.json, and the weights under open_clip's Hub file name as a hard link to model.safetensors
    (open_clip's `hf-hub:` loader asks for that name; its `local-dir:` one would take model.safetensors too)."""
    (folder / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(oc_cfg, indent=2) + "\n")
    _link_or_copy(folder / WEIGHTS_FILE, folder / OPEN_CLIP_WEIGHTS_FILE)


def _link_or_copy(src: Path, dst: Path) -> None:
    """The weights under another library's file name: a hard link, or a copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links: a copy, same bytes
        shutil.copyfile(src, dst)


def record_eval(name: str, task: str, results: dict[str, Any]) -> Path:
    """Merge eval results into a published model's card (`zoo list` then shows them)."""
    path = Path(name) if (Path(name) / CONFIG_FILE).is_file() else store_dir() / name
    card = read_card(path)
    card.setdefault("eval", {}).setdefault(task, {}).update(results)
    tmp = path / f".{CONFIG_FILE}.part"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


# -- download ------------------------------------------------------------------------------------
def parse_pinned_url(url: str, sha256: str | None = None) -> tuple[str, str]:
    """Split `URL#sha256=HEX` into (URL, hex); a remote file must be pinned."""
    base, _, frag = url.partition("#")
    params = urllib.parse.parse_qs(frag)
    digest = (sha256 or (params.get("sha256") or [""])[0]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ZooError(
            f"{base}: remote weights must be pinned by their sha256; append '#sha256=<64 hex digits>' to the URL"
        )
    return base, digest


def download_folder(url: str, sha256: str | None) -> Path:
    """Where a download is cached: by its sha256 when pinned, else by its URL (a table entry the lock will pin)."""
    return zoo_home() / "downloads" / (sha256 or "unpinned/" + hashlib.sha256(url.encode()).hexdigest()[:16])


def download_name(url: str) -> str:
    """The file name a download is cached under: the URL's last path part."""
    return Path(urllib.parse.urlparse(url).path).name or "download"


def download(url: str, sha256: str | None = None, *, cache_dir: str | Path | None = None,
             unpinned: bool = False) -> Path:
    """Fetch a pinned URL once into the cache and return its path, verified against the sha256.

    `unpinned=True` (a pretrained-table entry the lock file will pin) fetches a URL without a hash once, into
    `downloads/unpinned/` (the caller verifies it: `verify_entry_file`). A mismatch or a broken transfer leaves
    nothing in the cache.
    """
    if unpinned and not sha256 and "#sha256=" not in url:
        base, digest = url.partition("#")[0], None
    else:
        base, digest = parse_pinned_url(url, sha256)
    folder = Path(cache_dir) if cache_dir is not None else download_folder(base, digest)
    filename = download_name(base)
    dest = folder / filename
    if dest.is_file():
        if digest is None or sha256_file(dest) == digest:
            return dest
        log.warning("cached %s does not match its sha256; fetching it again", dest)
        dest.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{filename}.part"
    h = hashlib.sha256()
    try:
        try:
            resp = urllib.request.urlopen(base, timeout=60)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{base}: HTTP {e.code} {e.reason}; check the URL") from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"{base}: cannot connect ({getattr(e, 'reason', e)}); check the URL and network") from None
        with resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=filename) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise DownloadError(f"{base}: transfer ended after {f.tell()} of {total} bytes; try again")
    except (OSError, ValueError) as e:  # a connection dropped mid-stream
        part.unlink(missing_ok=True)
        _remove_if_empty(folder)
        raise DownloadError(f"{base}: download failed ({e}); try again") from None
    except BaseException:
        part.unlink(missing_ok=True)
        _remove_if_empty(folder)
        raise
    if digest is not None and h.hexdigest() != digest:
        part.unlink(missing_ok=True)
        _remove_if_empty(folder)
        raise ChecksumError(
            f"{base}: sha256 is {h.hexdigest()}, expected {digest}; the file was refused and removed. "
            "Check the pinned hash or the source"
        )
    os.replace(part, dest)
    return dest


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# -- reading weight files ------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a pickle read with `weights_only=True` (unwrapped: `zoo.convert.unwrap`)."""
    ckpt = read_checkpoint(path)
    return unwrap(ckpt) if isinstance(ckpt, dict) else _not_a_state_dict(Path(path), ckpt)


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """A weights file as saved: a safetensors file's tensors, or a pickle's whole object (nesting kept, e.g.
    DiT's {'model', 'ema', 'opt', 'args'}), read with `weights_only=True` unless the user trusts the file."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own untyped errors on corrupt headers
            raise ZooError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from None
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"e.g. {found.group(1)}" if found else "not only tensors"
        raise UnsafeCheckpointError(
            f"{path} needs arbitrary Python objects to unpickle ({what}), so it was not loaded. "
            f"If you trust its origin, convert it once to safetensors: "
            f"`zoo convert {path} OUT.safetensors --arch ARCH --trust-pickle`"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ZooError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    return ckpt


def _not_a_state_dict(path: Path, obj: Any):
    raise ZooError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")


def read_untrusted_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a pickled checkpoint with full unpickling: only for files the user says they trust."""
    return unwrap(read_checkpoint(path, trust_pickle=True))


def _safetensors_card(path: Path) -> dict[str, Any] | None:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own untyped errors on corrupt headers
        raise ZooError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from None
    return json.loads(meta["zoo_card"]) if "zoo_card" in meta else None


# -- load ----------------------------------------------------------------------------------------
def _unknown_message(name: str) -> str:
    arch, _ = split_name(name)
    if arch in MODELS and name == arch:
        return (
            f"{name!r} is an architecture without pretrained weights here; build it with "
            f"zoo.create_model({name!r}), or load one of: {', '.join(pretrained_names(arch + '*')[:5]) or '(none published)'}"
        )
    candidates = pretrained_names() + MODELS.names()
    hint = close_matches(name, candidates)
    msg = f"unknown model {name!r}: not in the zoo store ({store_dir()}), not a registered name, not a file"
    if hint:
        msg += f"; did you mean: {', '.join(hint)}?"
    return msg + " (`zoo list` shows them; use timm:NAME or open_clip:ARCH/TAG for those libraries)"


def _build_from_card(card: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    arch = card["arch"]
    if arch not in MODELS:
        raise ConfigError(f"card names architecture {arch!r}, which this zoo version does not have; upgrade zoo")
    return factory.create_model(arch, **{**card.get("args", {}), **overrides})


def _finish(model: nn.Module, card: dict[str, Any] | None, source: str) -> nn.Module:
    model.zoo_card = card or {}
    model.zoo_source = source
    return model.eval()


def _load_dir(path: Path, overrides: dict[str, Any], strict: bool, arch: str | None = None) -> nn.Module:
    if (path / DIFFUSERS_PIPELINE_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        return _load_diffusers(path, overrides, pipeline=True)
    if not (path / CONFIG_FILE).is_file():
        raise UnknownNameError(_unknown_message(str(path)))
    if isinstance(cfg := read_config(path), dict) and "_class_name" in cfg and "arch" not in cfg:
        return _load_diffusers(path, overrides, pipeline=False)
    if _lm.is_transformers_config(cfg):  # a folder transformers' save_pretrained wrote: a causal LM
        return _load_lm(path, overrides, str(path))
    if is_timm_config(cfg):
        if arch is not None:  # the weights into a zoo architecture, as for a bare file
            weights = next((path / f for f in (WEIGHTS_FILE, "pytorch_model.bin") if (path / f).is_file()), None)
            if weights is None:
                raise ZooError(f"{path} has a timm {CONFIG_FILE} but neither {WEIGHTS_FILE} nor pytorch_model.bin")
            return _load_file(weights, arch, overrides, strict)
        return _load_timm_dir(path, cfg, overrides, strict)
    card = read_card(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ZooError(f"{path} has a {CONFIG_FILE} but no {WEIGHTS_FILE}; republish the model")
    expected = card.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise ChecksumError(f"{weights} does not match the sha256 in its {CONFIG_FILE}; the file is corrupt, republish it")
    model = _build_from_card(card, overrides)
    sd = fit_state_dict(read_state_dict(weights), model)
    load_checked(model, sd, str(weights), strict=strict)
    if (path / _lm.TOKENIZER_FILE).is_file():
        model.tokenizer = _lm.load_tokenizer(path)
    return _finish(model, card, str(path))


def _load_lm(source: str | Path, overrides: dict[str, Any], where: str, revision: str | None = None) -> nn.Module:
    """A transformers causal LM (folder or Hub repo) with its tokenizer; `dtype=` may be overridden."""
    dtype = overrides.pop("dtype", None)
    if overrides:
        raise ConfigError(f"{where}: a transformers model loads as saved (only dtype= may be given); got "
                          f"{', '.join(overrides)}")
    model = _lm.load_causal_lm(source, revision=revision, dtype=dtype, where=where)
    return _finish(model, {"arch": f"transformers:{model.config.model_type}", "format": "transformers"}, where)


def _load_timm_dir(path: Path, cfg: dict[str, Any], overrides: dict[str, Any], strict: bool) -> nn.Module:
    """A folder written by `timm.models.save_for_hf`, built by timm itself (its architecture, model_args,
    pretrained_cfg and weights file), so it behaves exactly as timm saved it."""
    import timm

    name = cfg["architecture"]
    if not timm.is_model(name):
        raise ConfigError(f"{path / CONFIG_FILE} names timm architecture {name!r}, which timm {timm.__version__} "
                          "does not have; upgrade timm")
    extra = {} if strict else {"pretrained_strict": False}
    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True, **extra, **overrides)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(f"{path}: its weights need arbitrary Python objects to unpickle, so they were "
                                    "not loaded; save them as model.safetensors") from None
    except RuntimeError as e:  # timm's words for missing or mismatched weights
        hint = ", or pass strict=False to skip missing keys" if strict else ""
        raise CheckpointMismatchError(f"timm could not load the weights in {path} into {name} ({_first_line(e)}); "
                                      f"check the folder's weights and {CONFIG_FILE}{hint}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"timm could not build {name} from {path / CONFIG_FILE} ({_first_line(e)}); check its "
                          "model_args and the keyword arguments passed to zoo.load") from None
    return _finish(model, {**cfg, "arch": f"timm:{name}"}, str(path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _card_beside(path: Path, arch: str | None) -> dict[str, Any] | None:
    """The zoo card in the config.json next to a weights file; a foreign config there is ignored when
    `arch=` says what the weights are, and refused when nothing does."""
    if not (path.parent / CONFIG_FILE).is_file():
        return None
    try:
        cfg = read_config(path.parent)
    except ConfigError:
        if arch is not None:
            return None
        raise
    if isinstance(cfg, dict) and "arch" in cfg:
        return cfg
    if arch is not None:
        return None
    how = f", or load the folder with zoo.load({str(path.parent)!r}) (timm builds it)" if is_timm_config(cfg) else ""
    raise ConfigError(f"{path} sits beside a {CONFIG_FILE} that is not a zoo card; pass arch=..., e.g. "
                      f"zoo.load({str(path)!r}, arch='vit_base_patch16_224'){how}")


def _load_file(path: Path, arch: str | None, overrides: dict[str, Any], strict: bool) -> nn.Module:
    card = None
    if path.suffix == ".safetensors":
        card = _safetensors_card(path) or _card_beside(path, arch)
    elif path.suffix not in PICKLE_SUFFIXES:
        raise ZooError(f"{path}: unknown weights format; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    ckpt = read_checkpoint(path)
    if _is_official_dit(ckpt):  # facebookresearch/DiT's format: converted (its `ema` weights first)
        from zoo.convert import dit_model

        model = dit_model(ckpt, arch=split_name(arch)[0] if arch else None)
        return _finish(model, {"arch": model.zoo_arch, "args": model.zoo_args, "format": "dit"}, str(path))
    if is_official_flame(ckpt):  # MIV-XJTU/FLAME's training checkpoint: the image side converted, the LLM dropped
        model = flame_model(ckpt, arch=split_name(arch)[0] if arch else None, lm=overrides.get("lm"))
        return _finish(model, {"arch": model.zoo_arch, "args": model.zoo_args, "format": "flame"}, str(path))
    if arch is not None:
        card = {**(card or {}), "arch": split_name(arch)[0]}
    if card is None:
        raise ConfigError(
            f"{path} does not say which architecture it holds; pass arch=..., e.g. "
            f"zoo.load({str(path)!r}, arch='vit_base_patch16_224')"
        )
    model = _build_from_card(card, overrides)
    sd = fit_state_dict(unwrap(ckpt) if isinstance(ckpt, dict) else _not_a_state_dict(path, ckpt), model)
    load_checked(model, sd, str(path), strict=strict)
    return _finish(model, card, str(path))


def _is_official_dit(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and any(isinstance(d, dict) and "x_embedder.proj.weight" in d
                                          for d in (ckpt, ckpt.get("ema"), ckpt.get("model")))


def _load_hf(repo: str, overrides: dict[str, Any], strict: bool) -> nn.Module:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        try:
            cfg_path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision or None))
        except EntryNotFoundError:  # no config.json at the top: a diffusers pipeline repo (model_index.json)?
            hf_hub_download(repo_id, DIFFUSERS_PIPELINE_FILE, revision=revision or None)
            return _load_diffusers(repo_id, overrides, revision=revision or None, pipeline=True)
        card = json.loads(cfg_path.read_text())
        if "architecture" in card and "arch" not in card:  # a timm-format repo: let timm read it
            import timm

            return _finish(timm.create_model(f"hf-hub:{repo}", pretrained=True, **overrides), card, f"hf-hub:{repo}")
        if "_class_name" in card and "arch" not in card:  # one diffusers model
            return _load_diffusers(repo_id, overrides, revision=revision or None, pipeline=False)
        if _lm.is_transformers_config(card):  # a transformers model repo: a causal LM
            return _load_lm(repo_id, overrides, f"hf-hub:{repo}", revision=revision or None)
        weights = Path(hf_hub_download(repo_id, WEIGHTS_FILE, revision=revision or None))
    except Exception as e:
        if isinstance(e, ZooError):
            raise
        raise DownloadError(f"hf-hub:{repo}: cannot get {CONFIG_FILE}/{WEIGHTS_FILE} ({type(e).__name__}: {e})") from None
    model = _build_from_card(card, overrides)
    load_checked(model, fit_state_dict(read_state_dict(weights), model), f"hf-hub:{repo}", strict=strict)
    if _lm.is_lm(model):  # a zoo LM's tokenizer, published beside its weights
        tok = Path(hf_hub_download(repo_id, _lm.TOKENIZER_FILE, revision=revision or None)).parent
        hf_hub_download(repo_id, "tokenizer_config.json", revision=revision or None)
        model.tokenizer = _lm.load_tokenizer(tok)
    return _finish(model, card, f"hf-hub:{repo}")


def _load_diffusers(source: str | Path, overrides: dict[str, Any], *, revision: str | None = None,
                    pipeline: bool) -> nn.Module:
    """A diffusers DiT (a model folder or repo, or a pipeline's `transformer`) as a zoo DiT; a latent one's
    card names the pipeline's own VAE (`load_vae`)."""
    import diffusers

    from zoo.models.dit import as_zoo_dit

    where = f"hf-hub:{source}" if not Path(str(source)).exists() else str(source)
    if overrides:
        raise ConfigError(f"{where}: a diffusers model loads as saved; publish it (zoo.publish) to change "
                          f"{', '.join(overrides)}")
    try:  # Transformer2DModel maps legacy DiT configs (facebook/DiT-XL-2-256) onto DiTTransformer2DModel
        model = diffusers.Transformer2DModel.from_pretrained(str(source), subfolder="transformer" if pipeline else None,
                                                             revision=revision)
    except (OSError, ValueError) as e:
        raise DownloadError(f"{where}: diffusers could not load its transformer ({_first_line(e)})") from None
    vae = (f"{source}:vae" if revision is None else f"{source}@{revision}:vae") if pipeline else None
    model = as_zoo_dit(model, vae=vae)  # a pipeline's latents decode with its own VAE
    return _finish(model, {"arch": model.zoo_arch, "args": model.zoo_args, "format": "diffusers"}, where)


def load_vae(spec: str) -> nn.Module:
    """The VAE of a latent diffusion model (its card's `latent.vae`): a diffusers repo id or folder, with
    `:SUBFOLDER` for a pipeline's (`facebook/DiT-XL-2-256:vae`), frozen, eval mode."""
    from diffusers import AutoencoderKL

    source, _, sub = spec.rpartition(":") if ":" in spec.split("/")[-1] else (spec, "", "")
    repo, _, revision = source.partition("@")
    try:
        vae = AutoencoderKL.from_pretrained(repo, subfolder=sub or None, revision=revision or None)
    except (OSError, ValueError) as e:
        raise DownloadError(f"VAE {spec}: diffusers could not load it ({_first_line(e)})") from None
    return vae.requires_grad_(False).eval()


def _load_timm(name: str, overrides: dict[str, Any]) -> nn.Module:
    import timm

    pretrained = overrides.pop("pretrained", True)
    if not timm.list_models(split_name(name)[0]) and not name.startswith("hf-hub:"):
        hint = close_matches(split_name(name)[0], timm.list_models())
        raise UnknownNameError(f"timm has no model {name!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else ""))
    try:
        model = timm.create_model(name, pretrained=pretrained, **overrides)
    except (RuntimeError, OSError) as e:
        raise DownloadError(f"timm:{name}: could not get pretrained weights ({str(e).splitlines()[0]})") from None
    return _finish(model, {"arch": f"timm:{name}"}, f"timm:{name}")


def _load_open_clip(name: str, overrides: dict[str, Any]) -> nn.Module:
    import open_clip

    arch, _, tag = name.partition("/")
    pretrained = overrides.pop("pretrained", tag or None)
    if arch not in open_clip.list_models() and not arch.startswith("hf-hub:"):
        hint = close_matches(arch, open_clip.list_models())
        raise UnknownNameError(f"open_clip has no model {arch!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else ""))
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ZooError(
            f"open_clip:{arch} needs a weights tag, e.g. open_clip:{arch}/{tags[0] if tags else 'TAG'} "
            f"(tags: {', '.join(tags) or 'none'}), or pretrained=False for random init"
        )
    try:
        model = open_clip.create_model(arch, pretrained=pretrained or None, **overrides)
    except (RuntimeError, OSError) as e:
        raise DownloadError(f"open_clip:{name}: could not get pretrained weights ({str(e).splitlines()[0]})") from None
    return _finish(model, {"arch": f"open_clip:{arch}", "tag": pretrained}, f"open_clip:{name}")


def load(name: str | os.PathLike, *, arch: str | None = None, strict: bool = True, sha256: str | None = None, **kwargs: Any) -> nn.Module:
    """A pretrained model by name, path, pinned URL, `hf-hub:`, `timm:` or `open_clip:` id, in eval mode.

    `arch=` names the architecture of a bare weights file (or of a folder timm wrote, to load its weights
    into a zoo architecture; without it timm builds that folder); other keyword arguments override the
    architecture's (e.g. `num_classes=10`, `global_pool='avg'`).
    """
    name = os.fspath(name)
    if NAME_RE.match(name) and (store_dir() / name / CONFIG_FILE).is_file():  # a store name, never a path
        return _load_dir(store_dir() / name, kwargs, strict)
    if name.startswith("hf-hub:"):
        return _load_hf(name.removeprefix("hf-hub:"), kwargs, strict)
    if name.startswith("timm:"):
        return _load_timm(name.removeprefix("timm:"), kwargs)
    if name.startswith("open_clip:"):
        return _load_open_clip(name.removeprefix("open_clip:"), kwargs)
    if name.startswith(("http://", "https://")):
        path = download(name, sha256)
        return _load_file(path, arch, kwargs, strict)
    if (entry := _pretrained.find(name)) is not None:
        return load_entry(entry, arch=arch, strict=strict, **kwargs)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_dir(path, kwargs, strict, arch)
    if path.is_file():
        return _load_file(path, arch, kwargs, strict)
    raise UnknownNameError(_unknown_message(name))


# -- the pretrained table: fetch, pin, convert -----------------------------------------------------
def entry_file(entry: _pretrained.PretrainedEntry, *, download_missing: bool = True) -> Path | None:
    """The release file of a table entry on this machine, fetched when missing (`download_missing`), else None;
    not yet verified (`verify_entry_file` hashes it once)."""
    if entry.is_manual:
        raise ZooError(manual_message(entry))
    if entry.source.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo = entry.source.removeprefix("hf-hub:")
        if not download_missing:
            found = try_to_load_from_cache(repo, entry.file, revision=entry.revision)
            return Path(found) if isinstance(found, str) else None
        try:
            return Path(hf_hub_download(repo, entry.file, revision=entry.revision))
        except Exception as e:  # huggingface_hub's many offline/HTTP/missing-file errors
            raise DownloadError(f"{entry.name}: cannot get {entry.location} ({type(e).__name__}: {_first_line(e)}); "
                                "check the network, or download the file and zoo.load it by path") from None
    if entry.source.startswith(("http://", "https://")):
        # one cache folder per entry, locked or not yet: the file a first download recorded is the one reused
        folder = download_folder(entry.source, entry.sha256)
        if not download_missing:
            cached = folder / download_name(entry.source)
            return cached if cached.is_file() else None
        return download(entry.source, cache_dir=folder, unpinned=True)
    path = Path(entry.source).expanduser()
    if not path.exists():
        raise ZooError(f"{entry.name}: its source {path} does not exist")
    return path


def manual_message(entry: _pretrained.PretrainedEntry) -> str:
    """What to do for a release zoo cannot fetch: where to get the file, and the one command that converts it."""
    where, convert = entry.manual["where"], entry.manual["convert"]
    return (f"{entry.name} cannot be downloaded by zoo: get the file from {where}, then run `{convert}` "
            f"(zoo.load({entry.name!r}) then finds it in the zoo store)")


def verify_entry_file(entry: _pretrained.PretrainedEntry, path: Path, *, update: bool = False) -> tuple[str, str]:
    """Check a release file against the entry's sha256 or the lock file's record; an unpinned file's first use (or
    `update=True`) records it. Returns (sha256, what it was held to: 'pinned', 'locked' or 'recorded')."""
    actual = sha256_file(path)
    ours = path.is_relative_to(zoo_home() / "downloads")  # zoo's own download cache: a refused file is removed
    if entry.sha256:
        if actual != entry.sha256:
            if ours:
                path.unlink()
            raise ChecksumError(_lock.mismatch_message(
                entry.name, path, actual, entry.sha256, "zoo's pretrained table",
                "it was removed" if ours else "delete the file to download it again"))
        return actual, "pinned"
    lock_file = _lock.lock_path()
    rec = None if update else _lock.lookup(entry.name, entry.location, lock_file)
    if rec is not None:
        if actual != rec.sha256:
            if ours:
                path.unlink()
            raise ChecksumError(_lock.mismatch_message(
                entry.name, path, actual, rec.sha256, str(lock_file),
                ("it was removed" if ours else "delete it to download it again")
                + f"; if the release changed on purpose, accept it with `zoo lock {entry.name} --update`"))
        return actual, "locked"
    _lock.record(entry.name, entry.location, actual, path.stat().st_size, lock_file)
    log.info("%s: recorded sha256 %s in %s; later loads are verified against it", entry.name, actual, lock_file)
    return actual, "recorded"


def _convert_vit(ckpt: Any, entry: _pretrained.PretrainedEntry, args: dict[str, Any], strict: bool) -> nn.Module:
    model = factory.create_model(entry.build_arch, **args)
    sd = fit_state_dict(unwrap(ckpt), model)
    if args.get("num_classes"):  # a new classifier (fine-tuning): the release has none of this size, it starts fresh
        fresh = {k: v for k, v in model.state_dict().items()
                 if k.startswith(("head.", "fc_norm.")) and (k not in sd or sd[k].shape != v.shape)}
        if fresh:
            log.info("%s: new %s initialised randomly (num_classes=%d)", entry.name, ", ".join(fresh), args["num_classes"])
        sd.update(fresh)
    load_checked(model, sd, entry.location, strict=strict)
    return model


def _convert_timm(ckpt: Any, entry: _pretrained.PretrainedEntry, args: dict[str, Any], strict: bool) -> nn.Module:
    import timm

    model = timm.create_model(entry.build_arch, pretrained=False, **args)
    load_checked(model, unwrap(ckpt), entry.location, strict=strict)
    return model


def _convert_open_clip_visual(ckpt: Any, entry: _pretrained.PretrainedEntry, args: dict[str, Any],
                              strict: bool) -> nn.Module:
    sd = {k.removeprefix("visual."): v for k, v in unwrap(ckpt).items() if k.startswith("visual.")}
    if not sd:
        raise CheckpointMismatchError(f"{entry.location}: no visual.* keys; it is not an open_clip CLIP state dict")
    return _convert_vit(sd, entry, args, strict)


def _no_args(fn):
    """A converter that reads every shape from the checkpoint's tensors: arguments would contradict them."""
    def convert(ckpt: Any, entry: _pretrained.PretrainedEntry, args: dict[str, Any], strict: bool) -> nn.Module:
        if args:
            raise ConfigError(f"{entry.name}: the {entry.converter} converter reads the architecture from the "
                              f"checkpoint; drop {', '.join(args)}")
        return fn(ckpt, entry)
    return convert


def _convert_poa(ckpt: Any, entry: _pretrained.PretrainedEntry, args: dict[str, Any], strict: bool) -> nn.Module:
    from zoo.convert import poa_model

    if "width" not in args or "depth" not in args:
        raise ConfigError(f"{entry.name}: the poa converter needs args width and depth (the sub-network to extract)")
    return poa_model(unwrap(ckpt), args["width"], args["depth"], arch=entry.build_arch)


def _converters() -> dict[str, Any]:
    from zoo.convert import dit_model, unip_model

    return {
        "timm_vit": _convert_vit,
        "open_clip": _convert_vit,  # a zoo CLIP's state dict is open_clip's, key for key
        "open_clip_visual": _convert_open_clip_visual,
        "timm": _convert_timm,
        "dit": _no_args(lambda ckpt, e: dit_model(ckpt, arch=e.build_arch)),
        "unip": _no_args(lambda ckpt, e: unip_model(ckpt, arch=e.build_arch)),
        "flame": _no_args(lambda ckpt, e: flame_model(ckpt, arch=e.build_arch)),
        "poa": _convert_poa,
    }


def load_entry(entry: _pretrained.PretrainedEntry, *, arch: str | None = None, strict: bool = True,
               **overrides: Any) -> nn.Module:
    """A pretrained-table entry as a model: its file fetched and held to its sha256 (pinned or locked), converted
    from the release's layout, with the release's preprocessing and provenance in `model.zoo_card`."""
    if entry.registered:  # zoo.register_weights: the source loads as zoo.load loads it
        target = f"{entry.source}#sha256={entry.sha256}" if entry.sha256 else entry.source
        return load(target, **({"arch": arch} if arch else {}), strict=strict, **{**entry.args, **overrides})
    if entry.is_manual:
        raise UnknownNameError(manual_message(entry))
    if arch is not None:
        raise ConfigError(f"{entry.name} names its own architecture ({entry.build_arch}); drop arch=")
    path = entry_file(entry)
    digest, held = verify_entry_file(entry, path)
    model = _converters()[entry.converter](read_checkpoint(path), entry, {**entry.args, **overrides}, strict)
    pcfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pcfg, dict):
        pcfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in entry.preprocessing.items()})
    arch_name = getattr(model, "zoo_arch", None)
    card = {"arch": arch_name or f"timm:{entry.build_arch}", "args": dict(getattr(model, "zoo_args", {})),
            **entry.card(), "sha256": digest, "pin": held}
    return _finish(model, card, entry.location)


# -- the public entry points: architectures (zoo.factory) or weights (above) ------------------------
def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A registered architecture, randomly initialised; `pretrained=True` is `load(name, **kwargs)`.

    `name` may carry a weights tag (`vit_tiny_patch4_32.mae_fractal`); the tag is ignored unless
    `pretrained=True`. Keyword arguments override the architecture's defaults (e.g. `num_classes=10`).
    """
    if pretrained:
        return load(name, **kwargs)
    return factory.create_model(name, **kwargs)


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered architecture names matching a wildcard; with `pretrained=True`, names that have weights."""
    return pretrained_names(pattern) if pretrained else factory.list_models(pattern)


_lm.LOADERS[:] = [load]  # models load a frozen LM by name (FLAME's text side) without importing the hub
