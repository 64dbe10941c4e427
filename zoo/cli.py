"""The `zoo` command: list and inspect models, convert checkpoints, extract elastic sub-networks, analyse attention."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from zoo.errors import ConfigError, ZooError


def _format_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def _format_eval(results: dict[str, Any]) -> str:
    """`{'digits': {'knn_top1': 91.2}}` -> 'digits knn_top1 91.2'."""
    parts = []
    for task, metrics in (results or {}).items():
        if isinstance(metrics, dict):
            parts += [f"{task} {k} {v:.4g}" if isinstance(v, float) else f"{task} {k} {v}" for k, v in metrics.items()]
        else:
            parts.append(f"{task} {metrics}")
    return ", ".join(parts) or "-"


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], out=None) -> None:
    """A plain aligned text table."""
    out = out or sys.stdout
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def model_rows(pattern: str | None = None, pretrained: bool = False) -> list[dict[str, Any]]:
    """One row per name `zoo list` shows: published models, the pretrained table, architectures."""
    from zoo.factory import count_params, list_models
    from zoo.hub import read_card, store_names
    from zoo.pretrained import entries

    rows = []
    for name in store_names(pattern):
        card = read_card(name)
        prov = card.get("provenance", {})
        rows.append(
            dict(name=name, params=_format_params(card.get("params")), source="store", pin="sha256 (card)",
                 recipe=prov.get("recipe") or "-", eval=_format_eval(card.get("eval", {})), elastic=card.get("elastic"))
        )
    rows.sort(key=_family_key)
    locked = _locked_names()
    for entry in entries(pattern):
        rows.append(dict(name=entry.name, params=_entry_params(entry), source=entry.location, pin=_pin_label(entry, locked),
                         recipe="-", eval=_format_reported(entry.reported), elastic=None))
    if not pretrained:
        for arch in list_models(pattern):
            rows.append(dict(name=arch, params=_format_params(count_params(arch)), source="arch (random init)", pin="-",
                             recipe="-", eval="-", elastic=None))
    return rows


def _format_reported(reported: dict[str, Any]) -> str:
    from zoo.pretrained import format_reported

    return f"reported: {format_reported(reported)}" if reported else "-"


def _locked_names() -> set[str]:
    from zoo.lock import read

    try:
        return set(read())
    except ZooError:
        return set()  # `zoo lock --check` reports a broken lock file; listing still works


def _pin_label(entry: Any, locked: set[str]) -> str:
    """How a table entry's file is held: by the table's sha256, by the lock file, not yet, or by hand."""
    if entry.is_manual:
        return "manual"
    if entry.pinned:
        return "sha256"
    return "locked" if entry.name in locked else "unpinned"


def _entry_params(entry: Any) -> str:
    from zoo.factory import count_params
    from zoo.registry import MODELS

    if entry.build_arch not in MODELS or entry.converter in ("timm", "auto"):
        return "-"
    try:
        return _format_params(count_params(entry.build_arch, **entry.args))
    except (TypeError, ValueError, ZooError):  # an entry whose args only its converter understands
        return "-"


def cmd_list(args: argparse.Namespace) -> int:
    rows = model_rows(args.pattern, args.pretrained)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    else:
        shown = [{**r, "recipe": f"{r['recipe']} ({label})"} if (label := _elastic_label(r["elastic"])) else r
                 for r in rows]
        columns = ["name", "params", "source", "pin", "recipe", "eval"] if args.pretrained else \
            ["name", "params", "source", "recipe", "eval"]
        print_table(shown, columns)
        if args.pretrained:
            print("\npin: sha256 = verified against the hash in zoo's table; locked = verified against your zoo.lock; "
                  "unpinned = its first download is recorded in zoo.lock (`zoo lock NAME` does it now); "
                  "manual = download by hand, then run the `zoo convert` command `zoo info NAME` shows", file=sys.stderr)
    return 0


def _elastic_label(elastic: dict[str, Any] | None) -> str | None:
    """What `zoo list` adds to an elastic model's recipe: 'intact w128 d6' or 'w64 d3 of w128 d6'."""
    if not isinstance(elastic, dict) or "width" not in elastic or "depth" not in elastic:
        return None
    size = f"w{elastic['width']} d{elastic['depth']}"
    if "parent_width" not in elastic:  # the intact model, its card holding the trained space
        return f"intact {size}"
    label = f"{size} of w{elastic['parent_width']} d{elastic.get('parent_depth', '?')}"
    return label + (", untrained" if elastic.get("trained") is False else "")


def _family_key(row: dict[str, Any]) -> tuple:
    """Sort key of a store row: by name, except that an elastic model's extracted sizes follow their intact
    model, smallest first (plain name order would put e.g. NAME2 between NAME and NAME_w64_d3)."""
    from zoo.hub import NAME_RE

    elastic = row.get("elastic")
    if not isinstance(elastic, dict) or "parent_width" not in elastic:
        return (row["name"], 0, 0, 0, row["name"])
    parent = str(elastic.get("parent") or "")  # a store name, or a folder / run directory: then the name's stem
    family = parent if NAME_RE.match(parent) else re.sub(r"_w\d+_d\d+$", "", row["name"])
    return (family, 1, elastic.get("width") or 0, elastic.get("depth") or 0, row["name"])


def info_record(name: str) -> dict[str, Any]:
    """What `zoo info` shows: the card of a published model (by name, folder or weights file; a timm folder's
    config), or an architecture's definition."""
    from zoo.factory import count_params, split_name
    from zoo.hub import CONFIG_FILE, NAME_RE, describe, read_card, store_dir
    from zoo.pretrained import find
    from zoo.registry import MODELS

    if NAME_RE.match(name) and (store_dir() / name / CONFIG_FILE).is_file():
        return read_card(name)
    if (entry := find(name)) is not None:
        return entry_record(entry)
    if Path(name).expanduser().exists():
        return describe(Path(name).expanduser())
    if "/" in name or name.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt")):
        raise ZooError(f"no such model folder or weights file: {name}")
    arch, _ = split_name(name)
    entry = MODELS.get(arch)  # raises with suggestions
    import torch

    with torch.device("meta"):
        model = entry.factory()
    return {
        "name": arch,
        "arch": arch,
        "family": entry.meta.get("family"),
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "args": entry.meta.get("defaults", {}),
        "params": count_params(arch),
        "pretrained_cfg": {
            **{k: v for k, v in getattr(model, "pretrained_cfg", {}).items()
               if k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
            "num_classes": getattr(model, "num_classes", None),
        },
        "weights": "none (random init); published weights: " + (", ".join(n for n in _published_for(arch)) or "none"),
    }


def entry_record(entry: Any) -> dict[str, Any]:
    """What `zoo info` shows of a pretrained-table entry: its fields, how its file is pinned, and for a manual one
    where to get the file and the command that converts it."""
    from dataclasses import asdict

    from zoo.lock import lock_path, read

    rec = {k: v for k, v in asdict(entry).items() if v not in (None, {}, False)
           and (k != "revision" or entry.source.startswith("hf-hub:"))}
    rec["location"] = entry.location
    locked = read().get(entry.name)
    rec["pin"] = ("manual" if entry.is_manual else "sha256 in zoo's table" if entry.pinned
                  else f"locked in {lock_path()}: {locked.sha256}" if locked
                  else f"unpinned: its first download is recorded in {lock_path()}")
    return rec


def _published_for(arch: str) -> list[str]:
    from zoo.hub import pretrained_names

    return [n for n in pretrained_names() if n.split(".")[0] == arch]


def kernels_record() -> dict[str, Any]:
    """Which attention backends and custom kernels run on this machine's devices, and why not the others."""
    import importlib.metadata

    import torch

    from zoo.kernels.attention import available_backends, choose_backend
    from zoo.kernels.triton_support import triton_unavailable

    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    rec: dict[str, Any] = {"torch": torch.__version__}
    for pkg in ("xformers", "triton"):
        try:
            rec[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            rec[pkg] = "not installed"
    for dev in devices:
        probe = torch.empty(1, device=dev)
        try:
            default = choose_backend(probe)
        except ZooError as e:
            default = f"error: {e}"
        rec[f"attention on {dev} (default: {default})"] = available_backends(dev)
    rec["attention_kl"] = {dev: "fused Triton kernel" if (why := triton_unavailable(dev)) is None
                           else f"PyTorch reference (fused Triton kernel: {why})" for dev in devices}
    return rec


def cmd_info(args: argparse.Namespace) -> int:
    if args.kernels:
        rec = kernels_record()
    elif not args.name:
        raise ZooError("zoo info needs a model NAME, or --kernels for the attention backends")
    else:
        rec = info_record(args.name)
    if args.json:
        print(json.dumps(rec, indent=2, default=str))
        return 0
    for key, value in rec.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from zoo.convert import fit_state_dict, load_checked
    from zoo.factory import create_model
    from zoo.hub import read_state_dict, read_untrusted_pickle

    src = Path(args.src)
    if args.source_format == "poa":
        if args.width is None or args.depth is None:
            raise ConfigError("--from poa needs the sub-network's --width and --depth, e.g. --width 384 --depth 12 "
                              "for ViT-S, 768 12 for ViT-B, 1024 24 for ViT-L")
    elif args.width is not None or args.depth is not None:
        raise ConfigError("--width/--depth choose a sub-network of an elastic checkpoint; add --from poa")
    elif args.last_heads is not None and args.source_format != "unip":
        raise ConfigError("--last-heads sets a UNIP student's last-block head count; add --from unip")
    elif args.arch is None and args.source_format is None:
        raise ConfigError("zoo convert needs --arch ARCH, the zoo architecture SRC holds (e.g. --arch "
                          "vit_base_patch16_224), or --from poa|unip|dit|flame for an official POA, UNIP, DiT or "
                          "FLAME checkpoint")
    if args.source_format == "dit":  # the whole checkpoint: dit_model takes its `ema` weights first
        from zoo.hub import read_checkpoint
        from zoo.convert import dit_model

        model = dit_model(read_checkpoint(src, trust_pickle=args.trust_pickle), arch=args.arch)
        card = {"provenance": {"converted_from": src.name, "method": "dit"}}
        return _write_converted(model, card, args)
    if args.source_format == "flame":  # the whole training checkpoint: its state_dict, the LLM dropped
        from zoo.hub import read_checkpoint
        from zoo.convert import flame_model

        model = flame_model(read_checkpoint(src, trust_pickle=args.trust_pickle), arch=args.arch, lm=args.lm)
        card = {"provenance": {"converted_from": src.name, "method": "flame"}}
        return _write_converted(model, card, args)
    sd = read_untrusted_pickle(src) if args.trust_pickle else read_state_dict(src)
    if args.source_format == "poa":
        from zoo.convert import poa_model

        model = poa_model(sd, args.width, args.depth, arch=args.arch, head_dim=args.head_dim)
        card = {"provenance": {"converted_from": src.name, "method": "poa"}, "elastic": model.elastic}
    elif args.source_format == "unip":
        from zoo.convert import UNIP_LAST_HEADS, unip_model

        model = unip_model(sd, last_heads=args.last_heads or UNIP_LAST_HEADS, arch=args.arch)
        card = {"provenance": {"converted_from": src.name, "method": "unip"}, "unip": model.unip}
    else:
        model = create_model(args.arch)
        load_checked(model, fit_state_dict(sd, model), str(src), strict=not args.non_strict)
        card = {"provenance": {"converted_from": src.name}}
    return _write_converted(model, card, args)


def _write_converted(model: Any, card: dict[str, Any], args: argparse.Namespace) -> int:
    import safetensors.torch

    from zoo.hub import make_card, publish

    if args.out.endswith(".safetensors"):
        meta = make_card(model, Path(args.out).stem, card)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        tmp = Path(args.out + ".part")
        safetensors.torch.save_file(tensors, tmp, metadata={"zoo_card": json.dumps(meta)})
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    else:
        print(f"published {publish(model, args.out, card, overwrite=args.overwrite)}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    """Record (or with --check, verify) the sha256 of pretrained-table files in the lock file."""
    import os

    from zoo import lock, pretrained
    from zoo.hub import entry_file, manual_message, verify_entry_file

    if args.file:
        os.environ["ZOO_LOCK"] = str(Path(args.file).resolve())
    if args.check:
        if args.names or args.update:
            raise ConfigError("zoo lock --check verifies the whole lock file; give no NAME and no --update")
        return _lock_check()
    if not args.names:
        raise ConfigError("zoo lock needs NAME... (the names of `zoo list --pretrained`), or --check to verify the "
                          "lock file")
    path = lock.lock_path()
    for name in args.names:
        entry = pretrained.get(name)
        if entry.is_manual:
            raise ZooError(manual_message(entry))
        if entry.registered:
            raise ConfigError(f"{name} was registered with zoo.register_weights in this process; pin it there with "
                              "sha256= instead")
        file = entry_file(entry)
        digest, held = verify_entry_file(entry, file, update=args.update)
        if held == "pinned":  # the table pins it already; the lock lists it too, for `zoo lock --check`
            lock.record(name, entry.location, digest, file.stat().st_size, path)
        print(f"{name}  sha256 {digest}  ({held}{'' if held == 'locked' else ' in ' + str(path)})")
    return 0


def _lock_check() -> int:
    from zoo import lock, pretrained
    from zoo.hub import entry_file, sha256_file

    path = lock.lock_path()
    records = lock.read(path)
    if not records:
        print(f"{path}: no weights locked yet (`zoo lock NAME...` records them)")
        return 0
    rows, bad = [], 0
    for name, rec in records.items():
        entry = pretrained.find(name)
        if entry is None:
            status = "not in the pretrained table (remove it, or upgrade zoo)"
        elif rec.source != entry.location:
            status = f"source is now {entry.location}: `zoo lock {name} --update`"
        elif entry.sha256 and entry.sha256 != rec.sha256:
            status = f"differs from the sha256 zoo's table pins ({entry.sha256})"
        else:
            file = entry_file(entry, download_missing=False)
            actual = sha256_file(file) if file is not None else None
            status = ("not downloaded here" if file is None else "ok" if actual == rec.sha256
                      else f"MISMATCH: {file} has sha256 {actual}")
        bad += status not in ("ok", "not downloaded here")
        rows.append({"name": name, "sha256": rec.sha256[:16] + "...", "recorded": rec.recorded or "-", "status": status})
    print(f"{path}:")
    print_table(rows, ["name", "sha256", "recorded", "status"])
    print(f"{len(rows) - bad} of {len(rows)} locked files check out" + (f"; {bad} do not" if bad else ""))
    return 1 if bad else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from zoo.hub import read_card
    from zoo.tools.extract import extract_and_publish

    path = extract_and_publish(args.source, args.width, args.depth, name=args.name, root=args.root,
                               overwrite=args.overwrite)
    elastic = read_card(path)["elastic"]
    print(f"published {path.name} (w{args.width} d{args.depth}, blocks {elastic['block_ids']} of {elastic['parent']}) "
          f"-> {path}")
    return 0


def cmd_shards_make_builtin(args: argparse.Namespace) -> int:
    from itertools import chain

    from zoo.data.builtin import generate
    from zoo.data.writer import write_shards
    from zoo.registry import DATASETS

    for flag, value in (("--n", args.n), ("--maxcount", args.maxcount)):
        if value < 1:
            what = "samples per shard" if flag == "--maxcount" else "samples"
            raise ZooError(f"{flag} {value}: give a positive number of {what}, e.g. {flag} 1000")
    meta = DATASETS.get(args.name).meta
    n = min(args.n, meta.get("max_samples", {}).get(args.split, args.n))
    info = {"name": args.name, "split": args.split, "seed": args.seed, "size": args.size,
            "num_classes": meta.get("num_classes"), "source": "zoo.data.builtin"}
    if meta.get("classes"):
        info["classes"] = list(meta["classes"])
    try:  # the dataset checks seed and size (when called or at its first sample)
        samples = iter(generate(args.name, n, seed=args.seed, size=args.size, split=args.split))
        first = next(samples)
    except ValueError as e:
        raise ZooError(f"{e}; fix --seed or --size") from None
    shards = write_shards(chain([first], samples), args.out, maxcount=args.maxcount, total=n, info=info,
                          desc=f"{args.name}/{args.split}")
    print(f"wrote {n} {args.name} samples in {len(shards)} shard(s) to {args.out}/{{00000..{len(shards) - 1:05d}}}.tar")
    return 0


def cmd_shards_from_folder(args: argparse.Namespace) -> int:
    from collections import Counter

    from zoo.data.writer import folder_samples, write_shards

    skipped: Counter = Counter()
    classes, samples, n = folder_samples(args.src, skip_hidden=args.skip_hidden, other_as_png=args.other_as_png,
                                         skipped=skipped)
    info = {"name": Path(args.src).name, "classes": classes, "num_classes": len(classes), "source": str(args.src)}
    shards = write_shards(samples, args.out, maxcount=args.maxcount, total=n, info=info, desc="from-folder")
    written = n - skipped["unreadable_image"]
    print(f"wrote {written} samples of {len(classes)} classes in {len(shards)} shard(s) to {args.out}")
    if skipped:
        print("skipped: " + ", ".join(f"{k} {r}" for r, k in skipped.most_common()))
    return 0


def cmd_shards_check(args: argparse.Namespace) -> int:
    from zoo.data.reader import LOST_REASONS, check_shards, counts_samples
    from zoo.data.shards import REMOTE_PREFIXES

    rows = check_shards(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        folders = {str(Path(r["shard"]).parent) for r in rows}
        local = not any(r["shard"].startswith(REMOTE_PREFIXES) for r in rows)
        short = local and len(folders) == 1  # one folder: name it once, list the shards by file name

        def order(reason: str) -> tuple[int, str]:  # lost samples first, then undecodable, then shard-level
            return (0 if reason in LOST_REASONS else 1 if counts_samples(reason) else 2), reason

        def status(r: dict[str, Any]) -> str:
            if r["mismatch"]:
                return f"MISMATCH: read {r['read']} + lost {r['lost']}"
            return "damaged" if r["lost"] else "problems" if r["skipped"] else "ok"

        table = [
            {"shard": Path(r["shard"]).name if short else r["shard"], "samples": r["samples"], "lost": r["lost"],
             "recorded": "-" if r["recorded"] is None else r["recorded"], "status": status(r),
             "fields": ",".join(r["fields"]) or "-",
             "skipped": ", ".join(f"{r['skipped'][k]} {k}" for k in sorted(r["skipped"], key=order)) or "-"}
            for r in rows
        ]
        if short:
            print(f"shards in {folders.pop()}/")
        print_table(table, ["shard", "samples", "lost", "recorded", "status", "fields", "skipped"])
    bad = sum(sum(r["skipped"].values()) for r in rows)
    total = sum(r["samples"] for r in rows)
    lost = sum(r["lost"] for r in rows)
    mismatched = sum(r["mismatch"] for r in rows)
    print(f"{len(rows)} shard(s), {total} good sample(s), {lost} lost, {bad} problem(s)"
          + (f", {mismatched} shard(s) whose counts do not add up to their recorded size" if mismatched else ""),
          file=sys.stderr)
    return 1 if bad or mismatched else 0


def _model_for_eval(name: str, random_weights: bool = False):
    """A published model by name, or a registered architecture with random weights (said loudly)."""
    import zoo
    from zoo.errors import UnknownNameError
    from zoo.factory import split_name
    from zoo.registry import MODELS

    if random_weights and name.startswith(("timm:", "open_clip:")):
        print(f"note: evaluating {name} with RANDOM weights (--random-weights)", file=sys.stderr)
        return zoo.load(name, pretrained=False)
    try:
        if random_weights:
            raise UnknownNameError(name)
        return zoo.load(name)
    except UnknownNameError:
        if split_name(name)[0] not in MODELS:
            raise
        print(f"note: {name} has no published weights; evaluating it with RANDOM weights", file=sys.stderr)
        model = zoo.create_model(name).eval()
        model.zoo_source = f"{name} (random weights)"
        return model


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.eval.features import extract_features
    from zoo.eval.knn import knn_eval
    from zoo.eval.linear import linear_probe
    from zoo.hub import zoo_home

    model = _model_for_eval(args.model, args.random_weights)
    if not hasattr(model, "blocks"):
        variants = ["cls"]  # a CNN: its pooled output
    else:
        default = ["cls"] if args.protocol == "knn" else ["cls", "cls+avg", f"last{min(4, len(model.blocks))}"]
        variants = args.pooling or default
    cache = None if args.no_cache else zoo_home() / "features"
    kw = dict(variants=variants, batch_size=args.batch_size, num_workers=args.workers, cache_dir=cache,
              label_field=args.label_field)
    xtr, ytr = extract_features(model, args.train, desc="train features", **kw)
    xva, yva = extract_features(model, args.val, desc="val features", **kw)
    if args.protocol == "knn":
        res = knn_eval(xtr[variants[0]], ytr, xva[variants[0]], yva, ks=args.k, temperature=args.temperature)
        rows = [{"metric": k, "value": f"{v:.2f}"} for k, v in res.items()]
        record = {f"knn_{k}": round(v, 2) for k, v in res.items()}
    else:
        probe = linear_probe(xtr, ytr, xva, yva, epochs=args.epochs, seed=args.seed, solver=args.solver)
        res = probe.as_dict()
        knob = lambda r: f"wd={r['weight_decay']:g}" if "weight_decay" in r else f"lr={r['lr']:g}"  # noqa: E731
        rows = [{"metric": f"heldout {r['features']} {knob(r)}", "value": f"{r['heldout_top1']:.2f}"} for r in probe.grid]
        rows.append({"metric": f"VAL top1 ({probe.best['features']}, lr={probe.best['lr']:g})", "value": f"{probe.top1:.2f}"})
        record = {"linear_top1": round(probe.top1, 2)}
    return _finish_eval(args, rows, res, record, {"variants": variants})


def _finish_eval(args: argparse.Namespace, rows: list[dict[str, Any]], results: dict[str, Any],
                 record: dict[str, float], extra: dict[str, Any] | None = None) -> int:
    """Print the table, write --out JSON, and --record into the card: the tail every `zoo eval` shares."""
    print_table(rows, ["metric", "value"])
    if args.out:
        payload = {"model": args.model, "protocol": args.protocol, "train": getattr(args, "train", None),
                   "val": args.val, **(extra or {}), "results": results}
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str))
    if args.record:
        from zoo.hub import record_eval

        record_eval(args.model, args.task or Path(str(args.val)).parent.name, record)
        print(f"recorded in the card of {args.model}", file=sys.stderr)
    return 0


def _tokenizer_for(model, prompt: str | None = None) -> Any:
    """The model's own tokenizer (zoo CLIP models carry one; FLAME models one per `prompt` kind), else
    open_clip's for open_clip:ARCH[/TAG]."""
    if prompt is not None:
        if not callable(getattr(model, "text_tokenizer", None)):
            raise ZooError("--prompt is for FLAME models (a frozen LM reading prompts); this model has no prompts")
        return model.text_tokenizer(prompt)
    if callable(getattr(model, "tokenizer", None)):
        return model.tokenizer
    arch = str((getattr(model, "zoo_card", None) or {}).get("arch", ""))
    if not arch.startswith("open_clip:"):
        from zoo.errors import ZooError

        from zoo.eval.zeroshot import model_name

        raise ZooError(f"{model_name(model)} has no text tokenizer here; use an open_clip:ARCH/TAG model")
    import open_clip

    return open_clip.get_tokenizer(arch.removeprefix("open_clip:"))


def _classnames(args: argparse.Namespace) -> list[str]:
    """--classnames, else the class names in the shards' dataset.json (written by `zoo shards`)."""
    from zoo.data.shards import expand_sources
    from zoo.errors import ZooError

    if args.classnames:
        return list(args.classnames)
    first = expand_sources(args.val)[0][0]
    info_path = Path(first).parent / "dataset.json"
    if info_path.is_file():
        classes = json.loads(info_path.read_text()).get("classes")
        if classes:
            return [str(c) for c in classes]
    raise ZooError(f"no class names for {args.val}: pass --classnames NAME ... (one per label, in label order)")


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from zoo.eval.zeroshot import require_image_text, zero_shot_eval

    model = _model_for_eval(args.model, args.random_weights)
    require_image_text(model)
    classes = _classnames(args)
    res = zero_shot_eval(model, _tokenizer_for(model, args.prompt), args.val, classes, templates=tuple(args.template),
                         batch_size=args.batch_size, num_workers=args.workers)
    rows = [{"metric": k, "value": f"{v:.2f}"} for k, v in res.items()]
    return _finish_eval(args, rows, res, {f"zeroshot_{k}": round(v, 2) for k, v in res.items()}, {"classes": classes})


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from zoo.eval.retrieval import retrieval_eval
    from zoo.eval.zeroshot import require_image_text

    model = _model_for_eval(args.model, args.random_weights)
    require_image_text(model, "retrieval")
    res = retrieval_eval(model, _tokenizer_for(model, args.prompt), args.val, caption=tuple(args.caption),
                         batch_size=args.batch_size, num_workers=args.workers)
    rows = [{"metric": k, "value": f"{v:.2f}"} for k, v in res.items()]
    return _finish_eval(args, rows, res, {k: round(v, 2) for k, v in res.items()}, {"captions": args.caption})


def cmd_eval_dense(args: argparse.Namespace) -> int:
    from zoo.eval.dense import check_head, dense_finetune, dense_probe, extract_dense

    check_head(args.head)  # before any feature extraction or training
    if args.blocks != 1 and (args.head != "linear" or args.finetune):
        raise ZooError("--blocks concatenates blocks for the frozen linear head only; LL-FPN and --finetune read "
                       "the last block: drop --blocks")
    for flag, value in (("--layer-decay", args.layer_decay), ("--drop-path", args.drop_path)):
        if value is not None and not args.finetune:
            raise ZooError(f"{flag} applies to --finetune only: add --finetune or drop {flag}")
    model = _model_for_eval(args.model, args.random_weights)
    if args.finetune:
        res = dense_finetune(model, args.train, args.val, head=args.head, epochs=args.epochs,
                             lr=1e-4 if args.lr is None else args.lr,
                             layer_decay=0.85 if args.layer_decay is None else args.layer_decay,
                             drop_path=args.drop_path or 0.0, batch_size=args.batch_size, image_field=args.image_field,
                             seed=args.seed, num_workers=args.workers, max_samples=args.max_samples)
        how = f"finetune lr={res.best['lr']:g}, layer decay {res.best['layer_decay']:g}"
        rows = []
    else:
        kw = dict(blocks=args.blocks, norm=args.head == "linear", image_field=args.image_field,
                  batch_size=args.batch_size, num_workers=args.workers, max_samples=args.max_samples)
        xtr, ytr = extract_dense(model, args.train, **kw)
        xva, yva = extract_dense(model, args.val, **kw)
        res = dense_probe(xtr, ytr, xva, yva, head=args.head, lrs=None if args.lr is None else (args.lr,),
                          epochs=args.epochs, seed=args.seed)
        how = f"lr={res.best['lr']:g}"
        rows = [{"metric": f"heldout lr={r['lr']:g} mIoU", "value": f"{r['heldout_mIoU']:.2f}"} for r in res.grid]
    if args.head != "linear":
        how = f"{args.head}, {how}"
    rows += [{"metric": f"VAL {k} ({how})", "value": f"{v:.2f}"} for k, v in res.metrics.items()]
    rows += [{"metric": f"  IoU class {c}", "value": f"{v:.2f}"} for c, v in res.per_class_iou.items()]
    # the default protocol keeps its card keys; the others get their own: dense_llfpn_ft_thermal_mIoU
    prefix = "dense" + ("" if args.head == "linear" else f"_{args.head}") + ("_ft" if args.finetune else "")
    prefix += "" if args.image_field == "image" else f"_{args.image_field}"
    record = {f"{prefix}_{k}": round(v, 2) for k, v in res.metrics.items()}
    extra = {"blocks": args.blocks, "head": args.head, "finetune": args.finetune, "image_field": args.image_field}
    return _finish_eval(args, rows, res.as_dict(), record, extra)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from zoo.engine.trainer import pretrain

    res = pretrain(args.recipe, data=args.data, overrides=args.set or [], run_dir=args.run_dir,
                   resume=args.resume if args.resume is not None else False, overwrite=args.overwrite)
    last = res.metrics[-1] if res.metrics else {}
    print(f"run: {res.run_dir}  steps: {res.steps}  final loss: {last.get('loss', float('nan')):.4f}")
    if res.skipped:
        print("skipped samples: " + ", ".join(f"{n} {r}" for r, n in res.skipped.items()))
    for task, metrics in res.evals.items():
        print(f"final eval on {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    for name, path in res.published.items():
        print(f"published {name} -> {path}")
    return 0


def recipe_rows() -> list[dict[str, Any]]:
    """One row per registered method: its recipe YAMLs (the CPU one first), paper and summary."""
    from zoo.config import installed_recipes, load_config
    from zoo.registry import RECIPES

    by_method: dict[str, list[str]] = {}
    for name, path in installed_recipes().items():
        by_method.setdefault(load_config(path).method.name, []).append(name)
    rows = []
    for entry in RECIPES:
        cpu = entry.meta.get("cpu_recipe")
        names = sorted(by_method.get(entry.name, []), key=lambda n: (n != cpu, n))
        rows.append({"method": entry.name, "recipes": names, "cpu_recipe": cpu, "paper": entry.meta.get("paper", "-"),
                     "summary": entry.meta.get("description", "")})
    return rows


def cmd_recipes(args: argparse.Namespace) -> int:
    rows = recipe_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table([{**r, "recipes": ", ".join(r["recipes"]) or "-"} for r in rows], ["method", "recipes", "paper", "summary"])
    print("\nrun one on its built-in data: zoo pretrain RECIPE (e.g. zoo pretrain "
          f"{rows[0]['recipes'][0] if rows and rows[0]['recipes'] else 'RECIPE'})", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zoo.demo import run_demo

    run_demo(args.out, steps=args.steps, n_pretrain=args.n, seed=args.seed)
    return 0


def _skipped_line(skipped: dict[str, int]) -> str | None:
    return "skipped: " + ", ".join(f"{n} {r}" for r, n in skipped.items()) if skipped else None


def cmd_captions_score(args: argparse.Namespace) -> int:
    from zoo.tools.captions import score_shards

    model = _model_for_eval(args.model, args.random_weights)
    rec = score_shards(model, args.data, model_name=args.model, caption=args.caption, out=args.out,
                       batch_size=args.batch_size, maxcount=args.maxcount)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    pct = "  ".join(f"{k} {rec[k]:.4f}" for k in ("p5", "p25", "p50", "p75", "p95"))
    print(f"scored {rec['count']} pairs (caption {args.caption!r}): mean {rec['mean']:.4f}  std {rec['std']:.4f}  "
          f"{pct}  min {rec['min']:.4f}  max {rec['max']:.4f}")
    if rec["missing_caption"]:
        print(f"{rec['missing_caption']} sample(s) have no caption {args.caption!r}: not scored")
    if line := _skipped_line(rec["skipped"]):
        print(line)
    if args.out:
        print(f"wrote the samples with meta clip_score[{args.caption!r}] in {rec['shards']} shard(s) to {rec['out']}")
    else:
        print("wrote " + ", ".join(rec["sidecars"]))
    return 0


def cmd_captions_filter(args: argparse.Namespace) -> int:
    from zoo.tools.captions import filter_shards

    model = _model_for_eval(args.model, args.random_weights) if args.model else None
    rec = filter_shards(args.data, args.out, args.keep_top, caption=args.caption, scores=args.scores, model=model,
                        model_name=args.model, batch_size=args.batch_size, drop_unscored=args.drop_unscored,
                        maxcount=args.maxcount)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    print(f"kept {rec['kept']} of {rec['total']} pairs ({100 * rec['kept_fraction']:.1f}%, --keep-top {args.keep_top:g}): "
          f"CLIP score ({args.caption}) >= {rec['threshold']:.4f}, scores from the {rec['scores_from']}")
    if rec["unscored_dropped"]:
        print(f"dropped {rec['unscored_dropped']} sample(s) without a score (--drop-unscored)")
    if line := _skipped_line(rec["skipped"]):
        print(line)
    print(f"wrote {rec['shards']} shard(s) to {rec['out']}; score histogram: {rec['histogram']}")
    return 0


def cmd_captions_recaption(args: argparse.Namespace) -> int:
    from zoo.tools.captions import build_captioner, recaption

    options = {k: getattr(args, k) for k in ("generation", "seed", "seq_len") if getattr(args, k) is not None}
    captioner = build_captioner(args.captioner, **options)  # only what was asked: other backends take other options
    rec = recaption(args.data, args.out, captioner, name=args.name, n_captions=args.n_captions,
                    batch_size=args.batch_size, maxcount=args.maxcount)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    print(f"captioned {rec['samples']} samples with {args.captioner} ({rec['captions']} captions), under meta "
          f"captions[{args.name!r}]; wrote {rec['shards']} shard(s) to {rec['out']}")
    if rec["example"]:
        print(f"e.g. {rec['example'][0]!r}")
    if rec["empty"]:
        print(f"{rec['empty']} empty caption(s) left out")
    if line := _skipped_line(rec["skipped"]):
        print(line)
    return 0


def cmd_embed_text(args: argparse.Namespace) -> int:
    from zoo.eval.text_embedding import embed_text_shards

    captions = {"raw": args.raw_caption, "short": _none(args.short_caption), "long": _none(args.long_caption)}
    rec = embed_text_shards(args.lm, args.data, args.out, captions=captions, field=args.field, layer=args.layer,
                            positions=args.positions, batch_size=args.batch_size, max_length=args.max_length,
                            device=args.device)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    layout = " + ".join(f"{n} {k}" for k, n in rec["layout"])
    print(f"embedded {rec['samples']} samples with {rec['lm']} (layer {rec['layer']}, {layout} = {rec['n_facets']} "
          f"rows of {rec['dim']}, fp16) into {rec['shards']} shard(s) in {rec['out']} as KEY.{rec['field']}.npy"
          + (f"; {rec['kept_from_earlier_run']} shard(s) kept from an earlier run" if rec["kept_from_earlier_run"] else ""))
    if line := _skipped_line(rec["counts"]):
        print(line)
    return 0


def _none(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def cmd_analyze_attention(args: argparse.Namespace) -> int:
    import torch

    from zoo.convert import as_zoo_vit
    from zoo.tools.attention_analysis import analyze_attention

    if args.out and (args.json_path or args.plot):
        raise ZooError("give --out DIR (attention.json and attention.png in it), or --json F and/or --plot F, not both")
    json_path, plot = args.json_path, args.plot
    if args.out:
        json_path, plot = Path(args.out) / "attention.json", Path(args.out) / "attention.png"
    model = _model_for_eval(args.model, args.random_weights)
    vit = as_zoo_vit(model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vit.to(device)
    rec = analyze_attention(vit, args.data, n_images=args.n_images, batch_size=args.batch_size,
                            image_field=args.image_field, layers=args.layers, model_name=args.model, plot=plot)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rec, indent=2))
    rows = [{"layer": f"{r['layer']} ({r['index']})", "nmi": f"{r['nmi']:.4f}", "distance": f"{r['distance']:.2f}",
             "entropy": f"{r['entropy']:.3f}", "band": r["band"] + (" <-" if r["index"] == rec["hybrid_layer"]["index"]
                                                                    else "")} for r in rec["layers"]]
    print(f"{rec['model']}: attention over {rec['n_images']} images ({rec['image_field']}), {rec['grid'][0]}x"
          f"{rec['grid'][1]} patches of {rec['patch_size'][0]} px; layer = 1-based (0-based index), distance in px, "
          "entropy in nats")
    print_table(rows, ["layer", "nmi", "distance", "entropy", "band"])
    h = rec["hybrid_layer"]
    print(f"hybrid layer: {h['layer']} (index {h['index']}), NMI {h['nmi']:.4f}: {h['note']}")
    for what, path in (("json", json_path), ("plot", rec.get("plot"))):
        if path:
            print(f"wrote {what} {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    import torch

    from zoo.engine.plots import image_grid
    from zoo.eval.sampling import generate, parse_stitch

    stitch = [parse_stitch(s) for s in args.stitch or ()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = {"timestep_spacing": args.spacing} if args.spacing else {}
    result = generate(args.model, stitch=stitch, scheduler=args.scheduler, steps=args.steps, n=args.n,
                      labels=args.labels, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                      device=device, **extra)
    names = [name for name, _ in stitch] + [args.model]
    letters = "SL" if len(names) == 2 else "0123456789"
    trace = "".join(letters[i] for i in result.trace)
    cols = args.cols or min(len(result.labels), max(1, math.ceil(math.sqrt(len(result.labels)))))
    rows = list(result.images.split(cols))
    out = Path(args.out)
    image_grid(rows, out, mean=(0.0,) * result.images.shape[1], std=(1.0,) * result.images.shape[1],
               scale=max(1, 64 // result.images.shape[-1]))
    fractions = [f for _, f in stitch]
    info = {"model": args.model, "stitch": [{"model": n, "fraction": f} for n, f in stitch],
            "large_fraction": round(1 - sum(fractions), 6), "scheduler": args.scheduler, "steps": args.steps,
            "n": len(result.labels), "guidance_scale": args.guidance, "seed": args.seed, "device": device,
            "seconds": round(result.seconds, 3), "seconds_per_image": round(result.seconds / len(result.labels), 5),
            "gflops_per_image": round(result.flops / 1e9, 4), "trace": trace, "labels": result.labels,
            "grid": str(out)}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    who = " -> ".join(f"{n} ({f:.2f})" for n, f in zip(names, [*fractions, 1 - sum(fractions)]))
    print(f"{who}: {len(result.labels)} images, {args.scheduler} {args.steps} steps, guidance {args.guidance}, "
          f"on {device}")
    print(f"time {result.seconds:.2f} s ({1000 * result.seconds / len(result.labels):.1f} ms/image), "
          f"{result.flops / 1e9:.3f} GFLOPs/image (2 per multiply-add)")
    if stitch:
        print(f"steps by model ({'S: small, L: large' if len(names) == 2 else 'model index'}): {trace}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _sample_parser(sub: Any) -> None:
    """`zoo sample`: class-conditional samples of a diffusion model, optionally T-Stitched from smaller ones."""
    from zoo.eval.sampling import SCHEDULERS

    s = sub.add_parser("sample", help="sample a class-conditional diffusion model (DiT), optionally T-Stitched: "
                                      "small models for the first steps, MODEL for the rest")
    s.add_argument("model", help="the (large) diffusion model: published name, folder, hf-hub:facebook/DiT-XL-2-256")
    s.add_argument("--stitch", action="append", metavar="SMALL@FRACTION",
                   help="a smaller model and its fraction of the trajectory, taken first (T-Stitch); repeat for "
                        "several, smallest first, e.g. --stitch dit_nano_patch2_8.digits@0.4")
    s.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="diffusers scheduler (default ddim)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    s.add_argument("--spacing", choices=("leading", "trailing", "linspace"),
                   help="timestep spacing (default: the scheduler's own; DiT's respacing is closest to trailing)")
    s.add_argument("--n", type=int, default=64, help="images (default 64); labels cycle through the classes")
    s.add_argument("--labels", type=int, nargs="+", help="class labels, one per image (overrides --n)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, help="images per forward (default: all)")
    s.add_argument("--cols", type=int, help="images per grid row (default: a square grid)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    s.add_argument("--out", default="samples.png", help="the image grid (PNG); its timing and settings go beside "
                                                        "it as .json (default samples.png)")
    s.set_defaults(fn=cmd_sample)


def _analyze_parser(sub: Any) -> None:
    """`zoo analyze attention`: per-layer attention patterns of a ViT (NMI, distance, entropy, bands)."""
    an = sub.add_parser("analyze", help="analyse what a model does on data (attention patterns)").add_subparsers(
        dest="analyze_command", required=True, metavar="ANALYSIS")
    s = an.add_parser("attention", help="per-layer attention NMI, distance and entropy; local/hybrid/global bands "
                                        "and the hybrid layer (UNIP's teacher layer)")
    s.add_argument("model", help="a ViT: published name, path, timm:NAME, or architecture (random weights)")
    s.add_argument("--data", required=True, help="shards, e.g. 'data/scenes/val/*.tar'")
    s.add_argument("--n-images", type=int, default=64, help="images to average over (default 64)")
    s.add_argument("--image-field", default="image",
                   help="image field to read (default image); e.g. thermal: a 1-channel field, replicated to RGB")
    s.add_argument("--layers", type=int, nargs="+", metavar="INDEX",
                   help="0-based block indices to measure (default all; UNIP's 1-based layer 18 is index 17); "
                        "the bands are relative to the layers measured")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--out", help="folder for attention.json and attention.png")
    s.add_argument("--json", dest="json_path", metavar="FILE", help="write the results as JSON here")
    s.add_argument("--plot", metavar="FILE", help="write the picture (PNG) here")
    s.add_argument("--random-weights", action="store_true", help="analyse the architecture with random weights")
    s.set_defaults(fn=cmd_analyze_attention)


def _captions_parser(sub: Any) -> None:
    """`zoo captions score|filter|recaption`: CLIP scores, DFN-style filtering, synthetic captions."""
    cap = sub.add_parser("captions", help="score, filter and recaption image-text shards").add_subparsers(
        dest="captions_command", required=True, metavar="CAPTIONS_COMMAND")
    caption_help = "caption to score: 'caption' (the txt member, default) or a name in meta['captions']"
    s = cap.add_parser("score", help="CLIP score of every image-caption pair, beside the shards or into new ones")
    s.add_argument("model", help="an image-text model, e.g. open_clip:ViT-B-32/TAG or a published one")
    s.add_argument("--data", required=True, help="shards, e.g. 'data/{00000..00009}.tar'")
    s.add_argument("--caption", default="caption", help=caption_help)
    s.add_argument("--out", help="write new shards here, the score in meta['clip_score'] (default: a JSONL beside the shards)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--maxcount", type=int, default=1000, help="samples per output shard (default 1000)")
    s.add_argument("--random-weights", action="store_true", help="score with the architecture's random weights (tests)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_captions_score)
    s = cap.add_parser("filter", help="keep the best-aligned fraction of pairs by CLIP score (DFN style)")
    s.add_argument("--data", required=True, help="shards, e.g. 'data/*.tar'")
    s.add_argument("--keep-top", type=float, required=True, metavar="FRACTION",
                   help="fraction in (0, 1] to keep, e.g. 0.3: the ceil(FRACTION x N) best-scored pairs")
    s.add_argument("--out", required=True, help="output folder for the kept samples' shards and scores.png")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--scores", help="a scores JSONL from `zoo captions score` (default: meta['clip_score'], "
                                      "else the one score file beside the shards)")
    src.add_argument("--model", help="score now with this image-text model")
    s.add_argument("--caption", default="caption", help=caption_help)
    s.add_argument("--drop-unscored", action="store_true", help="drop samples without a score instead of failing")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--maxcount", type=int, default=1000, help="samples per output shard (default 1000)")
    s.add_argument("--random-weights", action="store_true", help="with --model: its random weights (tests)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_captions_filter)
    s = cap.add_parser("recaption", help="add generated captions to every sample (e.g. open_clip CoCa)")
    s.add_argument("--captioner", required=True, help="coca:ARCH/TAG, e.g. coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k "
                                                      "(no TAG: random weights)")
    s.add_argument("--data", required=True, help="shards, e.g. 'data/*.tar'")
    s.add_argument("--out", required=True, help="output folder for the new shards")
    s.add_argument("--name", default="synthetic", help="the captions go to meta['captions'][NAME] (default synthetic)")
    s.add_argument("--n-captions", type=int, default=1, metavar="K", help="captions per image (default 1)")
    s.add_argument("--generation", choices=["top_p", "top_k", "greedy", "beam"],
                   help="CoCa decoding: nucleus sampling (default), top-k, greedy, or beam search (needs transformers<5)")
    s.add_argument("--seq-len", type=int, help="CoCa: most tokens per caption, with start and end (default 30)")
    s.add_argument("--seed", type=int, help="seed of the sampling (default 0)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--maxcount", type=int, default=1000, help="samples per output shard (default 1000)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_captions_recaption)


def _eval_outputs(s: argparse.ArgumentParser) -> None:
    """The options every `zoo eval` protocol shares: where results go and which weights."""
    s.add_argument("--out", help="write the results as JSON here")
    s.add_argument("--record", action="store_true", help="add the results to the published model's card")
    s.add_argument("--task", help="name of the task in the card (default: the val folder's name)")
    s.add_argument("--random-weights", action="store_true", help="evaluate the architecture with random weights (a baseline)")


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    p = argparse.ArgumentParser(prog="zoo", description="A model zoo for vision and multimodal pretraining.")
    p.add_argument("--version", action="version", version=f"zoo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("embed-text", help="FLAME: a frozen LM's facet-prompt embeddings of every caption, written "
                                          "into new shards (resumable per shard)")
    s.add_argument("--lm", required=True, help="a causal LM: a zoo name (llama_nano.scenes_captions), a transformers "
                                               "folder or hf-hub:ORG/LM")
    s.add_argument("--data", required=True, help="shards, e.g. 'data/*.tar'")
    s.add_argument("--out", required=True, help="output folder (same shard names; rerun to resume)")
    s.add_argument("--raw-caption", default="caption", help="the alt-text, 1 prompt (default: caption, the txt member)")
    s.add_argument("--short-caption", default="short", help="3 facets; 'none' leaves them out (default: short)")
    s.add_argument("--long-caption", default="long", help="7 facets; 'none' leaves them out (default: long)")
    s.add_argument("--field", default="flame", help="the new member: KEY.FIELD.npy (default flame)")
    s.add_argument("--layer", type=int, help="the LM block whose output is read (default: the penultimate)")
    s.add_argument("--positions", choices=["restart", "sequential"], default="restart",
                   help="facet position ids: as if run alone (default) or counting on (FLAME's released code)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-length", type=int, help="most tokens per prompt (default: the LM's context)")
    s.add_argument("--device", help="where the LM runs: cuda, cuda:1, cpu (default: the GPU when there is one, bf16)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_embed_text)

    s = sub.add_parser("list", help="list architectures and pretrained models")
    s.add_argument("pattern", nargs="?", help="wildcard (vit_*_patch4_*) or substring")
    s.add_argument("--pretrained", action="store_true", help="only names with weights")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("lock", help="record or check the sha256 of pretrained weights in zoo.lock")
    s.add_argument("names", nargs="*", metavar="NAME", help="pretrained names to fetch and record (zoo list --pretrained)")
    s.add_argument("--check", action="store_true", help="verify every locked file on this machine against the lock")
    s.add_argument("--update", action="store_true", help="replace the recorded hash (after an intended upstream change)")
    s.add_argument("--file", help="the lock file (default: $ZOO_LOCK, the nearest zoo.lock upwards, else "
                                  "$ZOO_HOME/zoo.lock); created if missing")
    s.set_defaults(fn=cmd_lock)

    s = sub.add_parser("info", help="show a model's architecture, preprocessing and card")
    s.add_argument("name", nargs="?", help="a published name, a model folder (zoo's or timm's), a weights file "
                                           "(.safetensors, .pth), or an architecture")
    s.add_argument("--kernels", action="store_true", help="show which attention backends and kernels run here, and why not")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="convert a checkpoint (e.g. official MAE .pth) to zoo safetensors")
    s.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.safetensors)")
    s.add_argument("out", help="OUT.safetensors, or a name to publish in the zoo store (arch.tag)")
    s.add_argument("--arch", help="zoo architecture, e.g. vit_base_patch16_224 (with --from poa/unip: inferred)")
    s.add_argument("--lm", help="--from flame: the language model its text side loads by name, e.g. "
                                "hf-hub:mistralai/Mistral-Nemo-Instruct-2407")
    s.add_argument("--from", dest="source_format", choices=("poa", "unip", "dit", "flame"),
                   help="poa: an official POA teacher_checkpoint.pth, cut to the sub-network --width x --depth; "
                        "unip: an official UNIP checkpoint (its untrained last-block parts are reported); "
                        "dit: an official DiT .pt (DiT-XL-2-256x256.pt, or a training checkpoint: its ema weights); "
                        "flame: an official FLAME epoch_N.pt (image tower + projector; the frozen LLM is dropped)")
    s.add_argument("--last-heads", type=int, help="with --from unip: the last block's head count, the teacher's "
                                                  "(16 for the released MAE-L/iBOT-L teachers, 12 for DINO-B)")
    s.add_argument("--width", type=int, help="with --from poa: embedding width, a multiple of the head size")
    s.add_argument("--depth", type=int, help="with --from poa: number of blocks (evenly spaced over the intact ones)")
    s.add_argument("--head-dim", type=int, default=64, help="with --from poa: the checkpoint's head size (POA: 64)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="fully unpickle SRC (runs code from the file: only for files you trust)")
    s.add_argument("--non-strict", action="store_true", help="allow keys missing from the checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing published model")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("extract", help="publish a width x depth sub-network of an intact POA model, without retraining")
    s.add_argument("source", help="an intact POA model (a published name or folder) or a POA run directory (runs/...: "
                                  "its latest checkpoint)")
    s.add_argument("--width", type=int, required=True, help="embedding width, a multiple of the head size")
    s.add_argument("--depth", type=int, required=True, help="number of blocks (evenly spaced over the intact ones)")
    s.add_argument("--name", help="name to publish under (default SOURCE_wW_dL; for a run: its output.publish_wW_dL)")
    s.add_argument("--root", help="publish into this folder instead of the zoo store")
    s.add_argument("--overwrite", action="store_true", help="replace an existing published model")
    s.set_defaults(fn=cmd_extract)

    s = sub.add_parser("demo", help="the main job on built-in data: pretrain MAE, publish, reload, evaluate")
    s.add_argument("--out", default="zoo-demo", help="folder for the shards, the run and results.json")
    s.add_argument("--steps", type=int, default=320, help="MAE pretraining steps (default 320: the whole demo in about 2.5 min on 2 cores)")
    s.add_argument("--n", type=int, default=5000, help="fractal images to pretrain on")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("recipes", help="list the pretraining methods and their recipes")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser("pretrain", help="pretrain a recipe on webdataset shards (or its built-in data)")
    s.add_argument("recipe", help="an installed recipe's name (zoo recipes lists them), e.g. "
                                  "dino_vit_tiny_patch4_32_fractals, or a recipe YAML path")
    s.add_argument("--data", help="training shards, e.g. 'shards/train-{00000..00015}.tar' (overrides data.train; "
                                  "default: the recipe's data, e.g. its built-in data.builtin)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value, e.g. optim.lr=1e-3")
    s.add_argument("--run-dir", help="run directory (default: the recipe's output.dir)")
    s.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue the latest checkpoint in the run directory, or the checkpoint given")
    s.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    s.set_defaults(fn=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a model's frozen features (knn, linear)").add_subparsers(
        dest="protocol", required=True, metavar="PROTOCOL")
    for proto, helptext in (("knn", "weighted kNN (DINO protocol)"), ("linear", "linear-probe grid, selected on held-out train")):
        s = ev.add_parser(proto, help=helptext)
        s.add_argument("model", help="published name, path, or architecture (random weights)")
        s.add_argument("--train", required=True, help="train shards, e.g. 'data/digits/train/*.tar'")
        s.add_argument("--val", required=True, help="val shards")
        s.add_argument("--pooling", nargs="+", help="feature variants: cls avg cls+avg lastN spacedN")
        s.add_argument("--batch-size", type=int, default=128)
        s.add_argument("--workers", type=int, default=0)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
        s.add_argument("--label-field", default="label",
                       help="the integer field to classify: label (.cls), or a named one such as fine (fine.cls)")
        _eval_outputs(s)
        if proto == "knn":
            s.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
            s.add_argument("--temperature", type=float, default=0.07)
        else:
            s.add_argument("--epochs", type=int, default=30)
            s.add_argument("--solver", choices=["lbfgs", "sgd"], default="lbfgs",
                           help="lbfgs: logistic regression along an L2 path, chosen on train; sgd: the older grid over lrs")
        s.set_defaults(fn=cmd_eval)
    for proto, helptext in (("zeroshot", "zero-shot classification (image-text models)"),
                            ("retrieval", "image<->text retrieval R@1/5/10 (image-text models)")):
        s = ev.add_parser(proto, help=helptext)
        s.add_argument("model", help="an image-text model, e.g. open_clip:ViT-B-32/TAG or a published one")
        s.add_argument("--val", required=True, help="shards to evaluate on")
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--workers", type=int, default=0)
        s.add_argument("--prompt", choices=["raw", "short", "long"],
                       help="FLAME models: the prompts the LM reads the texts in (default raw; long: 7 facets, averaged)")
        _eval_outputs(s)
        if proto == "zeroshot":
            s.add_argument("--classnames", nargs="+", help="one per label (default: classes in the shards' dataset.json)")
            s.add_argument("--template", nargs="+", default=["a photo of a {}."], help="prompt templates with {}")
            s.set_defaults(fn=cmd_eval_zeroshot)
        else:
            s.add_argument("--caption", nargs="+", default=["caption"],
                           help="caption fields: 'caption' (the txt member) or names in meta['captions'] (exact short noisy)")
            s.set_defaults(fn=cmd_eval_retrieval)
    s = ev.add_parser("dense", help="segmentation probe (linear or LL-FPN head) on frozen patch features, or "
                                    "fine-tuning (mIoU)")
    s.add_argument("model", help="published name, path, or ViT architecture (random weights)")
    s.add_argument("--train", required=True, help="train shards with image + seg.png masks, e.g. built-in scenes")
    s.add_argument("--val", required=True, help="val shards")
    s.add_argument("--head", default="linear", help="linear (default) or llfpn (UNIP's last-layer feature pyramid)")
    s.add_argument("--finetune", action="store_true",
                   help="train backbone + head end to end (AdamW, layer-wise lr decay) instead of a frozen probe")
    s.add_argument("--image-field", default="image",
                   help="the field read as the image, e.g. thermal (a grey image is replicated to 3 channels)")
    s.add_argument("--lr", type=float,
                   help="frozen: train this one lr instead of the head's grid; --finetune: the lr (default 1e-4)")
    s.add_argument("--layer-decay", type=float, help="--finetune: layer-wise lr decay (default 0.85)")
    s.add_argument("--drop-path", type=float, help="--finetune: stochastic depth rate of the last block (default 0)")
    s.add_argument("--blocks", type=int, default=1,
                   help="frozen linear head: concatenate the patch maps of the last N blocks (default 1)")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--max-samples", type=int, help="use at most this many images per split")
    s.add_argument("--batch-size", type=int, default=32, help="images per batch (extraction, or --finetune training)")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    _eval_outputs(s)
    s.set_defaults(fn=cmd_eval_dense)

    sh = sub.add_parser("shards", help="make and check webdataset shards").add_subparsers(
        dest="shards_command", required=True, metavar="SHARDS_COMMAND")
    s = sh.add_parser("make-builtin", help="generate a built-in dataset (fractals, scenes, digits) into shards")
    s.add_argument("name", help="built-in dataset name")
    s.add_argument("--out", required=True, help="output folder for 00000.tar, ... and sizes.json")
    s.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--split", default="train", choices=["train", "val"])
    s.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    s.set_defaults(fn=cmd_shards_make_builtin)
    s = sh.add_parser("from-folder", help="shards from ROOT/CLASS/IMAGE folders, as torchvision's ImageFolder reads "
                                          "them (+ same-named .txt captions)")
    s.add_argument("src", help="root folder with one sub-folder per class (images found recursively)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--skip-hidden", action="store_true",
                   help="leave out folders and files named .* (ImageFolder keeps them: labels then differ)")
    s.add_argument("--other-as-png", action="store_true",
                   help="store bmp/ppm/pgm/tif images as lossless PNG, for readers that look only for jpg/png/webp")
    s.set_defaults(fn=cmd_shards_from_folder)
    s = sh.add_parser("check", help="decode every sample; per-shard counts, fields and problems")
    s.add_argument("pattern", help="shards: 'dir/{00000..00009}.tar' or 'dir/*.tar'")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_shards_check)
    _captions_parser(sub)
    _analyze_parser(sub)
    _sample_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
