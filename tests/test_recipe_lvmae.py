"""LV-MAE's pieces: the target is the input embeddings, only removed real tokens count, importance masking on a
hand-made sequence, padding that changes nothing, the built-in data embedded crop by crop by a frozen backbone,
the sequence encoder through `zoo.load`, class-token features for kNN, and the one-line errors. The registry-wide
test trains, resumes and publishes the CPU recipe."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.data.builtin import materialize
from zoo.data.reader import decode_sample, iter_raw_samples
from zoo.data.shards import expand_sources
from zoo.data.writer import write_shards
from zoo.errors import ConfigError, SampleError, ZooError
from zoo.models.vit import IMAGENET_MEAN, IMAGENET_STD
from zoo.recipes.lvmae import (
    LVMAE,
    Sequences,
    embedding_loss,
    importance_masking,
    pad_sequences,
    random_sequence_masking,
    sequence_features,
    sequence_knn,
)

SMALL = dict(arch="seq_nano", embed_dim=32, depth=1, num_heads=2, max_len=16, decoder_dim=16, decoder_depth=1,
             decoder_heads=2)
EMBEDDER = "vit_nano_patch4_32.lvmae_test"


def method(**kw) -> LVMAE:
    return LVMAE(**{**SMALL, **kw})


def unit_sequences(lengths, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, dim, generator=g), dim=-1) for n in lengths]


def samples(rows: str) -> list:
    return list(iter_raw_samples([u for s in expand_sources(rows) for u in s], Counter()))


@pytest.fixture
def embedder():
    """A tiny frozen ViT (8 px input, 32-d) published under EMBEDDER."""
    model = zoo.create_model("vit_nano_patch4_32", img_size=8, embed_dim=32, depth=1, num_heads=2,
                             pos_embed="sincos", num_classes=0)
    zoo.publish(model, EMBEDDER, {"recipe": "mae", "steps": 0})
    return zoo.load(EMBEDDER)


@pytest.fixture
def digits(tmp_path):
    return materialize("digits", "train", 6, root=tmp_path / "images", size=16)


def own_shards(folder, seqs, labels):
    write_shards(({"__key__": f"{i:09d}", "emb": s.numpy(), "label": y} for i, (s, y) in enumerate(zip(seqs, labels))),
                 folder, maxcount=2)
    return str(folder / "*.tar")


# -- the objective ---------------------------------------------------------------------------------
def test_the_target_is_the_input_embeddings():
    emb, padding = pad_sequences(unit_sequences([6, 6]))
    x = Sequences(emb, padding)
    m = method(loss="cosine")
    assert torch.equal(m.targets(x), emb)
    torch.manual_seed(1)
    out = m.forward_masked(x)
    assert out.pred.shape == emb.shape and out.mask.sum().item() == 6  # 3 of 6 removed per sequence
    torch.manual_seed(1)
    step = m.training_step({"emb": emb, "padding": padding}, 0)["loss"]
    torch.testing.assert_close(step, embedding_loss(out.pred, emb, out.mask, "cosine"))  # the step scores the input
    for kind in ("mse", "cosine"):
        assert embedding_loss(emb, emb, out.mask, kind).item() == pytest.approx(0.0, abs=1e-6)
        assert embedding_loss(out.pred, emb, out.mask, kind).item() > 1e-3
        assert embedding_loss(2 * emb, emb, out.mask, kind).item() == pytest.approx(
            {"mse": 1 / 32, "cosine": 0.0}[kind], abs=1e-6)  # MSE sees the scale, cosine does not
    standardised = (emb - emb.mean(-1, keepdim=True)) / (emb.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert embedding_loss(standardised, emb, out.mask, "mse", norm=True).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(emb, emb, out.mask, "mse", norm=True).item() > 0.5


def test_only_removed_real_tokens_count():
    emb, padding = pad_sequences(unit_sequences([8, 5]))
    m = method()
    torch.manual_seed(0)
    out = m.forward_masked(Sequences(emb, padding))
    assert out.mask[padding].eq(0).all() and out.mask.sum(1).tolist() == [4.0, 3.0]  # int(L / 2) kept of L real
    removed, visible = out.mask.bool(), ~padding & ~out.mask.bool()
    for kind in ("mse", "cosine"):
        m.loss = kind
        base = m.reconstruction_loss(out.pred, emb, out.mask)
        other = out.pred.clone()
        other[visible] += 5.0
        other[padding] = -100.0
        torch.testing.assert_close(m.reconstruction_loss(other, emb, out.mask), base)
        other[removed] += torch.randn_like(other[removed])
        assert not torch.allclose(m.reconstruction_loss(other, emb, out.mask), base)


# -- masking -----------------------------------------------------------------------------------------
def test_importance_masking_keeps_the_first_and_the_most_changed_tokens():
    e = torch.eye(4)
    seq = torch.stack([e[0], e[0], e[1], e[1], e[1], e[2]])[None]  # cos to previous: -, 1, 0, 1, 1, 0
    state = torch.get_rng_state()
    ids_keep, ids_restore, mask = importance_masking(seq, torch.zeros(1, 6, dtype=torch.bool), 0.5)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw
    assert sorted(ids_keep[0].tolist()) == [0, 2, 5] and mask[0].tolist() == [0, 1, 0, 1, 1, 0]
    assert sorted(ids_restore[0].tolist()) == list(range(6))  # a permutation, inverse of the kept-first shuffle
    assert torch.equal(torch.argsort(ids_restore)[:, :3], ids_keep)
    _, _, mask = importance_masking(seq, torch.zeros(1, 6, dtype=torch.bool), 0.75)
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 1]  # one token kept: the first
    flips = torch.stack([e[0], -e[0], e[0], -e[0]])[None]  # every similarity -1: the first still kept (-inf)
    assert importance_masking(flips, torch.zeros(1, 4, dtype=torch.bool), 0.5)[2][0, 0] == 0
    emb, padding = pad_sequences([seq[0], torch.stack([e[0], e[1], e[1]])])  # with padding: 1 of 3 kept, pads idle
    ids_keep, _, mask = importance_masking(emb, padding, 0.5)
    assert mask.tolist() == [[0, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert ids_keep.shape == (2, 3) and ids_keep[1, 0] == 0 and padding[1, ids_keep[1, 1:]].all()


def test_random_masking_removes_real_tokens_only():
    padding = pad_sequences(unit_sequences([9, 4, 1]))[1]
    g = torch.Generator().manual_seed(3)
    ids_keep, ids_restore, mask = random_sequence_masking(padding, 0.5, g)
    assert ids_keep.shape == (3, 4) and mask.sum(1).tolist() == [5.0, 2.0, 0.0] and mask[padding].eq(0).all()
    kept_real = [int((~padding[i, ids_keep[i]]).sum()) for i in range(3)]
    assert kept_real == [4, 2, 1]
    again = random_sequence_masking(padding, 0.5, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((ids_keep, ids_restore, mask), again))


# -- padding -----------------------------------------------------------------------------------------
def test_a_padded_sequence_encodes_and_decodes_like_the_unpadded_one():
    torch.manual_seed(0)
    a, b = unit_sequences([7, 4])
    emb, padding = pad_sequences([a, b])
    enc = zoo.create_model("seq_nano", embed_dim=32, depth=2, num_heads=2, max_len=16).eval()
    with torch.no_grad():
        padded = enc.forward_features(emb, key_padding_mask=padding)
        torch.testing.assert_close(padded[1, :5], enc.forward_features(b[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[0], enc.forward_features(a[None])[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(enc.forward_features(emb)[1, :5], enc.forward_features(b[None])[0], atol=1e-3)
        m = method(masking="importance").eval()
        out = m.forward_masked(Sequences(emb, padding))
        alone = m.forward_masked(Sequences(b[None], torch.zeros(1, 4, dtype=torch.bool)))
    assert torch.equal(out.mask[1, :4], alone.mask[0])
    torch.testing.assert_close(out.pred[1, :4], alone.pred[0], atol=1e-5, rtol=1e-5)


# -- data: the built-in images as embedded crop sequences --------------------------------------------------
def test_prepared_builtin_shards_hold_the_embedders_crop_features(embedder, digits, isolated_zoo_home):
    m = method(embedder=EMBEDDER, image_size=16)
    pattern = m.prepare_shards(digits, builtin=True)
    assert pattern.startswith(str(isolated_zoo_home / "data"))
    stamp = [os.stat(u).st_mtime_ns for s in expand_sources(pattern) for u in s]
    images = [decode_sample(r, ("image", "label"), None) for r in samples(digits)]
    rows = [decode_sample(r, ("emb", "label"), None) for r in samples(pattern)]
    assert [r["__key__"] for r in rows] == [s["__key__"] for s in images] and len(rows) == 6
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, row in zip(images, rows):
        assert row["label"] == image["label"] and row["emb"].shape == (9, 32) and row["emb"].dtype == np.float32
        pixels = torch.from_numpy(np.asarray(image["image"], dtype=np.float32)).permute(2, 0, 1) / 255
        crops = [pixels[:, y : y + 8, x : x + 8] for y in (0, 4, 8) for x in (0, 4, 8)]  # 3x3 raster of halves
        with torch.no_grad():
            expect = embedder.forward_features((torch.stack(crops) - mean) / std)[:, 0]
        got = torch.from_numpy(row["emb"])
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(9))
        torch.testing.assert_close(got, F.normalize(expect, dim=-1), atol=1e-5, rtol=1e-5)
    assert m.prepare_shards(digits, builtin=True) == pattern  # cached: not embedded again
    assert stamp == [os.stat(u).st_mtime_ns for s in expand_sources(pattern) for u in s]
    sample = m.data_spec().transform(decode_sample(samples(pattern)[0], ("emb",), ("label",)))
    assert sample["emb"].shape == (9, 32) and isinstance(sample["label"], int)


def test_sequence_features_give_class_tokens_for_knn(tmp_path):
    torch.manual_seed(0)
    seqs, labels = unit_sequences([5, 9, 3, 7, 6, 4]), [0, 1, 0, 1, 0, 1]
    data = own_shards(tmp_path / "seqs", seqs, labels)
    model = zoo.create_model("seq_nano", embed_dim=32, depth=1, num_heads=2, max_len=16)
    emb, padding = pad_sequences(seqs)
    feats, y = sequence_features(model, data, batch_size=4)
    direct, none = sequence_features(model, emb, padding=padding)
    assert none is None and y.tolist() == labels and feats.shape == (6, 32)
    torch.testing.assert_close(feats, direct, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(direct, model(emb, key_padding_mask=padding), atol=1e-6, rtol=1e-6)
    means, _ = sequence_features(None, data)
    torch.testing.assert_close(means, torch.stack([s.mean(0) for s in seqs]))
    result = sequence_knn(model, data, data, ks=(1,))
    assert result["top1_k1"] == 100.0  # each sequence is its own nearest neighbour
    assert method().prepare_shards(data, builtin=False) == data  # your own shards pass as they are


def test_the_sequence_encoder_round_trips_through_zoo_load():
    m = method()
    (name, export), = m.export("seq_nano.lvmae_test").items()
    zoo.publish(export.model, name, {"recipe": "lvmae", "steps": 0, **export.card})
    loaded = zoo.load(name)
    emb, padding = pad_sequences(unit_sequences([6, 3]))
    m.encoder.eval()
    with torch.no_grad():
        assert torch.equal(m.encoder(emb, key_padding_mask=padding), loaded(emb, key_padding_mask=padding))
    assert loaded.pretrained_cfg["input"] == "embeddings"
    assert loaded.zoo_card["pretrained_cfg"]["input_size"] == [16, 32]
    assert loaded.zoo_card["input"].startswith("embedding sequences") and loaded.zoo_card["arch"] == "seq_nano"


# -- errors ----------------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_input_gets_one_line_errors(tmp_path, digits, embedder):
    m = method()
    with pytest.raises(ZooError) as e:  # image shards without the embedding member
        m.prepare_shards(digits, builtin=False)
    assert "no emb.npy member" in one_line(e) and "embed_sequences" in one_line(e)
    narrow = own_shards(tmp_path / "narrow", unit_sequences([4, 4], dim=16), [0, 1])
    with pytest.raises(ZooError) as e:
        m.prepare_shards(narrow, builtin=False)
    assert "16-d embeddings but the encoder is 32 wide" in one_line(e) and "model.embed_dim: 16" in one_line(e)
    with pytest.raises(SampleError, match="16-d embeddings"):
        m.data_spec().transform({"__key__": "x", "emb": np.zeros((4, 16), np.float32)})
    long = own_shards(tmp_path / "long", unit_sequences([20, 3]), [0, 1])
    with pytest.raises(ZooError) as e:
        m.prepare_shards(long, builtin=False)
    assert "20 embeddings is longer than the encoder's max_len=16" in one_line(e)
    with pytest.raises(ZooError, match="longer than max_len=16"):
        m.encoder(torch.zeros(1, 20, 32))
    with pytest.raises(ZooError, match="embeddings are 16-d but this encoder is 32 wide"):
        m.encoder(torch.zeros(1, 4, 16))
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError) as e:
            method(mask_ratio=ratio)
        assert "mask_ratio must be in (0, 1)" in one_line(e)
    with pytest.raises(ConfigError, match="masking must be 'random' or 'importance'"):
        method(masking="topk")
    with pytest.raises(ConfigError, match="loss must be 'mse' or 'cosine'"):
        method(loss="l1")
    with pytest.raises(ConfigError, match="not a sequence encoder"):
        method(arch="vit_nano_patch4_32")
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        method(embed_dims=32)
    with pytest.raises(ConfigError) as e:  # the default embedder is not published in this store
        LVMAE(**{**SMALL, "embed_dim": 192, "num_heads": 3}).prepare_shards(digits, builtin=True)
    assert "cannot load the embedder 'vit_tiny_patch4_32.mae_fractal'" in one_line(e)
    assert "zoo pretrain mae_vit_tiny_patch4_32_fractals" in one_line(e)
    with pytest.raises(ConfigError) as e:
        method(embed_dim=48, num_heads=2, embedder=EMBEDDER, image_size=16).prepare_shards(digits, builtin=True)
    assert "gives 32-d features but the encoder is 48 wide" in one_line(e)
