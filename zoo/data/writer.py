"""Writing shards: img2dataset-style tars (`%05d.tar`, 9-digit keys) with the counts every reader
looks for beside them (open_clip `sizes.json`, timm `_info.json`, a wids `shardindex.json`), and
ImageFolder trees turned into samples by torchvision's rules.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from zoo.data.fields import encode_field, field_of
from zoo.errors import DataError
from zoo.progress import progress

log = logging.getLogger(__name__)
# -- writing -------------------------------------------------------------------------------------
def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    """One member with plain USTAR metadata (integer mtime, mode 644)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)  # an integer: a float mtime makes tarfile add a PAX header per member
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_indexes(out: Path, shards: list[Path], sizes: dict[str, int], *, name: str, split: str) -> None:
    """timm's `_info.json` and a wids shard index beside the shards, with paths relative to `out`."""
    names = [p.name for p in shards]
    timm_info = {"name": str(name), "splits": {split: {
        "name": split, "num_samples": sum(sizes.values()), "filenames": names,
        "shard_lengths": [sizes[n] for n in names],
    }}}
    (out / "_info.json").write_text(json.dumps(timm_info, indent=1) + "\n")
    if not shards:  # wids refuses an index without shards
        (out / "shardindex.json").unlink(missing_ok=True)
        return
    wids_index = {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": str(name),
        "shardlist": [{"url": p.name, "nsamples": sizes[p.name], "filesize": p.stat().st_size} for p in shards],
    }
    (out / "shardindex.json").write_text(json.dumps(wids_index, indent=1) + "\n")


def write_shards(
    samples: Iterable[dict[str, Any]],
    out: str | Path,
    *,
    maxcount: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    total: int | None = None,
    info: dict[str, Any] | None = None,
    split: str | None = None,
    desc: str = "writing shards",
) -> list[Path]:
    """Write samples (zoo field dicts) as whole `OUT/00000.tar, ...` (9-digit keys, `__members__` verbatim) with
    `sizes.json` (open_clip), `_info.json` (timm), `shardindex.json` (wids) and `dataset.json` (`info`)."""
    # timm: create_dataset("wds/NAME", root=OUT, split=...), the split defaulting to info["split"] or "train";
    # wids: ShardListDataset("OUT/shardindex.json"), shard URLs relative to the index.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    sizes: dict[str, int] = {}
    tar = None
    tmp: Path | None = None
    n_in_shard = 0
    mtime = time.time()
    fields_seen: set[str] = set()

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            final = out / f"{len(shards):05d}.tar"
            os.replace(tmp, final)
            shards.append(final)
            sizes[final.name] = n_in_shard
            tar = None

    try:
        for i, sample in enumerate(progress(samples, total=total, desc=desc, unit="img")):
            if tar is None or n_in_shard >= maxcount:
                close()
                tmp = out / f".{len(shards):05d}.tar.part"
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # plain headers: fastest to read
                n_in_shard = 0
            key = str(sample.get("__key__", f"{i:09d}"))
            if "." in key or "/" in key:
                raise DataError(f"sample key {key!r} contains '.' or '/', which webdataset cannot group; use plain keys")
            for field, value in sample.items():
                if field.startswith("__") or value is None:
                    continue
                fmt = sample.get("__image_ext__", image_format)
                ext, data = encode_field(field, value, image_format=fmt, quality=quality)
                add_member(tar, f"{key}.{ext}", data, mtime)
                fields_seen.add(field)
            for ext, data in (sample.get("__members__") or {}).items():
                add_member(tar, f"{key}.{ext}", data, mtime)
                fields_seen.add(field_of(ext))
            n_in_shard += 1
        close()
    except BaseException:
        if tar is not None:
            tar.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    write_indexes(out, shards, sizes, name=(info or {}).get("name") or out.name,
                   split=split or (info or {}).get("split") or "train")
    if info is not None:
        meta = {**info, "num_samples": sum(sizes.values()), "fields": sorted(fields_seen), "shards": len(shards)}
        (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return shards


# torchvision's IMG_EXTENSIONS: the files ImageFolder takes, matched case-insensitively
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def folder_files(root: str | Path, *, skip_hidden: bool = False,
                 skipped: Counter | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) exactly as torchvision's `ImageFolder(root).samples` (hidden class folders
    too, unless `skip_hidden`); files left out are counted in `skipped` by reason."""
    root = os.path.expanduser(str(root))
    skipped = Counter() if skipped is None else skipped
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory; expected ROOT/CLASS_NAME/IMAGE files")
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if skip_hidden and entry.name.startswith("."):
            skipped["hidden"] += 1
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped["not_in_class_folder"] += 1
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected ROOT/CLASS_NAME/IMAGE files")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        if name.startswith("."):
            log.warning("%s is a hidden folder; like torchvision's ImageFolder, zoo makes it class %d: remove it or "
                        "pass --skip-hidden (labels then differ from ImageFolder's)", os.path.join(root, name), label)
        before = len(files)
        for folder, subdirs, names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            if skip_hidden and any(part.startswith(".") for part in Path(folder).relative_to(root).parts):
                skipped["hidden"] += len(names)
                continue
            stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(IMAGE_SUFFIXES)}
            for n in sorted(names):
                if skip_hidden and n.startswith("."):
                    skipped["hidden"] += 1
                elif n.lower().endswith(IMAGE_SUFFIXES):
                    files.append((os.path.join(folder, n), label))
                elif not (n.lower().endswith(".txt") and os.path.splitext(n)[0] in stems):  # a caption is used
                    skipped["not_image"] += 1
        if len(files) == before:
            log.warning("class folder %s holds no image (ImageFolder would refuse it); its label %d is kept",
                        os.path.join(root, name), label)
    return classes, files


def folder_samples(root: str | Path, *, skip_hidden: bool = False, other_as_png: bool = False,
                   skipped: Counter | None = None) -> tuple[list[str], Iterator[dict[str, Any]], int]:
    """(classes, samples, count of candidates) from `root/CLASS/**/IMAGE` in ImageFolder's order and labels, the
    original bytes kept, `meta["path"]` relative to root, a same-named `.txt` as caption."""
    # Formats keep their extension (`.jpeg` as `jpg`); `other_as_png` stores bmp/ppm/pgm/tif as lossless PNG
    # for readers that look only for jpg/png/webp (timm, open_clip). Files PIL cannot open are skipped
    # while the samples are made and counted in `skipped` as `unreadable_image`.
    skipped = Counter() if skipped is None else skipped
    classes, files = folder_files(root, skip_hidden=skip_hidden, skipped=skipped)
    base = os.path.expanduser(str(root))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {base}/*/")

    def gen() -> Iterator[dict[str, Any]]:
        from PIL import Image

        i = 0
        for path, label in files:
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            try:
                with Image.open(path) as im:  # reads the header only: is it an image at all?
                    png = other_as_png and ext not in ("jpg", "jpeg", "png", "webp")
                    if png:
                        im = im if im.mode in _PNG_MODES else im.convert("RGBA" if "A" in im.getbands() else "RGB")
                        buf = io.BytesIO()
                        im.save(buf, format="PNG")
                        data = buf.getvalue()
                    else:
                        data = Path(path).read_bytes()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped["unreadable_image"] += 1
                log.warning("skipped %s: %s", path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                continue
            sample: dict[str, Any] = {
                "__key__": f"{i:09d}", "image": data, "label": label,
                "__image_ext__": "png" if png else "jpg" if ext == "jpeg" else ext,
                "meta": {"path": Path(path).relative_to(base).as_posix()},
            }
            caption = Path(path).with_suffix(".txt")
            if caption.is_file():
                sample["caption"] = caption.read_text(encoding="utf-8", errors="replace").strip()
            i += 1
            yield sample

    return classes, gen(), len(files)
