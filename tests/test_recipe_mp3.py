"""MP3 recipe: no position signal in the encoder (patch permutation equivariance), the key mask (only the
context is attended to, in every layer), the position loss and accuracy, the query_all switch, the
export (zero position embedding, same encoder), learning, and one-line errors for bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.errors import ConfigError, ZooError
from zoo.recipes.base import Method
from zoo.recipes.mae import MAE, random_masking
from zoo.recipes.mp3 import MP3, context_attn_mask, position_accuracy, position_loss, position_top1
from zoo.registry import RECIPES

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
N = 64  # 8x8 patches of 4 px on 32 px images


def small_mp3(**kw) -> MP3:
    return MP3("vit_nano_patch4_32", **{**SMALL, **kw}).eval()


def full_context(model: MP3, x: torch.Tensor) -> torch.Tensor:
    """The method's encoder output with every patch in the context: (B, 1 + N, D)."""
    tokens, _ = model.tokenize(x)
    return model.encode(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1))


def roll_grid(t: torch.Tensor, shifts: tuple[int, int]) -> torch.Tensor:
    """Roll patch tokens (B, 64, D) as an 8x8 grid."""
    return t.reshape(t.shape[0], 8, 8, -1).roll(shifts, dims=(1, 2)).reshape(t.shape)


# -- no position signal --------------------------------------------------------------------------
@torch.no_grad()
def test_encoder_has_no_position_signal_patch_permutation_permutes_outputs():
    """Rolling the image by whole patches rolls the patch outputs the same way and leaves the class token's
    output unchanged (full context); an MAE encoder (sin-cos positions), same weights otherwise, does not."""
    model = small_mp3()
    x = torch.randn(2, 3, 32, 32)
    rolled = x.roll((4, 8), dims=(2, 3))  # one patch down, two right
    a, b = full_context(model, x), full_context(model, rolled)
    assert torch.allclose(b[:, 1:], roll_grid(a[:, 1:], (1, 2)), atol=1e-5)
    assert torch.allclose(b[:, 0], a[:, 0], atol=1e-5)
    assert not torch.allclose(b[:, 1:], a[:, 1:], atol=1e-3)  # the outputs did move
    logits_a, logits_b = model.decoder(a[:, 1:]), model.decoder(b[:, 1:])  # each patch's guess moves with it
    assert torch.allclose(logits_b, roll_grid(logits_a, (1, 2)), atol=1e-5)
    assert torch.all(model.encoder.pos_embed == 0) and not model.encoder.pos_embed.requires_grad

    mae = MAE("vit_nano_patch4_32", decoder_dim=16, decoder_depth=1, decoder_heads=2, **SMALL).eval()
    mae.encoder.load_state_dict({k: v for k, v in model.encoder.state_dict().items() if k != "pos_embed"}, strict=False)
    ma, mb = mae.encoder.forward_features(x), mae.encoder.forward_features(rolled)
    assert not torch.allclose(mb[:, 1:], roll_grid(ma[:, 1:], (1, 2)), atol=1e-3)


# -- the key mask --------------------------------------------------------------------------------
def test_context_attn_mask_lets_every_query_see_the_class_token_and_the_context_only():
    ids_keep = torch.tensor([[2, 0], [3, 1]])
    m = context_attn_mask(ids_keep, 4)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0, :, :].tolist() == [[True, True, False, True, False]] * 5  # keys: cls, patch 0, patch 2
    assert m[1, 0, :, :].tolist() == [[True, False, True, False, True]] * 5


@torch.no_grad()
def test_zoo_attention_mask_convention_true_attends():
    """The key mask relies on zoo.kernels.attention's bool convention: True = may attend."""
    from zoo.kernels import attention

    q, k, v = torch.randn(3, 2, 2, 5, 4)
    allowed = torch.tensor([True, False, True, False, False]).expand(2, 5)
    out = attention(q, k, v, attn_mask=allowed[:, None, None, :].expand(2, 1, 5, 5))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, [0, 2]], v[:, :, [0, 2]])
    assert torch.allclose(out, ref, atol=1e-6)


def masked_latent(model: MP3, x: torch.Tensor, seed: int = 0):
    out = model.forward_masked(x, generator=torch.Generator().manual_seed(seed))
    return out.latent, out.mask


@torch.no_grad()
def test_key_mask_non_context_patches_inform_only_themselves():
    model = small_mp3(mask_ratio=0.75)
    x = torch.randn(1, 3, 32, 32)
    base, mask = masked_latent(model, x)
    assert base.shape == (1, 1 + N, 32)  # query_all: every patch token is encoded
    hidden = int(torch.nonzero(mask[0])[0])  # a non-context patch
    context = int(torch.nonzero(mask[0] == 0)[0])

    def perturbed(patch: int) -> torch.Tensor:
        y = x.clone()
        r, c = divmod(patch, 8)
        y[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 3.0
        return masked_latent(model, y)[0]  # same seed: same context

    out = perturbed(hidden)
    others = [i for i in range(1 + N) if i != 1 + hidden]
    assert torch.allclose(out[:, others], base[:, others], atol=1e-6)  # class token and every other patch
    assert not torch.allclose(out[:, 1 + hidden], base[:, 1 + hidden], atol=1e-3)
    out = perturbed(context)
    others = [i for i in range(1 + N) if i != 1 + context]
    changed = (out[0, others] - base[0, others]).abs().amax(-1) > 1e-4
    assert bool(changed.all())  # a context patch is a key for everyone, the class token included


@torch.no_grad()
def test_keys_and_values_are_each_layers_context_hidden_states():
    """The masked encoder equals an explicit loop where, in every block, K/V are computed from that block's
    own hidden states of the class token and the context (per-layer, not layer 0's reused)."""
    model = small_mp3(mask_ratio=0.5)
    enc = model.encoder
    x = torch.randn(2, 3, 32, 32)
    ids_keep, _, _ = random_masking(2, N, 0.5, generator=torch.Generator().manual_seed(1))
    tokens, _ = model.tokenize(x)
    got = model.encode(tokens, ids_keep)

    h = enc.add_prefix(tokens)
    keys = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids_keep + 1], 1)
    for blk in enc.blocks:
        q, k, v = blk.attn.qkv_heads(blk.norm1(h))
        take = keys[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        att = torch.nn.functional.scaled_dot_product_attention(q, k.gather(2, take), v.gather(2, take))
        h = h + blk.attn.proj(att.transpose(1, 2).reshape(h.shape))
        h = h + blk.mlp(blk.norm2(h))
    assert torch.allclose(got, enc.norm(h), atol=1e-5)


def test_query_all_false_encodes_the_context_only_and_scores_it_only():
    model = small_mp3(mask_ratio=0.75, query_all=False)
    counts = []
    handles = [blk.register_forward_hook(lambda m, i, o: counts.append(i[0].shape[1])) for blk in model.encoder.blocks]
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_masked(x, generator=torch.Generator().manual_seed(0))
    for hd in handles:
        hd.remove()
    K = N // 4
    assert counts == [1 + K] * len(model.encoder.blocks)
    ids_keep, _, _ = random_masking(2, N, 0.75, generator=torch.Generator().manual_seed(0))
    direct = model.decoder(out.latent[:, 1:])  # the context's logits, in ids_keep order
    assert torch.allclose(position_loss(out.pred, model.targets(x), model.predicting(out.mask)),
                          position_loss(direct, ids_keep))
    assert torch.all(out.pred[out.mask.bool()] == 0)  # non-context rows predict nothing
    assert model.training_step({"image": x}, 0)["loss"].isfinite()


# -- loss and accuracy ----------------------------------------------------------------------------
def test_position_loss_is_cross_entropy_against_raster_indices_written_out():
    model = small_mp3(mask_ratio=0.75).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    step = model.training_step({"image": x}, 0)
    torch.manual_seed(5)
    logits = model.forward_masked(x).pred.detach().double()
    total = 0.0
    for b in range(2):
        for n in range(N):  # every patch predicts its raster index n
            total += -(logits[b, n, n] - torch.logsumexp(logits[b, n], 0)).item()
    assert step["loss"].item() == pytest.approx(total / (2 * N), rel=1e-5)
    hits = sum(int(logits[b, n].argmax() == n) for b in range(2) for n in range(N))
    assert step["pos_acc"].item() == pytest.approx(hits / (2 * N))
    weight = torch.zeros(2, N)
    weight[0, 3] = weight[1, 7] = 1  # averaged over the predicting tokens only
    expected = -(logits[0, 3, 3] - torch.logsumexp(logits[0, 3], 0) + logits[1, 7, 7] - torch.logsumexp(logits[1, 7], 0)) / 2
    assert position_loss(logits, model.targets(x), weight).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pos_acc_on_hand_made_logits():
    logits = torch.tensor([[[5.0, 1.0, 0.0],    # -> 0, right
                            [0.0, 1.0, 3.0],    # -> 2, wrong (is 1)
                            [0.0, 0.0, 9.0]]])  # -> 2, right
    positions = torch.tensor([[0, 1, 2]])
    assert position_top1(logits, positions).item() == pytest.approx(2 / 3)
    assert position_top1(logits, positions, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(1 / 2)
    assert position_top1(logits, positions, torch.tensor([[0.0, 0.0, 1.0]])).item() == 1.0
    assert position_loss(torch.full((1, 3, 3), 0.0), positions).item() == pytest.approx(math.log(3))


def test_position_accuracy_for_the_benchmark():
    model = small_mp3().train()
    x = torch.randn(3, 3, 32, 32)
    full = position_accuracy(model, x, mask_ratio=0.0)
    assert model.training  # restored
    with torch.no_grad():
        logits = model.decoder(model.encoder.eval().forward_features(x)[:, 1:])  # full context = the plain ViT
    model.train()
    assert full == pytest.approx((logits.argmax(-1) == torch.arange(N)).float().mean().item())
    a = position_accuracy(model, x, generator=torch.Generator().manual_seed(0))
    b = position_accuracy(model, x, generator=torch.Generator().manual_seed(0))
    assert a == b and 0.0 <= a <= 1.0
    with pytest.raises(ZooError, match="mask_ratio"):
        position_accuracy(model, x, mask_ratio=1.0)


# -- learning ---------------------------------------------------------------------------------------
def test_position_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = small_mp3().train()
    imgs = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=3e-3, betas=(0.9, 0.95))
    losses, accs = [], []
    for step in range(25):
        out = model.training_step({"image": imgs}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        accs.append(out["pos_acc"].item())
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert sum(accs[-3:]) > sum(accs[:3]), accs
    assert torch.all(model.encoder.pos_embed == 0)  # frozen: never trained


# -- export, contract ---------------------------------------------------------------------------------
def test_export_has_zero_position_embedding_and_matches_the_encoder(isolated_zoo_home):
    model = small_mp3()
    exported = model.export("vit_nano_patch4_32.mp3_test")
    enc = exported["vit_nano_patch4_32.mp3_test"]
    assert enc is model.encoder is model.backbone()
    zoo.publish(enc, "vit_nano_patch4_32.mp3_test", card={"recipe": "mp3"})
    back = zoo.load("vit_nano_patch4_32.mp3_test").eval()
    assert torch.all(back.pos_embed == 0) and back.pos_embed_type == "learn"  # fine-tuning learns one from zero
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.forward_features(x), full_context(model, x), atol=1e-6)


def test_registered_data_and_param_groups():
    entry = RECIPES.get("mp3")
    assert entry.factory is MP3 and entry.meta["family"] == "mae"
    model = RECIPES.build("mp3", arch="vit_nano_patch4_32", **SMALL)
    assert isinstance(model, Method)
    spec = model.data_spec()
    assert spec.fields == ("image",) and spec.train_transform["scale"] == (0.2, 1.0)
    named = dict(model.named_parameters())
    grouped = {id(p) for g in model.param_groups(0.05) for p in g["params"]}
    assert id(named["encoder.pos_embed"]) not in grouped
    assert id(named["decoder.fc.weight"]) in grouped and named["decoder.fc.weight"].shape == (N, 32)
    assert not any(k.startswith("decoder.decoder_") for k in named)  # no pixel decoder


def test_draw_writes_the_position_picture(tmp_path):
    model = small_mp3()
    paths = model.draw({"image": torch.randn(3, 3, 32, 32)}, tmp_path)
    assert [p.name for p in paths] == ["positions.png"] and paths[0].stat().st_size > 0


def test_bad_arguments_are_one_line_errors():
    for kwargs, match in [
        (dict(pos_embed="sincos"), "no position embedding"),
        (dict(mask_ratio=1.0), r"mask_ratio.*\[0, 1\)"),
        (dict(mask_ratio=-0.1), r"mask_ratio.*\[0, 1\)"),
        (dict(query_all="yes"), "query_all"),
        (dict(decoder_dim=64), "unknown argument 'decoder_dim'"),
        (dict(mask_ratoi=0.5), "did you mean 'mask_ratio'"),
        (dict(global_pool="avg"), "global_pool"),
    ]:
        with pytest.raises(ConfigError, match=match) as err:
            small_mp3(**kwargs)
        assert "\n" not in str(err.value)
    assert small_mp3(mask_ratio=0.0).mask_ratio == 0.0  # eta = 0: the full context is allowed
    with pytest.raises(ZooError, match="resize them to 32x32") as err:
        small_mp3().training_step({"image": torch.randn(2, 3, 64, 64)}, 0)
    assert "\n" not in str(err.value)
