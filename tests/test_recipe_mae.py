"""MAE recipe: masking, patchify order, the norm-pix loss, the encoder's visible-only input,
a real learning check, export and official-checkpoint compatibility, weight-decay groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec, Method
from zoo.recipes.mae import (
    MAE,
    MAEDecoder,
    from_official_keys,
    mae_loss,
    patchify,
    random_masking,
    to_official_keys,
    unpatchify,
)
from zoo.registry import RECIPES

SMALL_DECODER = dict(decoder_dim=64, decoder_depth=2, decoder_heads=4)


def small_mae(**kw) -> MAE:
    return MAE("vit_nano_patch4_32", **{**SMALL_DECODER, **kw})


# -- masking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_random_masking_invariants(ratio):
    B, N = 5, 64
    ids_keep, ids_restore, mask = random_masking(B, N, ratio)
    K = int(N * (1 - ratio))
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, N) and mask.shape == (B, N)
    assert (mask.sum(1) == N - K).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(B):
        kept = set(ids_keep[b].tolist())
        assert len(kept) == K
        removed = set(torch.nonzero(mask[b]).flatten().tolist())
        assert removed == set(range(N)) - kept  # 1 exactly on the removed indices
    # ids_restore undoes the shuffle: a shuffled sequence (kept first) gathers back to 0..N-1
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(N).expand(B, N))
    values = torch.randn(B, N, 3)
    shuffled = torch.gather(values, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3)), values)


def test_random_masking_is_seeded_by_its_generator():
    def draw(seed):
        return random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (4, 12)  # int(49 * 0.25)


def test_random_masking_rejects_bad_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, 1.0)


# -- patchify ------------------------------------------------------------------------------------
def test_patchify_unpatchify_round_trip():
    imgs = torch.randn(2, 3, 32, 32)
    x = patchify(imgs, 4)
    assert x.shape == (2, 64, 48)
    assert torch.equal(unpatchify(x, 4, 3), imgs)
    rect = torch.randn(2, 1, 8, 12)
    assert torch.equal(unpatchify(patchify(rect, 4), 4, 1, grid=(2, 3)), rect)


def test_patchify_order_is_row_col_channel():
    """Hand-built image: pixel value encodes (channel, y, x); check MAE's patch and in-patch order."""
    C, H, W, p = 3, 4, 6, 2
    img = torch.zeros(1, C, H, W)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                img[0, c, y, x] = 100 * c + 10 * y + x
    patches = patchify(img, p)[0]  # (N = 2*3, p*p*C)
    for n in range(patches.shape[0]):
        gy, gx = divmod(n, W // p)  # patches row-major
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    idx = (i * p + j) * C + c  # (row, col, channel), channel last
                    assert patches[n, idx] == 100 * c + 10 * (gy * p + i) + (gx * p + j)


# -- loss ------------------------------------------------------------------------------------
def loop_loss(pred, target, mask, norm_pix):
    total, count = 0.0, 0.0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            t = target[b, n].double()
            if norm_pix:
                mean = t.sum() / t.numel()
                var = ((t - mean) ** 2).sum() / (t.numel() - 1)  # unbiased
                t = (t - mean) / (var + 1e-6).sqrt()
            err = ((pred[b, n].double() - t) ** 2).sum() / t.numel()
            total += float(err) * float(mask[b, n])
            count += float(mask[b, n])
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_loop(norm_pix):
    pred, target = torch.randn(3, 16, 12), torch.randn(3, 16, 12) * 2 + 0.5
    _, _, mask = random_masking(3, 16, 0.75)
    got = mae_loss(pred, target, mask, norm_pix)
    assert got.ndim == 0
    assert abs(float(got) - loop_loss(pred, target, mask, norm_pix)) < 1e-5


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_counts_removed_patches(norm_pix):
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    _, _, mask = random_masking(2, 16, 0.75)
    base = mae_loss(pred, target, mask, norm_pix)
    kept = torch.nonzero(mask == 0)[0]
    removed = torch.nonzero(mask == 1)[0]
    changed = pred.clone()
    changed[kept[0], kept[1]] += 5.0
    assert torch.equal(mae_loss(changed, target, mask, norm_pix), base)
    changed = pred.clone()
    changed[removed[0], removed[1]] += 5.0
    assert not torch.allclose(mae_loss(changed, target, mask, norm_pix), base)


def test_norm_pix_changes_the_target():
    pred, target = torch.zeros(1, 4, 12), torch.randn(1, 4, 12) * 3 + 2
    mask = torch.ones(1, 4)
    assert not torch.allclose(mae_loss(pred, target, mask, True), mae_loss(pred, target, mask, False))
    # a perfect prediction of the standardised patches gives zero loss
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert float(mae_loss(t, target, mask, True)) < 1e-10


# -- model -----------------------------------------------------------------------------------
def test_forward_shapes_and_visible_only_encoder():
    model = small_mae(mask_ratio=0.75)
    counts = []
    handles = [blk.register_forward_hook(lambda m, i, o: counts.append(i[0].shape[1])) for blk in model.encoder.blocks]
    dec_counts = []
    handles += [blk.register_forward_hook(lambda m, i, o: dec_counts.append(i[0].shape[1])) for blk in model.decoder.decoder_blocks]
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs)
    for h in handles:
        h.remove()
    N, K = 64, int(64 * 0.25)
    assert counts == [1 + K] * len(model.encoder.blocks)  # cls + visible patches only
    assert dec_counts == [1 + N] * 2  # the decoder sees every position
    assert pred.shape == (2, N, 4 * 4 * 3) and mask.shape == (2, N)
    assert (mask.sum(1) == N - K).all()
    assert loss.ndim == 0 and torch.isfinite(loss)
    counts.clear()
    model(imgs, mask_ratio=0.5)  # the ratio is a forward argument too


def test_forward_is_reproducible_with_a_generator():
    model = small_mae()
    imgs = torch.randn(2, 3, 32, 32)
    a = model(imgs, generator=torch.Generator().manual_seed(3))
    b = model(imgs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_decoder_unshuffles_tokens_into_place():
    """With identity-like pieces, the token at each position is the encoder token of that patch."""
    dec = MAEDecoder((2, 2), embed_dim=8, decoder_dim=8, depth=0, num_heads=2, patch_size=1, in_chans=8)
    with torch.no_grad():
        dec.decoder_embed.weight.copy_(torch.eye(8))
        dec.decoder_embed.bias.zero_()
        dec.decoder_pos_embed.zero_()
        dec.mask_token.fill_(-7.0)
    dec.decoder_norm = nn.Identity()
    dec.decoder_pred = nn.Identity()
    ids_keep, ids_restore, mask = random_masking(1, 4, 0.5, generator=torch.Generator().manual_seed(0))
    tokens = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 8)  # token i carries value i
    latent = torch.cat([torch.full((1, 1, 8), 99.0), torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 8))], 1)
    out = dec(latent, ids_restore)[0, :, 0]
    for n in range(4):
        assert out[n] == (-7.0 if mask[0, n] else float(n))


def test_mae_init():
    model = small_mae()
    enc = model.encoder
    qkv = enc.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5  # xavier_uniform over the fused (3D, D) matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.all(enc.blocks[0].attn.qkv.bias == 0) and torch.all(model.decoder.decoder_pred.bias == 0)
    assert torch.all(enc.norm.weight == 1) and torch.all(enc.blocks[0].norm1.bias == 0)
    w = enc.patch_embed.proj.weight
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5  # xavier on the (D, C*p*p) view, not Conv2d's default
    assert 0.9 * bound < w.abs().max() <= bound
    assert 0.01 < enc.cls_token.std() < 0.04 and 0.01 < model.decoder.mask_token.std() < 0.04
    assert not enc.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad
    assert torch.all(enc.pos_embed[:, 0] == 0) and torch.all(model.decoder.decoder_pos_embed[:, 0] == 0)


def train(model, imgs, steps=20, lr=1e-3):
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=lr, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        out = model.training_step({"image": imgs}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["mask_ratio"] == pytest.approx(model.mask_ratio)
    return losses


def test_learns_to_fill_in_from_visible_patches():
    """Images of one random colour each: a removed patch's colour is knowable only from the visible
    patches of the same image (masks change every step), so beating the zero prediction by far
    means information flows from the encoder's visible tokens to the decoder's mask tokens."""
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=False)
    imgs = torch.randn(8, 3, 1, 1).expand(8, 3, 32, 32).contiguous()
    losses = train(model, imgs)
    _, _, mask = model(imgs)
    zero_pred = float(mae_loss(torch.zeros(8, 64, 48), patchify(imgs, 4), mask, norm_pix=False))
    assert losses[-1] < 0.3 * zero_pred and losses[-1] < 0.3 * losses[0], (losses, zero_pred)


def test_norm_pix_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = small_mae()
    imgs = torch.nn.functional.avg_pool2d(torch.randn(4, 3, 32, 32), 3, 1, 1)
    losses = train(model, imgs)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruct_returns_pixel_images(monkeypatch, norm_pix):
    model = small_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32) * 2 + 1
    out = model.reconstruct(imgs, generator=torch.Generator().manual_seed(0))
    for key in ("original", "masked", "reconstruction", "pasted"):
        assert out[key].shape == imgs.shape
    m = out["mask"]
    assert m.shape == (2, 1, 32, 32) and m.mean() == pytest.approx(0.75)
    assert torch.equal(out["masked"], imgs * (1 - m))
    assert torch.allclose(out["pasted"], imgs * (1 - m) + out["reconstruction"] * m)
    # a decoder that predicts the loss target exactly reconstructs the image exactly: with
    # norm-pix, de-normalisation uses each target patch's own mean and variance
    target = patchify(imgs, 4)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    monkeypatch.setattr(model.decoder, "forward", lambda latent, ids_restore, grid=None: target)
    out = model.reconstruct(imgs)
    assert torch.allclose(out["reconstruction"], imgs, atol=1e-5)
    assert torch.allclose(out["pasted"], imgs, atol=1e-5)


# -- contract ------------------------------------------------------------------------------------
def test_registered_and_builds_from_registry():
    import zoo.recipes.mae  # noqa: F401

    entry = RECIPES.get("mae")
    assert entry.factory is MAE
    model = RECIPES.build("mae", arch="vit_nano_patch4_32", **SMALL_DECODER)
    assert isinstance(model, Method)
    spec = model.data_spec()
    assert isinstance(spec, DataSpec) and spec.fields == ("image",)
    assert spec.train_transform["scale"] == (0.2, 1.0) and spec.train_transform["hflip"] == 0.5


def test_data_spec_transform_builds():
    from zoo.data.transforms import train_transform

    model = small_mae()
    tf = train_transform(model.encoder, **model.data_spec().train_transform)
    out = tf(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="global_pool"):
        small_mae(global_pool="avg")
    with pytest.raises(ConfigError, match="mask_ratio"):
        small_mae(mask_ratio=1.0)
    with pytest.raises(ConfigError, match="did you mean 'decoder_depth'"):
        small_mae(decoder_dept=3)
    with pytest.raises(zoo.errors.UnknownNameError):
        MAE("vit_nano_patch4_33")
    model = small_mae(drop_path_rate=0.1, mlp_ratio=2.0)  # other ViT arguments pass through to the encoder
    assert model.encoder.zoo_args["mlp_ratio"] == 2.0 and model.encoder.zoo_args["pos_embed"] == "sincos"


def test_param_groups_follow_mae_rule():
    model = small_mae()
    groups = model.param_groups(0.05)
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert ids[id(named["encoder.cls_token"])] == 0.05
    assert ids[id(named["decoder.mask_token"])] == 0.05
    assert ids[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.05
    assert ids[id(named["encoder.patch_embed.proj.weight"])] == 0.05
    for name in ("encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight", "encoder.patch_embed.proj.bias",
                 "decoder.decoder_norm.weight", "decoder.decoder_blocks.0.norm1.bias", "decoder.decoder_pred.bias"):
        assert ids[id(named[name])] == 0.0, name
    assert id(named["encoder.pos_embed"]) not in ids and id(named["decoder.decoder_pos_embed"]) not in ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(trainable)


def test_export_publishes_and_reloads(isolated_zoo_home):
    model = small_mae()
    exported = model.export("vit_nano_patch4_32.mae_test")
    assert set(exported) == {"vit_nano_patch4_32.mae_test"}
    enc = exported["vit_nano_patch4_32.mae_test"]
    assert enc is model.encoder is model.backbone()
    zoo.publish(enc, "vit_nano_patch4_32.mae_test", card={"recipe": "mae"})
    back = zoo.load("vit_nano_patch4_32.mae_test")
    assert set(back.state_dict()) == set(enc.state_dict())
    assert back.pos_embed_type == "sincos"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), enc.eval().forward_features(x))


def test_official_style_checkpoint_loads_into_vit(tmp_path):
    model = small_mae()
    sd = model.official_state_dict()
    expected = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "decoder_embed.weight", "decoder_norm.bias",
                "decoder_pred.weight", "blocks.3.mlp.fc2.bias", "decoder_blocks.1.attn.qkv.weight"}
    assert expected <= set(sd)  # the full key set is checked against ReferenceMAE below
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd}, path)
    vit = zoo.load(path, arch="vit_nano_patch4_32", pos_embed="sincos")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.encoder.eval().forward_features(x))
    # and back: the official keys load into a fresh MAE strictly
    other = small_mae()
    other.load_official_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert from_official_keys(to_official_keys(model.state_dict())).keys() == model.state_dict().keys()


class ReferenceMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT's layout and forward, written from the spec with timm's
    PatchEmbed and Block, taking the masking noise as an argument for a side-by-side check."""

    def __init__(self, embed_dim=128, depth=4, heads=4, dec_dim=64, dec_depth=2, dec_heads=4, p=4, img=32):
        super().__init__()
        from functools import partial

        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block as TimmBlock

        from zoo.models.vit import sincos_pos_embed_2d

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.p = p
        self.patch_embed = PatchEmbed(img, p, 3, embed_dim)
        g = img // p
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, g, g), requires_grad=False)
        self.blocks = nn.ModuleList([TimmBlock(embed_dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dec_dim, g, g), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([TimmBlock(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, p * p * 3)

    def encode(self, x):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs, noise, ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        B, N, D = x.shape
        keep = int(N * (1 - ratio))
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].repeat(1, 1, D))
        mask = torch.ones(B, N)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        toks = torch.cat([x[:, 1:], self.mask_token.repeat(B, N + 1 - x.shape[1], 1)], 1)
        toks = torch.gather(toks, 1, restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], toks], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p, h = self.p, imgs.shape[2] // self.p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(B, 3, h, p, h, p)).reshape(B, h * h, p * p * 3)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def test_matches_reference_mae_side_by_side():
    """Same weights, same noise: our MAE and a models_mae-layout reference agree on loss, pred, mask."""
    ref = ReferenceMAE().eval()
    with torch.no_grad():  # non-trivial norms and biases so a mis-mapped key would show
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model = small_mae().eval()
    model.load_official_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(3, 3, 32, 32)
    gen = torch.Generator().manual_seed(5)
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss, pred, mask = model(imgs, generator=gen)
        ref_loss, ref_pred, ref_mask = ref(imgs, noise)
        assert torch.equal(mask, ref_mask)
        assert torch.allclose(pred, ref_pred, atol=1e-5), (pred - ref_pred).abs().max()
        assert torch.allclose(loss, ref_loss, atol=1e-5)
        assert torch.allclose(model.encoder.forward_features(imgs), ref.encode(imgs), atol=1e-5)
    assert set(model.official_state_dict()) == set(ref.state_dict())
