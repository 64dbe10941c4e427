"""The hub: publish/load round trips, files, pickles, mismatches, pinned URLs, hf-hub, timm, open_clip.

Nothing here reaches the network: remote sources are an HTTP server on 127.0.0.1 started by the
test, and Hugging Face caches built by hand under tmp_path with the hub forced offline.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import zoo
import zoo.cli
import zoo.hub
import zoo.pretrained
from hf_cache import make_hf_cache
from zoo.errors import (
    CheckpointMismatchError,
    ChecksumError,
    ConfigError,
    DownloadError,
    UnknownNameError,
    UnsafeCheckpointError,
    ZooError,
)

ARCH = "vit_nano_patch4_32"
NAME = f"{ARCH}.hubtest"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fixed_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, 32, 32, generator=g)


@torch.no_grad()
def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if not p.is_dir()) if Path(path).exists() else []


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def home(isolated_zoo_home) -> Path:
    """This test's ZOO_HOME (conftest gives every test its own, and an offline empty HF cache)."""
    assert zoo.hub.zoo_home() == isolated_zoo_home
    return isolated_zoo_home


@pytest.fixture
def hf_cache(home) -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


@pytest.fixture
def published(home):
    """A randomly initialised vit_nano_patch4_32 published to the store as NAME."""
    torch.manual_seed(1234)
    model = zoo.create_model(ARCH).eval()
    card = {"recipe": "mae_fractal", "data": "fractaldb-tiny", "steps": 100,
            "eval": {"digits": {"knn_top1": 91.25}}, "description": "hub test"}
    path = zoo.publish(model, NAME, card)
    x = fixed_input()
    weights = path / "model.safetensors"
    return SimpleNamespace(model=model, name=NAME, dir=path, weights=weights, sha256=sha256_of(weights),
                           x=x, out=forward(model, x))


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving `root`, counting requests per path.

    `/truncated/FILE` announces FILE's full Content-Length, sends half of it and closes.
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        srv = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                srv.requests.append(self.path)
                if self.path.startswith("/truncated/"):
                    data = (root / self.path.removeprefix("/truncated/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def count(self, path: str) -> int:
        return sum(p == path for p in self.requests)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(root)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


@pytest.fixture
def served(server, published):
    """The published model's weights file served at `server.url + '/model.safetensors'`."""
    shutil.copy(published.weights, server.root / "model.safetensors")
    return SimpleNamespace(server=server, url=f"{server.url}/model.safetensors", model=published)


# -- 1. publish -> load by store name ------------------------------------------------------------
def test_publish_load_round_trip_identical_outputs(published):
    loaded = zoo.load(published.name)
    assert not loaded.training
    assert torch.equal(forward(loaded, published.x), published.out)
    # the round trip is not vacuous: a fresh init gives other outputs
    assert not torch.equal(forward(zoo.create_model(ARCH).eval(), published.x), published.out)
    assert loaded.zoo_card["name"] == published.name
    assert NAME in zoo.hub.store_names() and NAME in zoo.list_models(pretrained=True)


def test_card_contents(published):
    card = json.loads((published.dir / "config.json").read_text())
    assert card["format"] == zoo.hub.CARD_FORMAT
    assert card["name"] == NAME
    assert card["arch"] == ARCH
    assert card["args"] == {}
    assert card["params"] == sum(p.numel() for p in published.model.parameters())
    pcfg = card["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32]
    assert pcfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pcfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    prov = card["provenance"]
    assert prov["recipe"] == "mae_fractal" and prov["data"] == "fractaldb-tiny" and prov["steps"] == 100
    assert "git_commit" in prov and prov["created"] and prov["zoo_version"] == zoo.__version__
    assert card["eval"] == {"digits": {"knn_top1": 91.25}}
    assert card["description"] == "hub test"
    assert card["weights_sha256"] == sha256_of(published.weights) == published.sha256
    assert zoo.hub.read_card(NAME) == card
    # the same card travels inside the safetensors metadata (without the file's own hash)
    meta = zoo.hub._safetensors_card(published.weights)
    assert meta == {k: v for k, v in card.items() if k != "weights_sha256"}


def test_publish_records_args_and_rebuilds_with_them(home):
    model = zoo.create_model(ARCH, num_classes=10).eval()
    zoo.publish(model, f"{ARCH}.cls10")
    card = zoo.hub.read_card(f"{ARCH}.cls10")
    assert card["args"] == {"num_classes": 10} and card["pretrained_cfg"]["num_classes"] == 10
    loaded = zoo.load(f"{ARCH}.cls10")
    x = fixed_input()
    out = forward(loaded, x)
    assert out.shape == (2, 10) and torch.equal(out, forward(model, x))


def test_publish_existing_name_needs_overwrite(published):
    other = zoo.create_model(ARCH).eval()
    with pytest.raises(ZooError, match="overwrite"):
        zoo.publish(other, NAME)
    assert torch.equal(forward(zoo.load(NAME), published.x), published.out)  # untouched
    zoo.publish(other, NAME, overwrite=True)
    assert torch.equal(forward(zoo.load(NAME), published.x), forward(other, published.x))
    # no leftovers of the swap in the store
    assert sorted(p.name for p in zoo.hub.store_dir().iterdir()) == [NAME]


@pytest.mark.parametrize("bad", ["", "a/b", "../escape", ".hidden", "a b", "a.b.c", "name/"])
def test_publish_invalid_name(home, bad):
    with pytest.raises(ZooError, match="invalid model name"):
        zoo.publish(zoo.create_model(ARCH), bad)
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_publish_refuses_foreign_model_and_unknown_card_key(home):
    with pytest.raises(ZooError, match="create_model"):
        zoo.publish(torch.nn.Linear(2, 2), f"{ARCH}.foreign")
    with pytest.raises(ConfigError, match="recipe"):
        zoo.publish(zoo.create_model(ARCH), f"{ARCH}.typo", {"recpie": "mae"})


def test_corrupted_store_weights_checksum_error(published):
    data = bytearray(published.weights.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # flip bytes inside the tensor data
        data[i] ^= 0xFF
    published.weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="corrupt"):
        zoo.load(NAME)


# -- 2. local directories and files --------------------------------------------------------------
def test_load_from_directory_outside_store(home, tmp_path):
    torch.manual_seed(5)
    model = zoo.create_model(ARCH).eval()
    d = zoo.publish(model, "mine", root=tmp_path / "elsewhere")
    assert d == tmp_path / "elsewhere" / "mine"
    assert not (home / "models").exists()
    x = fixed_input()
    loaded = zoo.load(str(d))
    assert torch.equal(forward(loaded, x), forward(model, x))
    assert torch.equal(forward(zoo.load(d), x), forward(model, x))  # os.PathLike too


def test_load_bare_safetensors_with_card_in_metadata(published, tmp_path):
    f = tmp_path / "loose" / "weights.safetensors"
    f.parent.mkdir()
    shutil.copy(published.weights, f)  # no config.json beside it
    loaded = zoo.load(str(f))
    assert torch.equal(forward(loaded, published.x), published.out)
    assert loaded.zoo_card["arch"] == ARCH


def test_load_safetensors_without_card_needs_arch(published, tmp_path):
    f = tmp_path / "nocard.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(published.weights), f)
    with pytest.raises(ConfigError, match="arch="):
        zoo.load(str(f))
    loaded = zoo.load(str(f), arch=ARCH)
    assert torch.equal(forward(loaded, published.x), published.out)


def test_load_corrupt_safetensors_file(tmp_path):
    f = tmp_path / "garbage.safetensors"
    f.write_bytes(b"\x00" * 3 + b"not a safetensors file")
    with pytest.raises(ZooError):
        zoo.load(str(f), arch=ARCH)


# -- 3. pickles ----------------------------------------------------------------------------------
def test_pth_state_dict_loads_weights_only(published, tmp_path):
    p = tmp_path / "ckpt.pth"
    torch.save({"model": published.model.state_dict()}, p)
    loaded = zoo.load(str(p), arch=ARCH)
    assert torch.equal(forward(loaded, published.x), published.out)
    # DDP prefixes are stripped too
    p2 = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in published.model.state_dict().items()}}, p2)
    assert torch.equal(forward(zoo.load(p2, arch=ARCH), published.x), published.out)


def test_pth_with_namespace_is_unsafe_then_convert(published, tmp_path, capsys):
    p = tmp_path / "mae_checkpoint.pth"
    args = argparse.Namespace(model="mae_vit_nano", lr=1.5e-4, epochs=800)
    torch.save({"model": published.model.state_dict(), "optimizer": {}, "epoch": 3, "args": args}, p)
    with pytest.raises(UnsafeCheckpointError) as ei:
        zoo.load(str(p), arch=ARCH)
    msg = str(ei.value)
    assert "zoo convert" in msg and "--trust-pickle" in msg and str(p) in msg
    assert isinstance(ei.value, ZooError)

    out = tmp_path / "converted.safetensors"
    assert zoo.cli.main(["convert", str(p), str(out), "--arch", ARCH, "--trust-pickle"]) == 0
    assert out.is_file() and not Path(str(out) + ".part").exists()
    loaded = zoo.load(str(out))
    assert torch.equal(forward(loaded, published.x), published.out)
    assert loaded.zoo_card["arch"] == ARCH
    assert loaded.zoo_card["provenance"]["converted_from"] == p.name

    # without --trust-pickle, convert refuses with the same advice and a nonzero status
    capsys.readouterr()
    assert zoo.cli.main(["convert", str(p), str(tmp_path / "x.safetensors"), "--arch", ARCH]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# -- 4. mismatched state dicts -------------------------------------------------------------------
def test_wrong_arch_names_misshaped_keys(published):
    with pytest.raises(CheckpointMismatchError) as ei:
        zoo.load(str(published.weights), arch="vit_tiny_patch4_32")
    msg = str(ei.value)
    assert "mis-shaped" in msg
    assert "cls_token (1, 1, 128) vs model (1, 1, 192)" in msg
    assert "vit_tiny_patch4_32" in msg
    # mis-shaped keys are refused even non-strictly
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        zoo.load(str(published.weights), arch="vit_tiny_patch4_32", strict=False)


def _save_sd(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_missing_key_named_and_strict_false_allows_it(published, tmp_path):
    sd = safetensors.torch.load_file(published.weights)
    removed = sd.pop("blocks.2.mlp.fc1.weight")
    f = _save_sd(tmp_path / "missing.safetensors", sd)
    with pytest.raises(CheckpointMismatchError) as ei:
        zoo.load(str(f), arch=ARCH)
    msg = str(ei.value)
    assert "1 missing: blocks.2.mlp.fc1.weight" in msg
    assert " unexpected: " not in msg and " mis-shaped: " not in msg

    loaded = zoo.load(str(f), arch=ARCH, strict=False)
    got = loaded.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert got["blocks.2.mlp.fc1.weight"].shape == removed.shape
    assert not torch.equal(got["blocks.2.mlp.fc1.weight"], removed)  # left at its random init


def test_unexpected_key_named_and_refused_even_non_strict(published, tmp_path):
    sd = safetensors.torch.load_file(published.weights)
    sd["blocks.0.attn.extra_scale"] = torch.ones(3)
    f = _save_sd(tmp_path / "extra.safetensors", sd)
    with pytest.raises(CheckpointMismatchError) as ei:
        zoo.load(str(f), arch=ARCH)
    msg = str(ei.value)
    assert "1 unexpected: blocks.0.attn.extra_scale" in msg
    assert " missing: " not in msg and " mis-shaped: " not in msg
    # strict=False skips missing keys only: a key the model does not have is still refused
    with pytest.raises(CheckpointMismatchError, match="blocks.0.attn.extra_scale"):
        zoo.load(str(f), arch=ARCH, strict=False)


def test_foreign_key_names_not_loaded_silently_non_strict(published, tmp_path):
    """A dict whose names do not match at all must not load as 'nothing' under strict=False."""
    sd = {f"encoder.{k}": v for k, v in safetensors.torch.load_file(published.weights).items()}
    f = _save_sd(tmp_path / "foreign.safetensors", sd)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        zoo.load(str(f), arch=ARCH, strict=False)


# -- 5. unknown names ----------------------------------------------------------------------------
def test_unknown_name_suggests_close_match(home):
    with pytest.raises(UnknownNameError) as ei:
        zoo.load("vit_nano_patch4_3")
    assert isinstance(ei.value, ZooError) and isinstance(ei.value, KeyError)
    msg = str(ei.value)
    assert "vit_nano_patch4_32" in msg and "did you mean" in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr


def test_bare_arch_name_points_to_create_model(published):
    with pytest.raises(UnknownNameError) as ei:
        zoo.load(ARCH)
    msg = str(ei.value)
    assert f"zoo.create_model('{ARCH}')" in msg
    assert NAME in msg  # and lists the published weights for it


# -- 6. pinned URLs ------------------------------------------------------------------------------
def test_url_download_verified_cached_and_not_refetched(served, home):
    digest = served.model.sha256
    loaded = zoo.load(f"{served.url}#sha256={digest}")
    assert torch.equal(forward(loaded, served.model.x), served.model.out)
    cached = home / "downloads" / digest / "model.safetensors"
    assert files_under(home / "downloads") == [cached]
    assert sha256_of(cached) == digest
    assert served.server.count("/model.safetensors") == 1

    again = zoo.load(f"{served.url}#sha256={digest}")
    assert torch.equal(forward(again, served.model.x), served.model.out)
    assert served.server.count("/model.safetensors") == 1  # served from the cache
    # the sha256= keyword pins it as well
    zoo.load(served.url, sha256=digest.upper())
    assert served.server.count("/model.safetensors") == 1


def test_url_corrupt_cache_entry_is_fetched_again(served, home):
    digest = served.model.sha256
    path = zoo.hub.download(f"{served.url}#sha256={digest}")
    path.write_bytes(b"tampered")
    assert zoo.hub.download(f"{served.url}#sha256={digest}") == path
    assert sha256_of(path) == digest
    assert served.server.count("/model.safetensors") == 2


def test_url_wrong_sha256_refused_and_nothing_left(served, home):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumError) as ei:
        zoo.load(f"{served.url}#sha256={wrong}")
    assert wrong in str(ei.value) and served.model.sha256 in str(ei.value)
    assert files_under(home / "downloads") == []
    assert not (home / "downloads" / wrong).exists()


def test_url_without_sha256_refused_before_fetching(served, home):
    with pytest.raises(ZooError, match="sha256"):
        zoo.load(served.url)
    with pytest.raises(ZooError, match="sha256"):
        zoo.load(f"{served.url}#sha256=abc123")  # not 64 hex digits
    assert served.server.requests == []
    assert files_under(home / "downloads") == []


def test_url_404_is_download_error(server, home):
    digest = "0" * 64
    with pytest.raises(DownloadError, match="404"):
        zoo.load(f"{server.url}/nope.safetensors#sha256={digest}")
    assert files_under(home / "downloads") == []


def test_url_truncated_transfer_is_download_error(served, home):
    digest = served.model.sha256
    with pytest.raises(DownloadError):
        zoo.load(f"{served.server.url}/truncated/model.safetensors#sha256={digest}")
    assert served.server.count("/truncated/model.safetensors") == 1
    assert files_under(home / "downloads") == []


def test_url_connection_refused_is_download_error(home):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError):
        zoo.load(f"http://127.0.0.1:{port}/model.safetensors#sha256={'1' * 64}")
    assert files_under(home / "downloads") == []


# -- 7. registered weights -----------------------------------------------------------------------
def test_register_weights_then_load_by_name(served, home):
    name = f"{ARCH}.remote_hubtest"
    try:
        zoo.register_weights(name, served.url, sha256=served.model.sha256)
        assert name in zoo.list_models(pretrained=True)
        loaded = zoo.load(name)
        assert torch.equal(forward(loaded, served.model.x), served.model.out)
        assert served.server.count("/model.safetensors") == 1
        assert (home / "downloads" / served.model.sha256 / "model.safetensors").is_file()
    finally:
        zoo.pretrained.unregister(name)
    assert zoo.pretrained.find(name) is None


def test_register_weights_url_must_be_pinned(served):
    name = f"{ARCH}.unpinned_hubtest"
    try:
        with pytest.raises(ZooError, match="sha256"):
            zoo.register_weights(name, served.url)
        assert zoo.pretrained.find(name) is None
    finally:
        zoo.pretrained.unregister(name)


# -- 8. hf-hub -----------------------------------------------------------------------------------
def test_hf_hub_from_local_cache(published, hf_cache):
    commit = make_hf_cache(hf_cache, "zoo-test/vit-nano-hubtest",
                           {"config.json": published.dir / "config.json", "model.safetensors": published.weights})
    loaded = zoo.load("hf-hub:zoo-test/vit-nano-hubtest")
    assert torch.equal(forward(loaded, published.x), published.out)
    assert loaded.zoo_source == "hf-hub:zoo-test/vit-nano-hubtest"
    # a pinned revision resolves to the same snapshot
    pinned = zoo.load(f"hf-hub:zoo-test/vit-nano-hubtest@{commit}")
    assert torch.equal(forward(pinned, published.x), published.out)
    # and it really was read from this cache: without it the repo is gone
    shutil.rmtree(hf_cache / "models--zoo-test--vit-nano-hubtest")
    with pytest.raises(DownloadError):
        zoo.load("hf-hub:zoo-test/vit-nano-hubtest")


def test_hf_hub_repo_not_in_cache(hf_cache):
    with pytest.raises(DownloadError) as ei:
        zoo.load("hf-hub:zoo-test/not-cached")
    assert isinstance(ei.value, ZooError)
    assert "zoo-test/not-cached" in str(ei.value)


# -- 9. timm -------------------------------------------------------------------------------------
def test_timm_random_init(home):
    import timm

    model = zoo.load("timm:resnet18", pretrained=False)
    assert isinstance(model, timm.models.ResNet)
    assert not model.training
    assert model.zoo_source == "timm:resnet18"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_unknown_model(home):
    with pytest.raises(UnknownNameError) as ei:
        zoo.load("timm:not_a_model_xyz")
    assert isinstance(ei.value, ZooError)


def test_timm_pretrained_from_local_hf_cache(hf_cache):
    import timm

    hf_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    assert hf_id
    torch.manual_seed(99)
    ref = timm.create_model("resnet18", pretrained=False)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    data = safetensors.torch.save(sd)
    make_hf_cache(hf_cache, hf_id, {"model.safetensors": data})
    model = zoo.load("timm:resnet18")
    assert not model.training
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_timm_pretrained_not_cached_offline_is_download_error(hf_cache):
    with pytest.raises(DownloadError, match="timm:resnet18"):
        zoo.load("timm:resnet18")


# -- 10. open_clip -------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip(tmp_path):
    """A tiny open_clip config registered for the test, unregistered afterwards."""
    import open_clip
    import open_clip.factory as ocf

    name = "zoo-hubtest-tiny-clip"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    try:
        assert name in open_clip.list_models()
        yield name
    finally:
        ocf._MODEL_CONFIG_PATHS.remove(path)
        ocf._MODEL_CONFIGS.pop(name, None)
    assert name not in open_clip.list_models()


def test_open_clip_needs_tag_and_lists_tags(home):
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model("RN50")
    assert tags
    with pytest.raises(ZooError) as ei:
        zoo.load("open_clip:RN50")
    msg = str(ei.value)
    assert "pretrained=False" in msg
    for tag in tags:
        assert tag in msg


def test_open_clip_random_init(tiny_clip):
    import open_clip

    model = zoo.load(f"open_clip:{tiny_clip}", pretrained=False)
    assert isinstance(model, open_clip.CLIP)
    assert not model.training
    assert model.zoo_card["arch"] == f"open_clip:{tiny_clip}"
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32)


def test_open_clip_unknown_arch(home):
    with pytest.raises(UnknownNameError) as ei:
        zoo.load("open_clip:NotAClipModel-XYZ/openai")
    assert isinstance(ei.value, ZooError)


# -- 11. free-form card fields ---------------------------------------------------------------------
def test_card_free_form_fields_round_trip(home):
    torch.manual_seed(3)
    model = zoo.create_model(ARCH).eval()
    extra = {"tags": ["mae", "fractals"], "notes": "CPU run", "paper": "arXiv:2111.06377", "date": "2024-05-01",
             "width": 128, "lineage": {"teacher": "vit_tiny_patch4_32.dino", "stage": 2}}
    path = zoo.publish(model, f"{ARCH}.freeform", {"recipe": "mae", "license": "MIT", **extra})
    card = zoo.hub.read_card(f"{ARCH}.freeform")
    for key, value in extra.items():
        assert card[key] == value, key
    assert card["license"] == "MIT" and card["provenance"]["recipe"] == "mae"
    assert zoo.hub._safetensors_card(path / "model.safetensors")["lineage"] == extra["lineage"]
    assert zoo.load(f"{ARCH}.freeform").zoo_card["tags"] == ["mae", "fractals"]
    # the zoo fields stay as they were: a free-form field does not displace them
    assert card["arch"] == ARCH and card["args"] == {} and card["eval"] == {}


@pytest.mark.parametrize("card, match", [
    ({"steps": "100"}, "'steps' must be int"),
    ({"eval": [91.2]}, "'eval' must be dict"),
    ({"description": 3}, "'description' must be str"),
    ({"steps": True}, "'steps' must be int"),
    ({"arch": "vit_base_patch16_224"}, "written by zoo"),
    ({"model_args": {}}, "written by zoo"),
    ({"licence": "MIT"}, "typo of 'license'"),
    ({"evals": {}}, "typo of 'eval'"),
    ({"tags": {1, 2}}, "JSON"),
], ids=["steps-str", "eval-list", "description-int", "steps-bool", "arch", "model_args", "licence", "evals", "set"])
def test_card_known_keys_keep_their_validation(home, card, match):
    with pytest.raises(ConfigError, match=match):
        zoo.publish(zoo.create_model(ARCH), f"{ARCH}.badcard", card)
    assert not (home / "models" / f"{ARCH}.badcard").exists()


# -- 12. zoo info PATH -----------------------------------------------------------------------------
def test_info_accepts_folder_and_weights_file(published, tmp_path, capsys):
    capsys.readouterr()
    assert zoo.cli.main(["info", str(published.dir)]) == 0
    out = capsys.readouterr().out
    assert f"name: {NAME}" in out and f"arch: {ARCH}" in out and "description: hub test" in out

    assert zoo.cli.main(["info", str(published.weights), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["arch"] == ARCH and rec["file"] == str(published.weights) and rec["eval"]["digits"]["knn_top1"] == 91.25

    bare = _save_sd(tmp_path / "bare.safetensors", safetensors.torch.load_file(published.weights))
    assert zoo.cli.main(["info", str(bare), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["params"] == sum(p.numel() for p in published.model.parameters()) and "arch=" in rec["arch"]

    assert zoo.cli.main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such" in capsys.readouterr().err


def test_info_reads_a_timm_folder(tmp_path, capsys):
    import timm

    twin = timm.create_model("test_vit", pretrained=False, num_classes=2)
    timm.models.save_for_hf(twin, tmp_path / "timm_folder", safe_serialization=True)
    capsys.readouterr()
    assert zoo.cli.main(["info", str(tmp_path / "timm_folder"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "timm" and rec["arch"] == "timm:test_vit" and rec["num_classes"] == 2
