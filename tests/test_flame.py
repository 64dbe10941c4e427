"""FLAME and its language models: the facet pass equals separate calls, cached embeddings equal on-the-fly ones,
the loss equals a direct computation (and SigLIP's for one positive), a FLAME step never runs the LM, zoo LMs
publish as transformers folders and load from the Hub offline, and bad input gets one-line errors."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.data.builtin import generate
from zoo.data.writer import write_shards
from zoo.errors import ConfigError, UnknownNameError, ZooError
from zoo.eval.text_embedding import embed_text_shards
from zoo.models.flame import FacetTokenizer, clean_caption, facet_embeddings
from zoo.models.lm import train_tokenizer
from zoo.recipes.flame import multi_positive_sigmoid_loss

LM_NAME = "llama_nano.test_captions"
CAPTIONS = {"raw": "noisy", "short": "exact", "long": "long"}


@pytest.fixture(scope="module")
def scenes():
    return list(generate("scenes", 12, seed=0, size=16))


@pytest.fixture(scope="module")
def tiny_lm(scenes):
    """A random-weight llama_nano with a tokenizer trained on a few scenes' captions (and the prompts' words)."""
    from zoo.recipes.lm import builtin_corpus

    tok = train_tokenizer(builtin_corpus(40), 400)
    torch.manual_seed(0)
    lm = zoo.create_model("llama_nano", vocab_size=len(tok), num_hidden_layers=3).eval()
    lm.tokenizer = tok
    return lm


def _separate(lm, ids: list[int], positions: list[int], layer: int) -> torch.Tensor:
    out = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), output_hidden_states=True)
    return F.normalize(out.hidden_states[layer][0, -1].float(), dim=-1)


@pytest.mark.parametrize("positions", ["restart", "sequential"])
def test_facet_mask_equals_separate_calls(tiny_lm, scenes, positions):
    """All facets of a batch of captions of different lengths (left-padded) in one pass = one call per caption and
    facet on [prefix, that facet] with the position ids the mask implies."""
    tok = FacetTokenizer(tiny_lm.tokenizer, "long", positions=positions)
    captions = [s["meta"]["captions"][k] for s, k in zip(scenes[:3], ("long", "exact", "short"))]
    batch = tok(captions)
    assert batch["attention_mask"].shape[-2:] == (batch["input_ids"].shape[1],) * 2
    with torch.no_grad():
        together = facet_embeddings(tiny_lm, batch, layer=2)
        assert together.shape == (3, 7, 128)
        for r, caption in enumerate(captions):
            prefix = tok.prefix_ids(caption)
            before = 0
            for f, piece in enumerate(tok.facet_ids):
                start = len(prefix) + (before if positions == "sequential" else 0)
                pos = list(range(len(prefix))) + list(range(start, start + len(piece)))
                alone = _separate(tiny_lm, prefix + piece, pos, layer=2)
                torch.testing.assert_close(together[r, f], alone, atol=2e-5, rtol=1e-4)
                before += len(piece)
    # the mask really decouples: without it (plain causal) facet 2 sees facet 1 and changes
    causal = dict(batch)
    causal["attention_mask"] = torch.ones_like(batch["attention_mask"]).tril() & batch["attention_mask"].any(-2, keepdim=True)
    with torch.no_grad():
        mixed = facet_embeddings(tiny_lm, type(batch)(causal), layer=2)
    assert not torch.allclose(mixed[:, 1], together[:, 1], atol=1e-3)


def test_prompts_follow_flame(tiny_lm):
    assert clean_caption('a "red" circle?') == "a 'red' circle."
    assert clean_caption("two squares") == "two squares."
    head, pieces = __import__("zoo.models.flame", fromlist=["PROMPTS"]).PROMPTS["long"].texts("a red circle")
    assert head == 'Detailed Image description : "a red circle." . After thinking step by step ,'
    assert pieces[0] == ' <s> this image description means in just one word:"' and len(pieces) == 7
    assert all(p.endswith('means in just one word:"') for p in pieces)
    limit = sum(map(len, FacetTokenizer(tiny_lm.tokenizer, "long").facet_ids)) + 40
    tok = FacetTokenizer(tiny_lm.tokenizer, "long", max_length=limit)  # long captions are cut inside the caption
    ids = tok.prefix_ids("word " * 200)
    assert len(ids) + sum(map(len, tok.facet_ids)) <= limit
    assert tiny_lm.tokenizer.decode(ids).endswith('word" . After thinking step by step ,')


def _shards(scenes, folder: Path) -> str:
    write_shards(iter(scenes), folder, maxcount=5)
    return str(folder / "*.tar")


def test_cached_embeddings_equal_on_the_fly(tiny_lm, scenes, tmp_path):
    data = _shards(scenes, tmp_path / "raw")
    rep = embed_text_shards(tiny_lm, data, tmp_path / "emb", captions=CAPTIONS, batch_size=4, lm_name="tiny")
    assert rep["samples"] == 12 and rep["shards"] == 3 and rep["n_facets"] == 11
    info = json.loads((tmp_path / "emb" / "dataset.json").read_text())["text_embedding"]
    assert info["layout"] == [["raw", 1], ["short", 3], ["long", 7]] and info["dim"] == 128
    members = {}
    for shard in sorted((tmp_path / "emb").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    originals = {}
    for shard in sorted((tmp_path / "raw").glob("*.tar")):
        with tarfile.open(shard) as tar:
            originals.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert all(members[k] == v for k, v in originals.items())  # every member copied byte for byte
    with torch.no_grad():
        for s in scenes[:4]:
            rows = np.load(__import__("io").BytesIO(members[f"{s['__key__']}.flame.npy"]))
            assert rows.dtype == np.float16 and rows.shape == (11, 128)
            caps = s["meta"]["captions"]
            fresh = torch.cat([facet_embeddings(tiny_lm, FacetTokenizer(tiny_lm.tokenizer, k)([caps[c]]))[0]
                               for k, c in CAPTIONS.items()])
            torch.testing.assert_close(torch.from_numpy(rows).float(), fresh, atol=2e-3, rtol=0)
            assert np.allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1, atol=2e-3)


def test_embed_text_leaves_nothing_half_written_and_resumes(tiny_lm, scenes, tmp_path, monkeypatch):
    from zoo.eval import text_embedding

    data = _shards(scenes, tmp_path / "raw")
    calls = Counter()
    real = text_embedding._Embedder.__call__

    def fail_in_second_shard(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(self, texts)

    monkeypatch.setattr(text_embedding._Embedder, "__call__", fail_in_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        embed_text_shards(tiny_lm, data, tmp_path / "emb", captions=CAPTIONS, batch_size=3, lm_name="tiny")
    out = tmp_path / "emb"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"] and not list(out.glob(".*.part"))
    monkeypatch.setattr(text_embedding._Embedder, "__call__", real)
    rep = embed_text_shards(tiny_lm, data, out, captions=CAPTIONS, batch_size=3, lm_name="tiny")
    assert rep["kept_from_earlier_run"] == 1 and rep["samples"] == 12
    with pytest.raises(ZooError, match="other settings"):  # an unfinished folder resumes only the same job
        (out / ".embed-text.json").write_text(json.dumps({"info": {"lm": "another"}}))
        embed_text_shards(tiny_lm, data, out, captions=CAPTIONS, lm_name="tiny")


def test_loss_equals_direct_computation_and_siglip():
    from open_clip.loss import SigLipLoss

    torch.manual_seed(1)
    n, m, d = 5, 3, 16
    img = F.normalize(torch.randn(n, d), dim=-1)
    txt = F.normalize(torch.randn(n * m, d), dim=-1)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    direct = 0.0
    for i in range(n):
        for j in range(n * m):
            y = 1.0 if j // m == i else -1.0
            direct -= math.log(1 / (1 + math.exp(-y * (t * img[i] @ txt[j] + b).item())))
    ours = multi_positive_sigmoid_loss(img, txt, t, b, positives=m)
    assert ours.item() == pytest.approx(direct / (n * m), rel=1e-5)
    one = F.normalize(torch.randn(n, d), dim=-1)
    assert multi_positive_sigmoid_loss(img, one, t, b, 1).item() == pytest.approx(SigLipLoss()(img, one, t, b).item(), rel=1e-6)
    # another rank's images: only negatives among these texts
    far = multi_positive_sigmoid_loss(img, txt, t, b, m, first_image=n)
    assert far.item() == pytest.approx(-F.logsigmoid(-(t * img @ txt.T + b)).sum().item() / (n * m), rel=1e-6)


@pytest.fixture
def published_lm(tiny_lm):
    zoo.publish(tiny_lm, LM_NAME, {"recipe": "test"})
    return LM_NAME


def _flame_overrides(data: str | None = None) -> list[str]:
    return [f"method.lm={LM_NAME}", "schedule.steps=3", "schedule.warmup_steps=1", "data.batch_size=4",
            "data.builtin_n=12", "data.num_workers=0", "eval.final=[]", "output.plots=false",
            "output.tensorboard=false", "output.checkpoint_every=3", "output.publish=vit_tiny_patch4_32.flame_test"]


def test_a_flame_step_never_runs_the_lm(published_lm, scenes, tmp_path):
    """Training reads the cached rows: with every way to run or load an LM broken, a run still trains and publishes;
    the published whole model then embeds text through the LM by name."""
    from transformers import LlamaModel

    from zoo.engine.trainer import pretrain
    from zoo.models import lm as lm_module

    scenes32 = list(generate("scenes", 12, seed=0, size=32))
    data = _shards(scenes32, tmp_path / "raw")
    embed_text_shards(published_lm, data, tmp_path / "emb", captions=CAPTIONS)

    def boom(*a, **k):
        raise AssertionError("the LM ran during training")

    with pytest.MonkeyPatch.context() as broken:
        broken.setattr(LlamaModel, "forward", boom)
        broken.setattr(lm_module, "load_frozen_lm", boom)
        broken.setattr("zoo.models.flame.load_frozen_lm", boom)
        run = pretrain("flame_vit_tiny_patch4_32_scenes", data=str(tmp_path / "emb" / "*.tar"),
                       run_dir=tmp_path / "run", overrides=_flame_overrides())
    assert run.steps == 3 and all(math.isfinite(m["loss"]) for m in run.metrics)
    model = zoo.load("flame_vit_tiny_patch4_32.flame_test")
    assert not model._lm  # loading the image side does not load the LM either
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 32, 32))
        txt = model.encode_text(model.tokenizer(["a red circle", "a blue star"]))
        long = model.encode_text(model.text_tokenizer("long")(["a red circle on a striped background."]))
    assert img.shape == txt.shape == (2, 128) and long.shape == (1, 128) and model._lm


def test_flame_bad_input_errors(published_lm, scenes, tmp_path):
    from zoo.engine.trainer import pretrain

    raw = _shards(list(generate("scenes", 12, seed=0, size=32)), tmp_path / "raw")
    with pytest.raises(ZooError, match=r"no flame\.npy member .*`zoo embed-text --lm llama_nano\.test_captions"):
        pretrain("flame_vit_tiny_patch4_32_scenes", data=raw, run_dir=tmp_path / "a", overrides=_flame_overrides())
    embed_text_shards(published_lm, raw, tmp_path / "short_only", captions={"raw": "noisy", "short": "exact"})
    with pytest.raises(ZooError, match=r"holds \(4, 128\) per sample, the recipe needs \(11, 128\)"):
        pretrain("flame_vit_tiny_patch4_32_scenes", data=str(tmp_path / "short_only" / "*.tar"), run_dir=tmp_path / "b",
                 overrides=_flame_overrides())
    with pytest.raises(ConfigError, match="cannot load the language model 'nope.lm'"):
        pretrain("flame_vit_tiny_patch4_32_scenes", data=raw, run_dir=tmp_path / "c",
                 overrides=[*_flame_overrides(), "method.lm=nope.lm"])
    with pytest.raises(UnknownNameError, match=r"language model 'nope.lm' not found \(not in the zoo store"):
        embed_text_shards("nope.lm", raw, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ConfigError, match="positives must be in 1..11"):
        pretrain("flame_vit_tiny_patch4_32_scenes", data=raw, run_dir=tmp_path / "e",
                 overrides=[*_flame_overrides(), "method.positives=12"])


def test_zoo_lm_is_a_transformers_folder_and_loads_from_the_hub_offline(tiny_lm, tmp_path):
    import huggingface_hub.constants as hf_constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zoo.publish(tiny_lm, "llama_nano.roundtrip")
    ids = torch.tensor([tiny_lm.tokenizer("a red circle").input_ids])
    with torch.no_grad():
        want = tiny_lm(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, want)
        again = zoo.load("llama_nano.roundtrip")
        assert torch.equal(again(ids).logits, want)
    assert AutoTokenizer.from_pretrained(folder)("a red circle").input_ids == ids[0].tolist()
    assert again.tokenizer("a red circle").input_ids == ids[0].tolist() and again.tokenizer.padding_side == "left"

    # a transformers save_pretrained folder, in a Hugging Face cache laid out as the Hub's: zoo.load("hf-hub:...")
    snap = Path(hf_constants.HF_HUB_CACHE) / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    tiny_lm.save_pretrained(snap)
    tiny_lm.tokenizer.save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    for source in ("hf-hub:someone/tiny-llama", str(snap)):
        hub = zoo.load(source)
        assert hub.zoo_card["format"] == "transformers" and not hub.training
        with torch.no_grad():
            torch.testing.assert_close(hub(ids).logits, want)
    with pytest.raises(ZooError, match="only dtype= may be given"):
        zoo.load(str(snap), num_classes=3)
    assert zoo.load(str(snap), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_lm_corpus_asks_flames_questions_and_answers_from_the_metadata(scenes):
    import random

    from zoo.models.flame import PROMPTS
    from zoo.recipes.lm import corpus_segments, scene_answers

    meta = next(s["meta"] for s in scenes if len(s["meta"]["objects"]) >= 2)
    main, minor = meta["objects"][:2]
    answers = scene_answers(meta)
    assert answers == (main["shape"], main["shape"], main["color"], minor["shape"], minor["color"], "nothing",
                       meta["background"])
    rng = random.Random(0)
    for _ in range(10):
        head, *facets = corpus_segments(meta, rng, qa_fraction=1.0, kinds=("exact",))
        prompt = next(p for p in PROMPTS.values() if head == p.texts(meta["captions"][{"raw": "exact", "short":
                                                                                         "short", "long": "long"}[p.name]])[0])
        assert facets == [piece + a + '"' for piece, a in zip(prompt.texts("x")[1], answers)]
    assert corpus_segments(meta, rng, qa_fraction=0.0, kinds=("long",)) == [meta["captions"]["long"]]


def test_lm_packed_facets_train_as_separate_texts(tiny_lm, scenes):
    """One packed text (prefix + every answered facet, FLAME's mask and positions) gives each answer token the
    logits it gets in its own text [prefix, facet]; the token after another facet is not a target."""
    from zoo.recipes.lm import TextSampler, pack

    sample = next(s for s in scenes if len(s["meta"]["objects"]) >= 2)
    torch.manual_seed(3)
    sampler = TextSampler(tiny_lm.tokenizer, 400, qa_fraction=1.0, kinds=("exact",))
    item = sampler(sample)
    segs = item["segments"].tolist()
    assert len(segs) >= 2 and sum(segs) == len(item["input_ids"])
    batch = pack([item, {"input_ids": item["input_ids"][:5], "segments": torch.tensor([5])}], tiny_lm.tokenizer.pad_token_id)
    assert (batch["labels"][1, 5:] == -100).all()
    with torch.no_grad():
        packed = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).logits[0]
        prefix = item["input_ids"][: segs[0]]
        start = segs[0]
        for f, length in enumerate(segs[1:], 1):
            alone = torch.cat([prefix, item["input_ids"][start : start + length]])
            logits = tiny_lm(alone[None]).logits[0]
            torch.testing.assert_close(packed[start : start + length], logits[segs[0]:], atol=1e-4, rtol=1e-4)
            assert (batch["labels"][0, start] == -100) == (f >= 2)
            start += length


def test_cli_embed_text(published_lm, scenes, tmp_path, capsys):
    from zoo.cli import main

    data = _shards(scenes, tmp_path / "raw")
    argv = ["embed-text", "--lm", published_lm, "--data", data, "--out", str(tmp_path / "emb"), "--raw-caption", "noisy",
            "--short-caption", "exact", "--long-caption", "none", "--json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 12 and rep["n_facets"] == 4 and rep["layout"] == [["raw", 1], ["short", 3]]
    assert main(argv[:-1]) == 0  # again: every shard kept, nothing recomputed
    assert "3 shard(s) kept from an earlier run" in capsys.readouterr().out
