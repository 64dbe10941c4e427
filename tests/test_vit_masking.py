"""The zoo ViT's iBOT/DINOv2 hooks: mask-token replacement, packed multi-crop forward, last-block attention maps."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.models.vit import Block, drop_path_packed

D = 128  # vit_nano_patch4_32: 8x8 patches of dim 128, 4 blocks, 4 heads


def _model(**kwargs):
    torch.manual_seed(0)
    model = zoo.create_model("vit_nano_patch4_32", **kwargs)
    with torch.no_grad():  # non-trivial norms and class token, so a mis-placed token would show
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        model.cls_token.normal_(0, 0.5)
    return model.eval()


def _manual_masked_features(model, x, mask, token):
    """The masked forward written out: patch embeddings, masked rows set to the token, + pos, cls, blocks."""
    patches = model.patch_embed(x).clone()
    patches[mask] = token.reshape(-1).to(patches.dtype)
    patches = patches + model.pos_embed[:, 1:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    tokens = torch.cat([cls, patches], dim=1)
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.norm(tokens)


@pytest.mark.parametrize("token_shape", [(D,), (1, 1, D)])
def test_mask_replaces_exactly_the_masked_patches(token_shape):
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.4
    token = torch.randn(token_shape)
    with torch.no_grad():
        emb = model.embed(x, mask=mask, mask_token=token)
        plain = model.embed(x)
        pos = model.pos_embed[0, 1:]
        assert torch.equal(emb[:, 1:][~mask], plain[:, 1:][~mask]), "unmasked patches changed"
        expected = (token.reshape(1, D) + pos).expand(2, -1, -1)[mask]
        assert torch.allclose(emb[:, 1:][mask], expected, atol=1e-6), "masked patches are not mask_token + pos"
        assert torch.equal(emb[:, 0], plain[:, 0])
        got = model.forward_features(x, mask=mask, mask_token=token)
        assert torch.allclose(got, _manual_masked_features(model, x, mask, token), atol=1e-5)


def test_mask_none_is_the_plain_forward():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    token = torch.randn(D)
    with torch.no_grad():
        plain = model.forward_features(x)
        assert torch.equal(model.forward_features(x, mask=None, mask_token=token), plain)
        nothing = torch.zeros(2, 64, dtype=torch.bool)
        assert torch.equal(model.forward_features(x, mask=nothing, mask_token=token), plain)


def test_grads_reach_mask_token_and_only_through_masked_patches():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    token = torch.zeros(1, 1, D, requires_grad=True)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 5] = True
    model.forward_features(x, mask=mask, mask_token=token).square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    token.grad = None
    model.forward_features(x, mask=torch.zeros_like(mask), mask_token=token).square().sum().backward()
    assert token.grad is None or torch.all(token.grad == 0)


def test_mask_argument_errors():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        model.forward_features(x, keep=torch.arange(8).expand(2, -1), mask=mask, mask_token=torch.zeros(D))
    with pytest.raises(ValueError, match="mask_token"):
        model.forward_features(x, mask=mask)
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        model.forward_features(x, mask=mask[:, :10], mask_token=torch.zeros(D))


def _crops(dtype=torch.float32):
    """DINO multi-crop in miniature: 2 global crops at 32 px (masked, iBOT), 6 local crops at 16 px."""
    g = torch.randn(2, 3, 32, 32, dtype=dtype)
    loc = torch.randn(6, 3, 16, 16, dtype=dtype)
    return [g, loc], [torch.rand(2, 64) < 0.3, None]


def _grads(model, token, xs):
    return {**{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "mask_token": token.grad.clone(), **{f"x{i}": x.grad.clone() for i, x in enumerate(xs)}}


def test_packed_equals_unpacked_in_values_and_gradients_float64():
    """float64, so the only difference is summation order: values and every gradient agree to 1e-10."""
    model = _model().double()
    xs, masks = _crops(torch.float64)
    results = {}
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        token = torch.randn(1, 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        inputs = [x.clone().requires_grad_() for x in xs]
        outs = model.forward_features_list(inputs, masks, mask_token=token, pack=pack)
        assert [o.shape for o in outs] == [(2, 1 + 64, D), (6, 1 + 16, D)]
        sum((o.sin() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        results[pack] = ([o.detach() for o in outs], _grads(model, token, inputs))
    (out_u, grad_u), (out_p, grad_p) = results[False], results[True]
    for a, b in zip(out_u, out_p):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()
    assert grad_u.keys() == grad_p.keys() and "blocks.0.attn.qkv.weight" in grad_u
    for name in grad_u:
        assert torch.allclose(grad_u[name], grad_p[name], atol=1e-10, rtol=0), name


def test_pack_true_on_cpu_matches_forward_features_float32():
    model = _model()
    xs, masks = _crops()
    token = torch.randn(D)
    with torch.no_grad():
        packed = model.forward_features_list(xs, masks, mask_token=token, pack=True)
        default = model.forward_features_list(xs, masks, mask_token=token)  # pack=None: not packed on the CPU
        for x, m, p, d in zip(xs, masks, packed, default):
            single = model.forward_features(x, mask=m, mask_token=token)
            assert torch.allclose(p, single, atol=1e-5), (p - single).abs().max()
            assert torch.equal(d, single)
    assert model.forward_features_list([]) == []
    with pytest.raises(ValueError, match="masks"):
        model.forward_features_list(xs, [None])


def test_packed_attention_goes_through_attention_varlen(monkeypatch):
    import zoo.models.vit as vit

    calls = []
    real = vit.attention_varlen
    monkeypatch.setattr(vit, "attention_varlen", lambda q, k, v, seqlens, **kw: calls.append(list(seqlens)) or real(q, k, v, seqlens, **kw))
    model = _model()
    xs, _ = _crops()
    with torch.no_grad():
        model.forward_features_list(xs, pack=True)
    assert calls == [[65, 65] + [17] * 6] * len(model.blocks)


def test_packed_forward_with_grad_checkpointing_and_drop_path_trains():
    model = _model(drop_path_rate=0.2).train()
    model.set_grad_checkpointing(True)
    xs, masks = _crops()
    token = torch.zeros(D, requires_grad=True)
    outs = model.forward_features_list(xs, masks, mask_token=token, pack=True)
    sum(o.square().mean() for o in outs).backward()
    assert token.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None


def test_drop_path_packed_draws_once_per_sequence():
    torch.manual_seed(0)
    seqlens = [5, 5, 3, 3, 3, 7] * 20
    out = drop_path_packed(torch.ones(1, sum(seqlens), 4), 0.5, seqlens)
    per_seq = out[0].split(seqlens)
    for s in per_seq:
        assert torch.all(s == s[0, 0]) and s[0, 0].item() in (0.0, 2.0)
    values = {s[0, 0].item() for s in per_seq}
    assert values == {0.0, 2.0}, "with 120 sequences at p=0.5 both outcomes occur"
    assert torch.equal(drop_path_packed(torch.ones(1, 8, 4), 0.0, [8]), torch.ones(1, 8, 4))


def test_block_refuses_mask_with_seqlens():
    blk = Block(32, 2)
    with pytest.raises(ValueError, match="seqlens"):
        blk(torch.randn(1, 6, 32), attn_mask=torch.ones(6, 6, dtype=torch.bool), seqlens=[3, 3])


def test_last_selfattention_is_the_last_blocks_softmax():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    last = model.blocks[-1]
    hook = last.attn.qkv.register_forward_hook(lambda mod, inp, out: captured.__setitem__("qkv", out))
    with torch.no_grad():
        model.forward_features(x)
        attn = model.get_last_selfattention(x)
    hook.remove()
    heads, hd = last.attn.num_heads, D // last.attn.num_heads
    assert attn.shape == (2, heads, 1 + 64, 1 + 64)
    assert torch.allclose(attn.sum(-1), torch.ones(2, heads, 65), atol=1e-5)
    q, k, _ = captured["qkv"].reshape(2, 65, 3, heads, hd).permute(2, 0, 3, 1, 4)
    manual = (q @ k.transpose(-2, -1) * hd**-0.5).softmax(dim=-1)
    assert torch.allclose(attn, manual, atol=1e-6)


def test_last_selfattention_at_another_resolution():
    model = _model()
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.randn(1, 3, 48, 48))
    assert attn.shape == (1, 4, 1 + 144, 1 + 144)
