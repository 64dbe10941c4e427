"""The pretrained table (zoo/models/pretrained.yaml) and the weights lock file (zoo.lock), offline.

Every entry resolves from its own source (its Hub repo and file, laid out in an offline Hugging Face cache, or its
URL, answered by a stand-in for the network that checks the address) and converts a file built here in its
release's layout into the model of its name, computing what the release's own code computes. Every manual entry's
`zoo convert` command runs as written. The lock file records a first download, verifies every later load against
it, and refuses a changed file with a one-line error naming both hashes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import shlex
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import zoo
import zoo.hub
import zoo.lock
import zoo.pretrained
from hf_cache import make_hf_cache
from test_dit import official_dit_state_dict
from test_elastic import official_poa_checkpoint
from test_flame_convert import fake_flame
from zoo.cli import build_parser, main
from zoo.errors import ChecksumError, ConfigError, UnknownNameError
from zoo.factory import count_params
from zoo.models.vit import VisionTransformer
from zoo.registry import MODELS

ENTRIES = zoo.pretrained.entries()
FETCHED = [e for e in ENTRIES if not e.is_manual]
MANUAL = [e for e in ENTRIES if e.is_manual]
BIG = 100_000_000  # files of more parameters than this are built only in the slow tests


def _param(entry, params: int):
    return pytest.param(entry, id=entry.name, marks=[pytest.mark.slow] if params > BIG else [])


@pytest.fixture
def hf_cache(isolated_zoo_home) -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


class FakeNetwork:
    """urllib's urlopen for one URL, serving a local file; any other address is a test failure."""

    def __init__(self, url: str, data: bytes):
        self.url, self.data, self.calls = url, data, 0

    def __call__(self, url, timeout=None):
        assert url == self.url, f"zoo fetched {url}, not the entry's {self.url}"
        self.calls += 1
        resp = io.BytesIO(self.data)
        resp.headers = {"Content-Length": str(len(self.data))}
        return resp


# -- the table itself ------------------------------------------------------------------------------------------
def test_the_table_covers_the_seed_methods_and_every_entry_is_well_formed():
    names = {e.name for e in ENTRIES}
    for required in ("vit_base_patch16_224.mae", "vit_large_patch16_224.mae", "vit_huge_patch14_224.mae",
                     "vit_base_patch16_224.dino", "vit_small_patch14_dinov2.lvd142m", "clip_base_patch16_224.openai",
                     "vit_base_patch16_siglip_224.webli", "dit_xlarge_patch2_256.imagenet",
                     "dit_small_patch2_256.tstitch", "vit_small_patch16_224.unip_mae_l",
                     "flame_vit_base_patch16_224.cc3m", "vit_small_patch16_224.poa"):
        assert required in names
    for e in ENTRIES:
        assert e.converter in zoo.pretrained.CONVERTERS
        assert e.license and e.paper and e.origin and e.reported_by, e.name
        if e.converter == "timm":
            assert timm.is_model(e.build_arch), e.name
        else:
            assert e.build_arch in MODELS, f"{e.name}: {e.build_arch} is not a zoo architecture"
        assert set(e.preprocessing) <= {"input_size", "mean", "std", "interpolation", "crop_pct"}, e.name
        if e.source.startswith("hf-hub:"):
            assert e.file and "/" in e.source
        elif not e.is_manual:
            assert e.source.startswith("https://"), e.name
    assert zoo.list_models("*dinov2*", pretrained=True) == [
        "vit_base_patch14_dinov2.lvd142m", "vit_large_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m"]


def test_table_rows_with_bad_fields_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown field 'soruce'; did you mean 'source'"):
        zoo.pretrained.make_entry("a.b", {"soruce": "x"})
    with pytest.raises(ConfigError, match="unknown converter 'tim'"):
        zoo.pretrained.make_entry("a.b", {"source": "hf-hub:o/r", "file": "f", "converter": "tim"})
    with pytest.raises(ConfigError, match="needs `file`"):
        zoo.pretrained.make_entry("a.b", {"source": "hf-hub:o/r"})
    with pytest.raises(ConfigError, match="manual.where"):
        zoo.pretrained.make_entry("a.b", {"source": "manual"})
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        zoo.pretrained.make_entry("a.b", {"source": "https://x/y.pt", "sha256": "abc"})
    with pytest.raises(ConfigError, match="arch.tag"):
        zoo.pretrained.make_entry("nodot", {"source": "https://x/y.pt"})


# -- every fetched entry: its source, its converter, a file in its release's layout ------------------------------
@functools.cache
def _openai_clip_file(folder: Path):
    """One random open_clip ViT-B-16 with QuickGELU and its state dict file, shared by the two CLIP entries."""
    import open_clip

    ref = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    path = folder / "openai_clip_b16.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return ref, path


def _release_file(entry, tmp_path: Path):
    """(file bytes' path, the keyword overrides to load it with, an input, the release code's output on it)."""
    torch.manual_seed(0)
    size = (entry.preprocessing.get("input_size") or [3, 224, 224])[-1]
    x = torch.randn(2, 3, size, size)
    path = tmp_path / (entry.file or "release.bin")
    if entry.converter in ("timm_vit", "timm"):  # timm's Hub copies: a timm model's state dict, one block deep
        ref = timm.create_model(entry.build_arch, num_classes=0, depth=1).eval()
        safetensors.torch.save_file(ref.state_dict(), path)
        return path, {"depth": 1}, x, ref(x)
    if entry.converter in ("open_clip", "open_clip_visual"):  # open_clip's file of OpenAI's weights (QuickGELU)
        ref, path = _openai_clip_file(tmp_path.parent)
        return path, {}, x, ref.encode_image(x) if entry.converter == "open_clip" else ref.visual(x)
    if entry.converter == "unip":  # casiatao/UNIP: {'model': timm-named ViT}, sin-cos positions, 16-head last block
        width = {"tiny": 192, "small": 384, "base": 768}[entry.build_arch.split("_")[1]]
        ref = VisionTransformer(embed_dim=width, depth=2, num_heads=width // 64, last_heads=16, pos_embed="sincos").eval()
        torch.save({"model": ref.state_dict(), "epoch": 99}, path)
        return path, {}, x, ref.forward_features(x)
    raise AssertionError(f"no release-format builder for converter {entry.converter}")


@pytest.mark.parametrize("entry", [_param(e, count_params("clip_base_patch16_224") if e.converter.startswith("open_clip")
                                           else 0)  # a whole CLIP file; the others' are built a block or two deep
                                   for e in FETCHED if e.source.startswith("hf-hub:")])
def test_hub_entry_resolves_its_repo_file_and_converts_what_the_release_computes(entry, hf_cache, tmp_path):
    path, overrides, x, expected = _release_file(entry, tmp_path)
    make_hf_cache(hf_cache, entry.source.removeprefix("hf-hub:"), {entry.file: path}, link=True)
    model = zoo.load(entry.name, **overrides)
    with torch.no_grad():
        out = model.forward_features(x) if entry.converter == "unip" else \
            model.encode_image(x) if entry.converter == "open_clip" else model(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-4)
    assert not model.training
    card = model.zoo_card
    assert card["name"] == entry.name and card["source"] == entry.location and card["reported"] == entry.reported
    assert card["pin"] == "recorded" and card["sha256"] == zoo.hub.sha256_file(path)
    for key, value in entry.preprocessing.items():
        assert model.pretrained_cfg[key] == (tuple(value) if isinstance(value, list) else value)
    if entry.converter != "timm":
        assert model.zoo_arch == entry.build_arch
    # the file is now locked: the next load is verified against the record
    assert zoo.load(entry.name, **overrides).zoo_card["pin"] == "locked"


def test_openai_clip_needs_quick_gelu_and_the_entry_builds_it():
    """The CLIP entries' `quick_gelu` is not decoration: the same tensors under plain GELU compute another function."""
    torch.manual_seed(0)
    quick, plain = (zoo.create_model("clip_nano_patch4_32", **kw).eval() for kw in ({"quick_gelu": True}, {}))
    plain.load_state_dict(quick.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(quick.encode_image(x), plain.encode_image(x), atol=1e-3)
    assert zoo.pretrained.get("clip_base_patch16_224.openai").args == {"quick_gelu": True}
    assert zoo.pretrained.get("clip_vit_base_patch16_224.openai").args == {"quick_gelu": True}


def test_url_entry_downloads_its_url_records_it_then_reuses_and_verifies_the_file(monkeypatch, tmp_path):
    """DiT-XL/2: the official URL, fetched once, locked; its 2.7 GB of official tensors are stood in for by the same
    layout at dit_nano size (the converter reads every shape from the tensors)."""
    entry = zoo.pretrained.get("dit_xlarge_patch2_256.imagenet")
    small = dataclasses.replace(entry, arch="dit_nano_patch2_8")
    sd = official_dit_state_dict(0)
    buf = io.BytesIO()
    torch.save(sd, buf)  # DiT-XL-2-256x256.pt is a plain state dict of tensors: weights_only reads it
    net = FakeNetwork(entry.source, buf.getvalue())
    monkeypatch.setattr(urllib.request, "urlopen", net)
    model = zoo.hub.load_entry(small)
    assert net.calls == 1 and model.zoo_card["pin"] == "recorded" and model.zoo_arch == "dit_nano_patch2_8"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    with torch.no_grad():
        ref = zoo.convert.dit_model(sd, arch="dit_nano_patch2_8").eval()(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, ref)
    again = zoo.hub.load_entry(small)
    assert net.calls == 1 and again.zoo_card["pin"] == "locked"  # the recorded file, not a second download
    # the upstream file changes: a fresh machine sharing the lock refuses the new bytes, naming both hashes
    file = zoo.hub.entry_file(entry, download_missing=False)
    file.unlink()
    torch.save(official_dit_state_dict(1), buf := io.BytesIO())
    net.data = buf.getvalue()
    with pytest.raises(ChecksumError) as err:
        zoo.hub.load_entry(small)
    msg = str(err.value)
    assert "\n" not in msg and again.zoo_card["sha256"] in msg and "zoo.lock" in msg and "--update" in msg
    assert zoo.hub.entry_file(entry, download_missing=False) is None  # the refused file was not kept


# -- every manual entry: where to get it, and its one command, run as written ------------------------------------
def _manual_file(entry, args, tmp_path: Path) -> Path:
    """A file in the release's layout that the entry's command accepts as written."""
    path = tmp_path / shlex.split(entry.manual["convert"])[2]
    if entry.converter == "dit":  # T-Stitch's DiT-S/B: the authors' own, in DiT's layout, on 32x32x4 latents
        width = {"dit_small_patch2_256": 384, "dit_base_patch2_256": 768}[args.arch]
        torch.save(official_dit_state_dict(0, width=width, depth=12, patch=2, size=32, classes=1000), path)
    elif entry.converter == "poa":  # alipay/POA's teacher_checkpoint.pth of an intact model just wide enough
        torch.manual_seed(0)
        vit = VisionTransformer(embed_dim=args.width, depth=args.depth, num_heads=args.width // 64)
        torch.save(official_poa_checkpoint(vit), path)
    elif entry.converter == "flame":  # FLAME-Mistral-Nemo-ViT-B/16's training checkpoint
        torch.save(fake_flame(12, img=224, patch=16, width=768, depth=12)[2], path)
    else:
        raise AssertionError(f"no release-format builder for converter {entry.converter}")
    return path


# The command runs as written on a release-format file for one entry of each converter (the smallest); the
# others' commands, the same code path at a larger shape (DiT-B, POA-B/L), are checked as parsed arguments.
RUN = {min((e for e in MANUAL if e.converter == c), key=lambda e: count_params(e.build_arch)).name
       for c in {e.converter for e in MANUAL}}


@pytest.mark.parametrize("entry", MANUAL, ids=[e.name for e in MANUAL])
def test_manual_entry_says_where_and_its_convert_command_publishes_the_name(entry, tmp_path, monkeypatch):
    with pytest.raises(UnknownNameError) as err:
        zoo.load(entry.name)
    assert entry.manual["where"] in str(err.value) and entry.manual["convert"] in str(err.value)
    argv = shlex.split(entry.manual["convert"])
    assert argv[:2] == ["zoo", "convert"] and argv[3] == entry.name
    args = build_parser().parse_args(argv[1:])
    assert args.source_format == entry.converter
    if args.arch is not None:
        assert args.arch == entry.build_arch
    if args.source_format == "poa":  # the sub-network's width and depth are the name's architecture's
        assert count_params(entry.build_arch) == count_params(
            "vit_base_patch16_224", embed_dim=args.width, depth=args.depth, num_heads=args.width // 64)
    if entry.name not in RUN:
        return
    _manual_file(entry, args, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    model = zoo.load(entry.name)  # the store now holds it under the table's name
    assert model.zoo_arch == entry.build_arch


# -- the lock file -----------------------------------------------------------------------------------------------
NAME = "vit_small_patch16_224.dino"


@pytest.fixture
def dino(hf_cache, tmp_path):
    """The vit_small_patch16_224.dino entry's file in the offline Hub cache (a one-block timm ViT-S)."""
    entry = zoo.pretrained.get(NAME)
    path, *_ = _release_file(entry, tmp_path)
    make_hf_cache(hf_cache, entry.source.removeprefix("hf-hub:"), {entry.file: path})
    return zoo.hub.entry_file(entry)


def test_first_download_is_recorded_with_its_source_size_and_hash(dino, isolated_zoo_home):
    lock_file = isolated_zoo_home / "zoo.lock"
    assert not lock_file.exists()
    zoo.load(NAME, depth=1)
    data = json.loads(lock_file.read_text())
    rec = data["weights"][NAME]
    assert data["format"] == "zoo.lock/1"
    assert rec["sha256"] == zoo.hub.sha256_file(dino) and rec["size"] == dino.stat().st_size
    assert rec["source"] == zoo.pretrained.get(NAME).location and rec["recorded"]


def test_a_changed_file_is_refused_naming_both_hashes_and_the_lock_is_kept(dino, isolated_zoo_home):
    zoo.load(NAME, depth=1)
    recorded = zoo.lock.read()[NAME].sha256
    before = (isolated_zoo_home / "zoo.lock").read_text()
    dino.write_bytes(dino.read_bytes()[:-4] + b"\x00\x00\x00\x00")  # a corrupt or replaced file
    with pytest.raises(ChecksumError) as err:
        zoo.load(NAME, depth=1)
    msg = str(err.value)
    assert "\n" not in msg and recorded in msg and zoo.hub.sha256_file(dino) in msg and "--update" in msg
    assert (isolated_zoo_home / "zoo.lock").read_text() == before


def test_a_lock_shared_from_another_machine_holds_this_machine_to_its_hash(dino, tmp_path, monkeypatch):
    """A project's committed zoo.lock (found above the working directory) pins a file this machine never saw."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    entry = zoo.pretrained.get(NAME)
    zoo.lock.record(NAME, entry.location, "a" * 64, path=project / "zoo.lock")
    monkeypatch.delenv("ZOO_LOCK")
    monkeypatch.chdir(project / "src")
    assert zoo.lock.lock_path() == project / "zoo.lock"
    with pytest.raises(ChecksumError, match=f"expects {'a' * 64}"):
        zoo.load(NAME, depth=1)


def test_a_pinned_entry_is_verified_before_use_and_never_touches_the_lock(dino, monkeypatch, isolated_zoo_home):
    entry = zoo.pretrained.get(NAME)
    monkeypatch.setitem(zoo.pretrained._table(), NAME, dataclasses.replace(entry, sha256=zoo.hub.sha256_file(dino)))
    assert zoo.load(NAME, depth=1).zoo_card["pin"] == "pinned"
    assert not (isolated_zoo_home / "zoo.lock").exists()
    monkeypatch.setitem(zoo.pretrained._table(), NAME, dataclasses.replace(entry, sha256="b" * 64))
    with pytest.raises(ChecksumError, match=f"zoo's pretrained table expects {'b' * 64}"):
        zoo.load(NAME, depth=1)


def test_a_new_classifier_starts_fresh_on_the_released_backbone(dino):
    """Fine-tuning: `num_classes=5` adds a head the release does not have; every released tensor still loads."""
    plain, tuned = zoo.load(NAME, depth=1), zoo.load(NAME, depth=1, num_classes=5)
    assert tuned.head.out_features == 5
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_head(tuned.forward_features(x), pre_logits=True), plain(x))


def test_a_changed_source_asks_for_a_relock(dino):
    zoo.lock.record(NAME, "hf-hub:someone/else/model.safetensors", "c" * 64)
    with pytest.raises(ChecksumError, match="its source is now hf-hub:timm/vit_small_patch16_224.dino"):
        zoo.load(NAME, depth=1)


def test_zoo_lock_records_checks_and_updates(dino, capsys, isolated_zoo_home):
    assert main(["lock", "--check"]) == 0 and "no weights locked yet" in capsys.readouterr().out
    assert main(["lock", NAME]) == 0
    digest = zoo.hub.sha256_file(dino)
    assert digest in capsys.readouterr().out and zoo.lock.read()[NAME].sha256 == digest
    assert main(["lock", "--check"]) == 0 and "1 of 1 locked files check out" in capsys.readouterr().out
    dino.write_bytes(dino.read_bytes()[:-1] + b"\x01")
    assert main(["lock", "--check"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["lock", NAME]) == 2  # a plain `zoo lock` refuses the changed file, naming both hashes
    assert digest in capsys.readouterr().err
    assert main(["lock", NAME, "--update"]) == 0  # the change was intended: accept it
    assert zoo.lock.read()[NAME].sha256 == zoo.hub.sha256_file(dino) != digest
    assert main(["lock", "--check"]) == 0


def test_zoo_lock_file_option_writes_a_project_lock(dino, tmp_path, capsys):
    target = tmp_path / "proj" / "zoo.lock"
    assert main(["lock", NAME, "--file", str(target)]) == 0
    assert NAME in zoo.lock.read(target)


def test_zoo_lock_bad_input_is_one_line(capsys, isolated_zoo_home):
    assert main(["lock"]) == 2 and "needs NAME" in capsys.readouterr().err
    assert main(["lock", "vit_small_patch16_224.dnio"]) == 2
    assert "did you mean: vit_small_patch16_224.dino" in capsys.readouterr().err
    assert main(["lock", "vit_small_patch16_224.poa"]) == 2 and "zoo convert" in capsys.readouterr().err
    (isolated_zoo_home / "zoo.lock").parent.mkdir(parents=True, exist_ok=True)
    (isolated_zoo_home / "zoo.lock").write_text("{not json")
    assert main(["lock", "--check"]) == 2 and "not valid JSON" in capsys.readouterr().err


def test_zoo_list_pretrained_shows_sources_pins_and_reported_numbers(dino, capsys):
    assert main(["list", "--pretrained"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("vit_base_patch16_224.mae "))
    assert "hf-hub:timm/vit_base_patch16_224.mae/model.safetensors" in row and "unpinned" in row and "83.6" in row
    assert next(line for line in out.splitlines() if line.startswith("dit_small_patch2_256.tstitch ")).split()[3] == "manual"
    zoo.load(NAME, depth=1)
    assert main(["list", "--pretrained", NAME]) == 0
    assert "locked" in capsys.readouterr().out
    assert main(["info", "vit_small_patch16_224.poa"]) == 0
    assert "zoo convert teacher_checkpoint.pth" in capsys.readouterr().out


def test_the_readme_table_lists_every_entry_with_its_source_and_reported_numbers():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for e in ENTRIES:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{e.name}` |")
                    and f"| {e.converter} | {e.license} |" in line), None)
        assert row is not None, f"README's pretrained table has no row for {e.name}"
        assert (e.location if not e.is_manual else "manual" if "drive" in e.manual["where"] or "hugging" in
                e.manual["where"] else "not released") in row
        assert all(str(v) in row for v in e.reported.values()), row
