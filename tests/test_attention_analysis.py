"""Attention-pattern analysis (`zoo analyze attention`): NMI / distance / entropy on hand-made maps, the
band rule, and a run over built-in scene shards with a tiny random ViT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from zoo.errors import ZooError
from zoo.tools.attention_analysis import (
    EPS,
    RULE,
    attention_distance,
    attention_entropy,
    classify_layers,
    nmi,
)


def maps(rows) -> torch.Tensor:
    """(1, 1, N, N) attention from a list of rows."""
    return torch.tensor(rows, dtype=torch.float64)[None, None]


def nmi_by_hand(a: np.ndarray) -> float:
    """Spec §1.1, term by term: + EPS, rows re-normalised, p(q) = 1/N, p(k) = Σ_q p(q) A[q,k]."""
    a = a + EPS
    a = a / a.sum(1, keepdims=True)
    n = a.shape[0]
    p_k = [sum(a[q, k] / n for q in range(n)) for k in range(n)]
    mutual = sum(a[q, k] / n * math.log(a[q, k] / p_k[k]) for q in range(n) for k in range(n))
    h_k = -sum(p * math.log(p) for p in p_k)
    return mutual / math.sqrt(math.log(n) * h_k)


# -- NMI -------------------------------------------------------------------------------------------------
def test_uniform_attention_has_nmi_zero():
    assert nmi(torch.full((2, 3, 16, 16), 1 / 16)) == pytest.approx(0.0, abs=1e-12)


def test_identity_attention_has_nmi_one():
    assert nmi(torch.eye(16).expand(2, 3, 16, 16)) == pytest.approx(1.0, abs=1e-5)


def test_one_global_pattern_has_nmi_zero():
    row = torch.softmax(torch.randn(10), 0)
    assert nmi(row.expand(1, 2, 10, 10).clone()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rows", [
    [[0.9, 0.1], [0.3, 0.7]],
    [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.0, 0.25, 0.75]],
])
def test_small_nmi_equals_the_formula_by_hand(rows):
    assert nmi(maps(rows)) == pytest.approx(nmi_by_hand(np.array(rows)), rel=1e-10)


def test_nmi_averages_over_images_and_heads_and_gives_per_head():
    local, flat = torch.eye(4), torch.full((4, 4), 0.25)
    attn = torch.stack([torch.stack([local, flat]), torch.stack([local, local])])  # (2 images, 2 heads)
    per_head = nmi(attn, per_head=True)
    assert per_head.shape == (2,)
    assert per_head.tolist() == pytest.approx([1.0, 0.5], abs=1e-5)
    assert nmi(attn) == pytest.approx(0.75, abs=1e-5)


def test_prefix_token_is_dropped_and_rows_renormalised():
    g = torch.Generator().manual_seed(1)
    patches = torch.softmax(torch.randn(4, 4, generator=g, dtype=torch.float64), -1)
    full = torch.zeros(5, 5, dtype=torch.float64)
    full[0] = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)  # the class token's row
    full[1:, 0] = torch.tensor([0.5, 0.1, 0.9, 0.3], dtype=torch.float64)  # mass on the class token
    full[1:, 1:] = patches * (1 - full[1:, :1])
    expected = nmi_by_hand(full[1:, 1:].numpy())  # cropped, then + EPS and re-normalised
    assert nmi(full[None, None], prefix=1) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(nmi_by_hand(patches.numpy()), rel=1e-6)  # = the patch block's own pattern
    assert nmi(full[None, None], prefix=0) != pytest.approx(expected, rel=1e-3)
    assert attention_entropy(full[None, None], prefix=1) == pytest.approx(
        attention_entropy(patches[None, None]), rel=1e-8)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="batch, heads, N, N"):
        nmi(torch.eye(4))
    with pytest.raises(ValueError, match="prefix"):
        nmi(torch.eye(2)[None, None], prefix=1)


# -- distance and entropy ------------------------------------------------------------------------------
def test_distance_of_identity_is_zero():
    assert attention_distance(torch.eye(9)[None, None], (3, 3), 4) == pytest.approx(0.0, abs=1e-5)


def test_distance_of_a_known_offset_in_pixels():
    swap = [[0.0, 1.0], [1.0, 0.0]]
    assert attention_distance(maps(swap), (1, 2), 4) == pytest.approx(4.0, rel=1e-6)  # one patch sideways
    assert attention_distance(maps(swap), (2, 1), (8, 4)) == pytest.approx(8.0, rel=1e-6)  # one patch down
    opposite = torch.eye(4).flip(-1)  # 2x2 grid: each patch attends its diagonal opposite
    assert attention_distance(opposite[None, None], (2, 2), 16) == pytest.approx(16 * math.sqrt(2), rel=1e-6)
    # with a class token in front, taking half of every row
    full = torch.zeros(3, 3, dtype=torch.float64)
    full[:, 0] = 0.5
    full[1, 2] = full[2, 1] = 0.5
    full[0, 1:] = 0.25
    assert attention_distance(full[None, None], (1, 2), 4, prefix=1) == pytest.approx(4.0, rel=1e-6)


def test_distance_grid_must_match_tokens():
    with pytest.raises(ValueError, match="patch grid"):
        attention_distance(torch.eye(9)[None, None], (2, 2), 4)


def test_entropy_uniform_is_log_n_and_identity_is_zero():
    assert attention_entropy(torch.full((1, 2, 12, 12), 1 / 12)) == pytest.approx(math.log(12), rel=1e-10)
    assert attention_entropy(torch.eye(12)[None, None]) == pytest.approx(0.0, abs=1e-5)


# -- bands -----------------------------------------------------------------------------------------------
def test_band_rule_picks_the_deepest_mid_nmi_layer():
    # MAE-L-like: local early layers, a descent through mid NMI, collapsed late layers (24 blocks)
    profile = [0.9, 0.88, 0.86, 0.85, 0.84, 0.83, 0.82, 0.8, 0.78, 0.76, 0.72, 0.7,
               0.62, 0.6, 0.55, 0.5, 0.45, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1]
    res = classify_layers(profile)
    assert res["hybrid_layer"]["index"] == 17 and res["hybrid_layer"]["layer"] == 18
    assert res["hybrid_layer"]["in_band"]
    assert res["bands"][:12] == ["local"] * 12
    assert res["bands"][12:18] == ["hybrid"] * 6
    assert res["bands"][18:] == ["global"] * 6
    assert res["edges"]["hybrid"] == pytest.approx([0.1 + 0.8 / 3, 0.1 + 1.6 / 3])


def test_band_rule_deepest_not_first_and_measured_indices():
    res = classify_layers([0.9, 0.5, 0.1, 0.5, 0.1], indices=[1, 3, 5, 7, 9])
    assert res["bands"] == ["local", "hybrid", "global", "hybrid", "global"]
    assert res["hybrid_layer"]["index"] == 7 and res["hybrid_layer"]["layer"] == 8


def test_band_rule_without_a_mid_layer_takes_the_nearest_to_the_centre():
    res = classify_layers([1.0, 0.8, 0.1, 0.0])
    assert "hybrid" not in res["bands"]
    assert res["hybrid_layer"]["index"] == 1 and not res["hybrid_layer"]["in_band"]
    assert "nearest" in res["hybrid_layer"]["note"]
    assert "deepest" in RULE and "thirds" in RULE


# -- over shards -----------------------------------------------------------------------------------------
@pytest.fixture
def scenes(tmp_path) -> str:
    from zoo.data.builtin import generate
    from zoo.data.writer import write_shards

    write_shards(generate("scenes", 10, seed=0, size=32), tmp_path / "scenes", maxcount=4)
    return str(tmp_path / "scenes" / "*.tar")


def test_analyze_attention_end_to_end(scenes, tmp_path):
    import zoo
    from zoo.tools.attention_analysis import analyze_attention

    model = zoo.create_model("vit_nano_patch4_32")
    rep = analyze_attention(model, scenes, n_images=6, batch_size=4, image_field="thermal",
                            model_name="vit_nano_patch4_32", plot=tmp_path / "a.png")
    assert rep["n_images"] == 6 and rep["grid"] == [8, 8] and rep["prefix_tokens"] == 1
    assert [r["index"] for r in rep["layers"]] == [0, 1, 2, 3] and [r["layer"] for r in rep["layers"]] == [1, 2, 3, 4]
    for r in rep["layers"]:
        assert 0.0 <= r["nmi"] <= 1.0 and 0.0 <= r["entropy"] <= math.log(64) + 1e-9
        assert 0.0 < r["distance"] < 32 * math.sqrt(2) and r["band"] in ("local", "hybrid", "global")
        assert len(r["nmi_per_head"]) == 4
    assert rep["hybrid_layer"]["index"] in range(4) and rep["rule"] == RULE
    assert (tmp_path / "a.png").stat().st_size > 5000 and rep["plot"] == str(tmp_path / "a.png")
    # the same per-layer values as the metric functions on the model's own maps of those images
    from zoo.data import loader
    from zoo.data.transforms import eval_transform

    t = eval_transform(model.pretrained_cfg)
    x = next(iter(loader(scenes, fields=("thermal",), transform=lambda s: t(s["thermal"]), batch_size=6, shuffle=0)))
    with torch.no_grad():
        maps_ = model.attention_maps(x)
    assert [r["nmi"] for r in rep["layers"]] == pytest.approx([nmi(maps_[i], 1) for i in range(4)], rel=1e-5)
    assert rep["layers"][2]["distance"] == pytest.approx(attention_distance(maps_[2], (8, 8), 4, 1), rel=1e-5)
    json.dumps(rep)  # JSON-ready


def test_analyze_attention_layers_subset(scenes):
    import zoo
    from zoo.tools.attention_analysis import analyze_attention

    rep = analyze_attention(zoo.create_model("vit_nano_patch4_32"), scenes, n_images=3, layers=[-1, 1])
    assert [r["index"] for r in rep["layers"]] == [1, 3] and rep["hybrid_layer"]["index"] in (1, 3)


def test_bad_input_is_a_one_line_error(scenes):
    import zoo
    from zoo.tools.attention_analysis import analyze_attention

    vit = zoo.create_model("vit_nano_patch4_32")
    with pytest.raises(ZooError, match=r"out of range.*0\.\.3") as e:
        analyze_attention(vit, scenes, layers=[4])
    assert "\n" not in str(e.value)
    with pytest.raises(ZooError, match=r"no field 'infrared'.*'thermal'") as e:
        analyze_attention(vit, scenes, image_field="infrared")
    assert "\n" not in str(e.value)
    with pytest.raises(ZooError, match="not an image"):
        analyze_attention(vit, scenes, image_field="caption")
    with pytest.raises(ZooError, match="not an image"):
        analyze_attention(vit, scenes, image_field="mask")  # a segmentation mask decodes as labels
    with pytest.raises(ZooError, match="not a ViT") as e:
        analyze_attention(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), scenes)
    assert "\n" not in str(e.value)


def test_cli_analyze_attention(scenes, tmp_path, capsys):
    from zoo.cli import main

    out = tmp_path / "out"
    assert main(["analyze", "attention", "vit_nano_patch4_32", "--data", scenes, "--n-images", "4",
                 "--image-field", "thermal", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "NMI" in printed and "hybrid layer:" in printed and "ENTROPY" in printed
    rec = json.loads((out / "attention.json").read_text())
    assert rec["model"] == "vit_nano_patch4_32" and len(rec["layers"]) == 4 and rec["data"] == scenes
    assert (out / "attention.png").is_file()
    assert main(["analyze", "attention", "vit_nano_patch4_32", "--data", scenes, "--layers", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["analyze", "attention", "vit_nano_patch4_32", "--data", scenes, "--out", str(out),
                 "--json", str(tmp_path / "x.json")]) == 2


def test_a_timm_vit_is_converted(scenes):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from zoo.tools.attention_analysis import analyze_attention

    model = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    rep = analyze_attention(model, scenes, n_images=2, plot=None)
    assert [r["layer"] for r in rep["layers"]] == [1, 2] and rep["grid"] == [4, 4] and "plot" not in rep


def test_attention_by_position_is_local():
    """A block whose queries and keys are the sin-cos position embeddings attends near itself: high NMI,
    short distance; a random block's attention is near uniform: NMI ~0."""
    import zoo

    m = zoo.create_model("vit_nano_patch4_32", pos_embed="sincos").eval()
    d = m.embed_dim
    with torch.no_grad():
        m.patch_embed.proj.weight.zero_()  # tokens = position embeddings (+ a constant bias)
        qkv = torch.zeros(3 * d, d)
        qkv[:d] = qkv[d:2 * d] = 8 * torch.eye(d)
        m.blocks[0].attn.qkv.weight.copy_(qkv)
        m.blocks[0].attn.qkv.bias.zero_()
        a = m.attention_maps(torch.randn(2, 3, 32, 32), layers=[0, 3])
    assert nmi(a[0], 1) > 0.3 > 0.01 > nmi(a[3], 1)
    assert attention_distance(a[0], (8, 8), 4, 1) < attention_distance(a[3], (8, 8), 4, 1) - 3
