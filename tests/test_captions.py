"""Caption tools: CLIP scores of image-caption pairs, DFN-style filtering, recaptioning (tiny random models)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.cli import main
from zoo.data.builtin import generate
from zoo.tools.captions import (
    CAPTIONERS,
    Captioner,
    CocaCaptioner,
    build_captioner,
    filter_shards,
    keep_count,
    read_scores,
    recaption,
    score_pairs,
    score_shards,
    sidecar_name,
)
from zoo.data.fields import decode_field
from zoo.data.reader import iter_raw_samples
from zoo.data.shards import expand_sources
from zoo.data.writer import write_shards
from zoo.data.transforms import named_captions
from zoo.errors import ZooError

from conftest import TINY_CLIP

TINY_COCA = "coca-zoo-test-tiny"
TINY_COCA_CFG = {  # a CoCa small enough to generate on a CPU in well under a second per batch
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


@pytest.fixture
def tiny_coca(tmp_path):
    """TINY_COCA registered with open_clip for the test, then removed."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    path = tmp_path / f"{TINY_COCA}.json"
    path.write_text(json.dumps(TINY_COCA_CFG))
    open_clip.add_model_config(path)
    try:
        yield TINY_COCA
    finally:
        factory._MODEL_CONFIG_PATHS.remove(path)
        factory._MODEL_CONFIGS.pop(TINY_COCA, None)


@pytest.fixture
def clip_model(tiny_open_clip):
    return zoo.load(f"open_clip:{TINY_CLIP}", pretrained=False)


def make_scenes(folder: Path, n: int = 20, maxcount: int = 8) -> str:
    write_shards(generate("scenes", n, seed=0, size=32), folder, maxcount=maxcount,
                 info={"name": "scenes", "classes": ["circle", "square", "triangle", "star", "cross", "ring"]})
    return str(folder / "*.tar")


def raw_by_key(pattern: str) -> dict[str, dict[str, bytes]]:
    urls = [u for s in expand_sources(pattern) for u in s]
    return {r["__key__"]: {k: bytes(v) for k, v in r.items() if not k.startswith("__")}
            for r in iter_raw_samples(urls, Counter())}


def metas(pattern: str) -> dict[str, dict]:
    return {k: json.loads(m["json"]) for k, m in raw_by_key(pattern).items()}


def assert_same_but_json(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    assert set(before) == set(after)
    for ext in before:
        if ext != "json":
            assert before[ext] == after[ext], ext


# -- score -------------------------------------------------------------------------------------------
def test_score_pairs_equals_direct_cosine_similarity(clip_model, tmp_path):
    data = make_scenes(tmp_path / "s", n=12, maxcount=5)
    clip_model.train()
    scores = score_pairs(clip_model, data, caption="exact", batch_size=5)
    assert clip_model.training  # the previous mode is restored
    assert len(scores) == 12 and scores.missing == 0 and not scores.skipped

    import open_clip

    from zoo.eval.zeroshot import default_transform

    tok, transform = open_clip.get_tokenizer(TINY_CLIP), default_transform(clip_model)
    raws = raw_by_key(data)
    clip_model.eval()
    for row in list(scores)[:4]:
        assert row.caption == "exact" and Path(row.url).suffix == ".tar"
        raw = raws[row.key]
        image = decode_field("image", "jpg", raw["jpg"])
        text = json.loads(raw["json"])["captions"]["exact"]
        assert row.text == text
        with torch.no_grad():
            img = clip_model.encode_image(transform(image)[None])
            txt = clip_model.encode_text(tok([text]))
        assert row.score == pytest.approx(float(F.cosine_similarity(img, txt)[0]), abs=1e-5)
    summary = scores.summary()
    assert summary["count"] == 12 and summary["p5"] <= summary["p50"] <= summary["p95"]


def test_list_caption_scores_first_entry_and_missing_are_counted(clip_model, tmp_path):
    def samples():
        for i, s in enumerate(generate("scenes", 9, seed=1, size=32)):
            s["meta"]["captions"]["syn"] = [] if i % 3 == 0 else [f"first {i}", f"second {i}"]
            yield s

    write_shards(samples(), tmp_path / "s")
    scores = score_pairs(clip_model, str(tmp_path / "s" / "*.tar"), caption="syn")
    assert scores.missing == 3 and len(scores) == 6
    assert all(r.text.startswith("first ") for r in scores)
    with pytest.raises(ZooError, match="has a caption 'nope'.*meta captions"):
        score_pairs(clip_model, str(tmp_path / "s" / "*.tar"), caption="nope")


def test_sidecar_and_out_shards_round_trip(clip_model, tmp_path):
    data = make_scenes(tmp_path / "s", n=10, maxcount=4)
    rec = score_shards(clip_model, data, model_name=f"open_clip:{TINY_CLIP}", caption="noisy")
    side = tmp_path / "s" / sidecar_name(f"open_clip:{TINY_CLIP}", "noisy")
    assert rec["sidecars"] == [str(side)] and side.name == f"clip_scores.open_clip_{TINY_CLIP}.noisy.jsonl"
    lines = [json.loads(line) for line in side.read_text().splitlines()]
    assert len(lines) == 10 and {"url", "key", "caption", "score"} <= set(lines[0]) and lines[0]["caption"] == "noisy"
    assert not list((tmp_path / "s").glob(".*.part"))  # written aside, then renamed

    rec = score_shards(clip_model, data, model_name="m", caption="noisy", out=tmp_path / "out", maxcount=3)
    assert rec["shards"] == 4 and rec["count"] == 10
    from_sidecar = read_scores(side, "noisy")
    before, after = raw_by_key(data), raw_by_key(str(tmp_path / "out" / "*.tar"))
    assert list(after) == list(before)  # same samples, same keys, same order
    for key, members in after.items():
        assert_same_but_json(before[key], members)
        meta, old = json.loads(members["json"]), json.loads(before[key]["json"])
        score = meta.pop("clip_score")["noisy"]
        assert meta == old
        shard = next(Path(line["url"]).name for line in lines if line["key"] == key)
        assert score == pytest.approx(from_sidecar[(shard, key)], abs=1e-6)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["classes"][0] == "circle" and info["caption_tools"][-1]["op"] == "score"


def test_cli_score_prints_summary_and_writes_sidecar(tiny_open_clip, tmp_path, capsys):
    data = make_scenes(tmp_path / "s", n=8)
    model = f"open_clip:{TINY_CLIP}"
    assert main(["captions", "score", model, "--data", data, "--caption", "exact", "--random-weights"]) == 0
    out = capsys.readouterr().out
    assert "scored 8 pairs (caption 'exact'): mean" in out and "p50" in out and "p95" in out
    assert (tmp_path / "s" / sidecar_name(model, "exact")).is_file()
    assert main(["captions", "score", model, "--data", data, "--random-weights", "--json",
                 "--out", str(tmp_path / "o")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["count"] == 8 and rec["caption"] == "caption" and rec["shards"] == 1
    assert all("caption" in m["clip_score"] for m in metas(str(tmp_path / "o" / "*.tar")).values())


# -- filter ------------------------------------------------------------------------------------------
def test_keep_count_is_the_ceiling():
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert keep_count(0.25, 10) == 3 and keep_count(0.33, 20) == 7
    assert keep_count(1.0, 7) == 7 and keep_count(1e-6, 5) == 1


def test_filter_keeps_the_top_scored_fraction(clip_model, tmp_path):
    data = make_scenes(tmp_path / "s", n=20, maxcount=8)
    score_shards(clip_model, data, model_name="m", out=tmp_path / "scored")
    scored = str(tmp_path / "scored" / "*.tar")
    scores = {k: m["clip_score"]["caption"] for k, m in metas(scored).items()}
    rep = filter_shards(scored, tmp_path / "top", 0.33, maxcount=4)
    assert rep["kept"] == 7 == math.ceil(0.33 * 20) and rep["total"] == 20
    assert rep["kept_fraction"] == pytest.approx(7 / 20) and rep["scores_from"] == "meta clip_score"
    best = sorted(scores, key=lambda k: -scores[k])[:7]
    kept = raw_by_key(str(tmp_path / "top" / "*.tar"))
    assert set(kept) == set(best) and list(kept) == sorted(kept)  # the top 7, in shard order
    assert rep["threshold"] == min(scores[k] for k in best)
    before = raw_by_key(scored)
    for key, members in kept.items():
        assert members == before[key]  # scores from the json: every member unchanged
    assert json.loads((tmp_path / "top" / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 3}
    with Image.open(rep["histogram"]) as png:
        assert Path(rep["histogram"]) == tmp_path / "top" / "scores.png" and png.size == (640, 360)


def test_filter_from_sidecar_and_model(clip_model, tmp_path):
    data = make_scenes(tmp_path / "s", n=10, maxcount=4)
    score_shards(clip_model, data, model_name="m", caption="exact")
    side = tmp_path / "s" / sidecar_name("m", "exact")
    table = read_scores(side, "exact")
    # found beside the shards, then named explicitly: the same top 5, with their score added to the json
    for kw, out in (({}, "a"), ({"scores": side}, "b")):
        rep = filter_shards(data, tmp_path / out, 0.5, caption="exact", **kw)
        assert rep["kept"] == 5 and rep["scores_from"] == f"scores file {side}"
        got = metas(str(tmp_path / out / "*.tar"))
        best = sorted(table.values(), reverse=True)[:5]
        assert sorted((m["clip_score"]["exact"] for m in got.values()), reverse=True) == best
    rep = filter_shards(data, tmp_path / "c", 0.2, caption="exact", model=clip_model)
    assert rep["kept"] == 2 and rep["scores_from"].startswith("model ")
    kept = metas(str(tmp_path / "c" / "*.tar"))
    assert sorted(m["clip_score"]["exact"] for m in kept.values()) == pytest.approx(sorted(table.values())[-2:], abs=1e-6)


def test_cli_filter(tiny_open_clip, tmp_path, capsys):
    data = make_scenes(tmp_path / "s", n=10)
    assert main(["captions", "filter", "--data", data, "--keep-top", "0.3", "--out", str(tmp_path / "f"),
                 "--model", f"open_clip:{TINY_CLIP}", "--random-weights", "--caption", "short"]) == 0
    out = capsys.readouterr().out
    assert "kept 3 of 10 pairs (30.0%, --keep-top 0.3)" in out and "scores.png" in out
    assert len(raw_by_key(str(tmp_path / "f" / "*.tar"))) == 3 and (tmp_path / "f" / "scores.png").is_file()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error: "), err
    return err


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1", "nan"])
def test_cli_filter_rejects_a_bad_fraction(tmp_path, capsys, fraction):
    data = make_scenes(tmp_path / "s", n=4)
    assert main(["captions", "filter", "--data", data, f"--keep-top={fraction}", "--out", str(tmp_path / "f")]) == 2
    assert "--keep-top must be a fraction in (0, 1]" in one_line_error(capsys)
    assert not (tmp_path / "f").exists()


def test_cli_filter_errors_on_missing_scores(clip_model, tmp_path, capsys):
    data = make_scenes(tmp_path / "s", n=6, maxcount=3)
    filt = ["captions", "filter", "--data", data, "--keep-top", "0.5"]
    assert main([*filt, "--out", str(tmp_path / "f")]) == 2
    assert "no scores for caption 'caption'" in one_line_error(capsys)
    assert main([*filt, "--out", str(tmp_path / "f"), "--scores", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in one_line_error(capsys)
    # a sidecar that covers only the first shard
    scores = score_pairs(clip_model, data)
    side = tmp_path / "partial.jsonl"
    side.write_text("".join(json.dumps(r._asdict()) + "\n" for r in scores if r.url.endswith("00000.tar")))
    assert main([*filt, "--out", str(tmp_path / "f"), "--scores", str(side)]) == 2
    assert "3 of 6 samples have no 'caption' score" in one_line_error(capsys)
    assert main([*filt, "--out", str(tmp_path / "f"), "--scores", str(side), "--caption", "exact"]) == 2
    assert "holds scores of caption 'caption', not 'exact'" in one_line_error(capsys)
    assert main([*filt, "--out", str(tmp_path / "f"), "--scores", str(side), "--drop-unscored", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 2
    assert main([*filt, "--out", str(tmp_path / "s"), "--scores", str(side)]) == 2  # onto its own input
    assert "is the folder of the input shards" in one_line_error(capsys)
    assert main(["captions", "filter", "--data", str(tmp_path / "none/*.tar"), "--keep-top", "0.5",
                 "--out", str(tmp_path / "g")]) == 2
    assert "no shard matches" in one_line_error(capsys)


def test_histogram_png(tmp_path):
    from zoo.engine.plots import histogram

    p = histogram([0.1, 0.2, 0.2, 0.35, float("nan")], tmp_path / "h.png", title="t", marker=0.2, size=(400, 200))
    with Image.open(p) as img:
        assert img.size == (400, 200)
        assert (214, 39, 40) in {c for _, c in img.convert("RGB").getcolors(1 << 16)}  # the threshold line
    for values in ([], [0.5, 0.5]):
        with Image.open(histogram(values, tmp_path / "e.png", title="t")) as img:
            assert img.size == (640, 360)


# -- recaption ---------------------------------------------------------------------------------------
def test_recaption_with_tiny_random_coca(tiny_coca, tmp_path, capsys):
    data = make_scenes(tmp_path / "s", n=6, maxcount=4)
    assert main(["captions", "recaption", "--captioner", f"coca:{tiny_coca}", "--data", data,
                 "--out", str(tmp_path / "r"), "--n-captions", "2", "--name", "synthetic", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "captioned 6 samples" in out and "captions['synthetic']" in out
    before, after = raw_by_key(data), raw_by_key(str(tmp_path / "r" / "*.tar"))
    assert list(after) == list(before)
    for key, members in after.items():
        assert_same_but_json(before[key], members)  # image bytes, label, mask, caption ... unchanged
        meta, old = json.loads(members["json"]), json.loads(before[key]["json"])
        synthetic = meta["captions"].pop("synthetic")
        assert meta == old
        assert len(synthetic) == 2 and all(isinstance(t, str) and t.strip() for t in synthetic)
        sample = {"meta": json.loads(members["json"])}
        assert named_captions(sample, "synthetic") == synthetic  # what the CLIP recipe's caption policy reads
    info = json.loads((tmp_path / "r" / "dataset.json").read_text())
    assert info["caption_tools"][-1] == {"op": "recaption", "captioner": f"coca:{tiny_coca}", "name": "synthetic",
                                         "n_captions": 2}


def test_coca_captioner_is_seeded_and_decodes(tiny_coca):
    first = build_captioner(f"coca:{tiny_coca}", seed=3)
    second = CocaCaptioner(first.model, first.tokenizer, seed=3)
    images = torch.randn(3, 3, 32, 32)
    a = first(images)
    assert a == second(images) and len(a) == 3 and all(a)
    assert first.seq_len == 12  # capped by the tiny text context
    assert first.decode([first.sot, *first.tokenizer.encode("a red circle"), first.eot, 0, 0]) == "a red circle"
    assert isinstance(first, Captioner) and first.transform(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def test_captioner_registry_is_pluggable(tmp_path):
    class Constant(Captioner):
        def __init__(self, spec: str):
            self.name, self.text = f"const:{spec}", spec
            self.transform = lambda img: torch.zeros(3, 4, 4)

        def __call__(self, images):
            return [self.text] * len(images)

    CAPTIONERS.register("const", Constant, usage="const:TEXT")
    try:
        data = make_scenes(tmp_path / "s", n=3)
        rep = recaption(data, tmp_path / "r", "const:a shape", name="mine", n_captions=3)
        assert rep["samples"] == 3 and rep["captions"] == 9
        assert all(m["captions"]["mine"] == ["a shape"] * 3 for m in metas(str(tmp_path / "r" / "*.tar")).values())
    finally:
        CAPTIONERS._entries.pop("const")


def test_recaption_errors(tiny_coca, tiny_open_clip, tmp_path, capsys):
    data = make_scenes(tmp_path / "s", n=2)
    rc = ["captions", "recaption", "--data", data, "--out", str(tmp_path / "r")]
    assert main([*rc, "--captioner", "blip:base"]) == 2
    assert "unknown captioner 'blip:base'" in one_line_error(capsys)
    assert main([*rc, "--captioner", "coca:coca_ViT-B-33"]) == 2
    assert "did you mean: coca_ViT-B-32" in one_line_error(capsys)
    assert main([*rc, "--captioner", f"coca:{TINY_CLIP}"]) == 2
    assert "is not a CoCa model" in one_line_error(capsys)
    assert main([*rc, "--captioner", f"coca:{tiny_coca}", "--generation", "greedy", "--n-captions", "2"]) == 2
    assert "gives the same caption 2 times" in one_line_error(capsys)
    assert main([*rc, "--captioner", f"coca:{tiny_coca}", "--n-captions", "0"]) == 2
    assert "--n-captions must be a positive integer" in one_line_error(capsys)
