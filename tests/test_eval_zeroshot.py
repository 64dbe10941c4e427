"""Zero-shot classification and image-text retrieval: known answers, chunking, errors, an open_clip smoke test."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from zoo.data import write_shards
from zoo.errors import ZooError
from zoo.eval.retrieval import encode_pairs, retrieval_eval, retrieval_metrics
from zoo.eval.zeroshot import zero_shot_classifier, zero_shot_eval

NAMES = ("apple", "boat", "cat", "door", "egg", "fig")
STEP = 20  # the pixel value of image i is STEP * i: the fake models read the class/item back from it


# -- fakes whose embeddings make the answer known ------------------------------------------------
def pixel_transform(img: Image.Image) -> torch.Tensor:
    """The RGB value of the top-left pixel: all the fake models look at."""
    return torch.tensor(np.asarray(img)[0, 0].astype(np.float32))


class WordTokenizer:
    """Text -> the index of the first vocabulary word it contains (a "token" per text)."""

    def __init__(self, vocab):
        self.vocab = list(vocab)

    def __call__(self, texts):
        return torch.tensor([next(i for i, w in enumerate(self.vocab) if re.search(rf"\b{w}\b", t)) for t in texts])


class FakeCLIP(nn.Module):
    """Image of class y -> 10 e_y + 5 e_(y+1): its own class first, the next class second.
    Text naming class c -> e_c."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.scale = nn.Parameter(torch.ones(()))  # so the model has a device and a train/eval mode

    def encode_image(self, x):
        y = (x[:, 0] / STEP).round().long()
        return 10 * F.one_hot(y, self.n).float() + 5 * F.one_hot((y + 1) % self.n, self.n).float()

    def encode_text(self, tokens):
        return F.one_hot(tokens, self.n).float() * self.scale


class ImageOnly(nn.Module):
    def forward_features(self, x):
        return x


def solid(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4, 3), value, np.uint8), "RGB")


@pytest.fixture
def labelled_shards(tmp_path):
    """60 lossless solid images, 10 per class of NAMES, in 4 shards."""
    samples = ({"__key__": f"{i:09d}", "image": solid(STEP * (i % 6)), "label": i % 6} for i in range(60))
    write_shards(samples, tmp_path / "cls", maxcount=16, image_format="png")
    return str(tmp_path / "cls" / "*.tar")


# -- retrieval metrics -----------------------------------------------------------------------------
def naive_recall(img, txt, owner, k):
    """Full similarity matrix, sorted: the definitions read literally (no ties in random data)."""
    s = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    i2t = [bool((owner[s[i].argsort(descending=True)[:k]] == i).any()) for i in range(len(img)) if (owner == i).any()]
    t2i = [bool((s[:, j].argsort(descending=True)[:k] == owner[j]).any()) for j in range(len(txt))]
    return 100.0 * sum(i2t) / len(i2t), 100.0 * sum(t2i) / len(t2i)


def test_identity_embeddings_are_perfect():
    e = torch.eye(8)
    res = retrieval_metrics(e, e, torch.arange(8))
    assert set(res) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(v == 100.0 for v in res.values())


def test_correct_item_exactly_third():
    """Points on a circle: text j sits just past image j+1, so for every text its image is third
    (after images j+1 and j+2), and for every image its text is third as well."""
    n = 10
    ang = 2 * math.pi / n
    img = torch.tensor([[math.cos(ang * i), math.sin(ang * i)] for i in range(n)])
    txt = torch.tensor([[math.cos(ang * (j + 1) + 0.1), math.sin(ang * (j + 1) + 0.1)] for j in range(n)])
    res = retrieval_metrics(img, txt, torch.arange(n), ks=(1, 2, 3, 5))
    for d in ("image_to_text", "text_to_image"):
        assert res[f"{d}_R@1"] == 0.0 and res[f"{d}_R@2"] == 0.0
        assert res[f"{d}_R@3"] == 100.0 and res[f"{d}_R@5"] == 100.0


def test_several_captions_per_image():
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([
        [1.0, 0.0, 0.0],  # t0 of image 0: its image first
        [0.5, 1.0, 0.0],  # t1 of image 0: image 1 first, image 0 second
        [0.0, 0.5, 1.0],  # t2 of image 1: image 2 first, image 1 second
        [0.0, 0.0, 1.0],  # t3 of image 2: its image first
    ]), dim=1)
    owner = torch.tensor([0, 0, 1, 2])
    res = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # image 0 is a hit through t0 although t1 ranks lower; image 1's only text is behind t1
    assert res["image_to_text_R@1"] == pytest.approx(200 / 3) and res["image_to_text_R@2"] == 100.0
    assert res["text_to_image_R@1"] == 50.0 and res["text_to_image_R@2"] == 100.0


def test_images_without_text_are_left_out_and_ties_count_against():
    res = retrieval_metrics(torch.eye(4), torch.eye(4)[:2], torch.tensor([0, 1]), ks=(1,))
    assert res == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}
    const = torch.ones(5, 4)  # every score equal: no better than the last place
    assert retrieval_metrics(const, const, torch.arange(5), ks=(1,))["text_to_image_R@1"] == 0.0


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked_and_naive(chunk):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(23, 8, generator=g)
    owner = torch.cat([torch.arange(20), torch.randint(0, 23, (30,), generator=g)])  # 3 images without text
    txt = img[owner] + 1.5 * torch.randn(len(owner), 8, generator=g)
    ks = (1, 5, 10)
    full = retrieval_metrics(img, txt, owner, ks, chunk=10_000)
    assert retrieval_metrics(img, txt, owner, ks, chunk=chunk) == full
    for k in ks:
        i2t, t2i = naive_recall(img, txt, owner, k)
        assert full[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert full[f"text_to_image_R@{k}"] == pytest.approx(t2i)


def test_bad_retrieval_inputs():
    with pytest.raises(ZooError, match="one width"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ZooError, match="image indices"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 3]))
    with pytest.raises(ZooError, match="one image index per text"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.arange(2))
    with pytest.raises(ZooError, match="NaN"):  # NaN scores would otherwise rank first: 100% recall
        retrieval_metrics(torch.full((3, 4), float("nan")), torch.randn(3, 4), torch.arange(3))


# -- encode_pairs over shards ----------------------------------------------------------------------
@pytest.fixture
def caption_shards(tmp_path):
    """12 items: image i is solid STEP*i; txt "item i"; meta captions a = "item i", b = ["item i", "thing i"]
    (items 10 and 11 have no meta captions)."""
    def sample(i):
        meta = {"captions": {"a": f"item {i}", "b": [f"item {i}", f"thing {i}"]}} if i < 10 else {"captions": {}}
        return {"__key__": f"{i:09d}", "image": solid(STEP * i), "caption": f"item {i}", "meta": meta}

    write_shards((sample(i) for i in range(12)), tmp_path / "cap", maxcount=5, image_format="png")
    return str(tmp_path / "cap" / "*.tar")


class ItemTokenizer:
    def __call__(self, texts):
        return torch.tensor([int(t.split()[-1]) for t in texts])


class ItemCLIP(nn.Module):
    """Image i -> e_i, a text ending in i -> e_i."""

    def encode_image(self, x):
        return F.one_hot((x[:, 0] / STEP).round().long(), 16).float()

    def encode_text(self, tokens):
        return F.one_hot(tokens, 16).float()


def test_encode_pairs_aligns_texts_with_their_images(caption_shards):
    model, tok = ItemCLIP(), ItemTokenizer()
    img, txt, owner = encode_pairs(model, tok, caption_shards, caption="caption", transform=pixel_transform,
                                   batch_size=4)
    assert img.shape == (12, 16) and txt.shape == (12, 16) and torch.equal(owner, torch.arange(12))
    assert torch.equal(img, txt)  # in shard order, each text with its image

    img, txt, owner = encode_pairs(model, tok, caption_shards, caption=("caption", "b"), transform=pixel_transform)
    counts = torch.bincount(owner)
    assert counts[:10].tolist() == [3] * 10 and counts[10:].tolist() == [1, 1]  # txt + both b's; 10, 11 txt only
    assert torch.equal(txt, img[owner])

    res = retrieval_eval(model, tok, caption_shards, caption=("caption", "b"), transform=pixel_transform, ks=(1, 5))
    assert res["image_to_text_R@1"] == 100.0
    assert res["text_to_image_R@1"] == 100.0


def test_encode_pairs_caption_probabilities_and_missing(caption_shards):
    model, tok = ItemCLIP(), ItemTokenizer()
    img, txt, owner = encode_pairs(model, tok, caption_shards, caption={"a": 0.5, "b": 0.5}, transform=pixel_transform)
    assert len(img) == 10 and len(txt) == 10  # one caption each; items 10, 11 have neither: skipped
    assert torch.equal(txt, img[owner])
    again = encode_pairs(model, tok, caption_shards, caption={"a": 0.5, "b": 0.5}, transform=pixel_transform)
    assert torch.equal(again[1], txt)
    with pytest.raises(ZooError, match=r"captions \['exact'\].*'caption', 'meta'.*meta captions"):
        encode_pairs(model, tok, caption_shards, transform=pixel_transform)  # default ("exact",): not in these shards


# -- zero-shot -------------------------------------------------------------------------------------
def test_zero_shot_known_answers(labelled_shards):
    model, tok = FakeCLIP(6), WordTokenizer(NAMES)
    model.train()
    templates = ("a photo of a {}.", lambda c: f"a drawing of a {c}")
    res = zero_shot_eval(model, tok, labelled_shards, NAMES, templates, transform=pixel_transform, batch_size=7)
    assert res == {"top1": 100.0, "top5": 100.0}
    assert model.training  # mode restored

    # classes 0 and 1 swapped: their 20 samples are now wrong at top-1, the other 40 right
    swapped = (NAMES[1], NAMES[0], *NAMES[2:])
    res = zero_shot_eval(model, tok, labelled_shards, swapped, transform=pixel_transform)
    assert res["top1"] == pytest.approx(100 * 4 / 6)
    # names rotated by one: every label's column holds the next class, which each image ranks second
    rotated = NAMES[1:] + NAMES[:1]
    res = zero_shot_eval(model, tok, labelled_shards, rotated, transform=pixel_transform, ks=(1, 2, 5))
    assert res == {"top1": 0.0, "top2": 100.0, "top5": 100.0}


def test_zero_shot_classifier_is_normalised_template_mean():
    model, tok = FakeCLIP(6), WordTokenizer(NAMES)
    w = zero_shot_classifier(model, tok, NAMES, ("a {}", "the {}"), classes_per_batch=4)
    assert w.shape == (6, 6) and torch.allclose(w, torch.eye(6))


def test_top5_needs_five_classes(tmp_path):
    samples = ({"__key__": f"{i:09d}", "image": solid(STEP * (i % 3)), "label": i % 3} for i in range(9))
    write_shards(samples, tmp_path / "three", image_format="png")
    res = zero_shot_eval(FakeCLIP(3), WordTokenizer(NAMES[:3]), str(tmp_path / "three" / "*.tar"), NAMES[:3],
                         transform=pixel_transform)
    assert res == {"top1": 100.0}


def test_zero_shot_errors(labelled_shards):
    tok = WordTokenizer(NAMES)
    msg = "zero-shot needs an image-text model.*open_clip:ARCH/TAG; ImageOnly has only image features"
    with pytest.raises(ZooError, match=msg):
        zero_shot_eval(ImageOnly(), tok, labelled_shards, NAMES, transform=pixel_transform)
    with pytest.raises(ZooError, match="retrieval needs an image-text model"):
        encode_pairs(ImageOnly(), tok, labelled_shards, transform=pixel_transform)
    with pytest.raises(ZooError, match="non-empty list of class names"):
        zero_shot_eval(FakeCLIP(6), tok, labelled_shards, [], transform=pixel_transform)
    with pytest.raises(ZooError, match="label 4 but only 4 class names"):
        zero_shot_eval(FakeCLIP(6), tok, labelled_shards, NAMES[:4], transform=pixel_transform)
    with pytest.raises(ZooError, match="no '{}'"):
        zero_shot_classifier(FakeCLIP(6), tok, NAMES, ("a photo",))
    with pytest.raises(ZooError, match="pass transform="):
        zero_shot_eval(FakeCLIP(6), tok, labelled_shards, NAMES)  # no preprocessing config to derive one from


# -- end to end with a tiny random open_clip model -------------------------------------------------
def test_open_clip_end_to_end(tiny_open_clip, tmp_path):
    from conftest import TINY_CLIP as TINY

    import zoo
    from zoo.data.builtin import generate, scenes
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    write_shards(generate("scenes", 40, size=32), tmp_path / "scenes", maxcount=10)
    urls = str(tmp_path / "scenes" / "{00000..00003}.tar")
    model = zoo.load(f"open_clip:{TINY}", pretrained=False)
    tok = tiny_open_clip.get_tokenizer(TINY)

    templates = ("a photo of a {}.", "a {} shape")
    ours = zero_shot_classifier(model, tok, scenes.SHAPES, templates)
    theirs = build_zero_shot_classifier(model, tok, scenes.SHAPES, templates)
    assert ours.shape == (32, 6) and torch.allclose(ours, theirs, atol=1e-5)

    zs = zero_shot_eval(model, tok, urls, scenes.SHAPES, templates, batch_size=16)
    assert set(zs) == {"top1", "top5"} and all(0.0 <= v <= 100.0 for v in zs.values())

    ret = retrieval_eval(model, tok, urls, caption=("exact", "short", "noisy"), batch_size=16)
    assert set(ret) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 100.0 for v in ret.values())
    img, txt, owner = encode_pairs(model, tok, urls, caption=("exact", "short", "noisy"))
    assert img.shape == (40, 32) and txt.shape == (120, 32) and torch.equal(torch.bincount(owner), torch.full((40,), 3))
