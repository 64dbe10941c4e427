"""DINO + iBOT as a Method: registration and recipe, the data spec (multi-crop views, collate masks),
a training step against a manual recomputation from the pure losses, packing, centering, schedules,
the EMA and last-layer hooks, backbone/export/init, drawing, config errors, and an official-DINO
named checkpoint. The pure losses are tested on their own in test_recipe_dino_losses.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.errors import ConfigError
from zoo.models.vit import VisionTransformer
from zoo.recipes.base import DataSpec, Method, Progress
from zoo.recipes.dino import (
    DINO,
    MaskedCollate,
    MultiCropViews,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax_centered,
)
from zoo.registry import RECIPES

ARCH = "vit_nano_patch4_32"
TINY = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, depth=2, n_local_crops=2, local_crops_size=16,
            drop_path_rate=0.0)
B = 4  # images per batch


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small gain nothing from intra-op threads, and two threads on a busy 2-core machine
    spin-wait each other ~20x slower; conftest sets the count back before every test."""
    torch.set_num_threads(1)


def tiny_dino(**kw) -> DINO:
    return DINO(ARCH, **{**TINY, **kw})


def pil_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def make_batch(method: DINO, n: int = B) -> dict:
    """A batch as the loader builds it: the spec's per-sample transform, then its collate."""
    spec = method.data_spec()
    samples = [spec.transform({"image": pil_image(i)}) for i in range(n)]
    collate = spec.collate or torch.utils.data.default_collate
    return collate(samples)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every floating parameter a little, so teacher and student (or copies) differ."""
    for p in module.parameters():
        p.add_(torch.randn_like(p) * scale)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# -- registration and the CPU recipe ---------------------------------------------------------------
def test_registered_with_its_cpu_recipe():
    from zoo.config import load_config
    from zoo.engine.trainer import build_method

    entry = RECIPES.get("dino")
    assert entry.factory is DINO
    assert entry.meta["cpu_recipe"] == "dino_vit_tiny_patch4_32_fractals"
    cfg = load_config(entry.meta["cpu_recipe"])  # by its bare name, as an installed recipe
    assert cfg.method.name == "dino" and cfg.model.arch == "vit_tiny_patch4_32"
    assert cfg.method.args["n_local_crops"] == 4 and cfg.method.args["local_crops_size"] == 16
    # the recipe's arguments are all DINO's (or the ViT's): it builds, shrunk through dotted overrides
    small = load_config(entry.meta["cpu_recipe"], {"method.out_dim": 64, "method.hidden_dim": 32,
                                                   "method.bottleneck_dim": 16, "model.depth": 2})
    method = build_method(small)
    assert isinstance(method, DINO) and isinstance(method, Method)
    assert method.n_local == 4 and len(method.student.backbone.blocks) == 2
    assert method.student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # model.drop_path_rate


# -- data spec ---------------------------------------------------------------------------------------
def test_transform_makes_global_then_local_views():
    method = tiny_dino()
    spec = method.data_spec()
    assert isinstance(spec, DataSpec) and spec.fields == ("image",)
    assert isinstance(spec.transform, MultiCropViews) and isinstance(spec.collate, MaskedCollate)
    out = spec.transform({"image": pil_image(0), "cls": 3})
    assert set(out) == {"views"}
    assert [tuple(v.shape) for v in out["views"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 for v in out["views"])


@pytest.mark.parametrize("mask_probability", [0.5, 0.25])
def test_collate_stacks_views_and_draws_masks(mask_probability):
    method = tiny_dino(mask_probability=mask_probability, mask_ratio=(0.1, 0.5))
    n = 8
    batch = make_batch(method, n)
    assert [tuple(v.shape) for v in batch["views"]] == [(n, 3, 32, 32)] * 2 + [(n, 3, 16, 16)] * 2
    masks = batch["masks"]
    n_patches = 64
    assert masks.shape == (2 * n, n_patches) and masks.dtype == torch.bool
    per_image = masks.sum(1)
    assert int((per_image > 0).sum()) == int(2 * n * mask_probability)  # DINOv2: int(n * p) images masked
    assert int(per_image.max()) <= int(0.5 * n_patches)  # at most the top of mask_ratio


def test_collate_masks_are_reproducible_under_manual_seed():
    method = tiny_dino()
    spec = method.data_spec()
    samples = [spec.transform({"image": pil_image(i)}) for i in range(B)]

    def masks(seed):
        torch.manual_seed(seed)
        return spec.collate(samples)["masks"]

    a, b, c = masks(7), masks(7), masks(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_ibot_there_is_no_collate_and_no_masks():
    method = tiny_dino(ibot_weight=0.0)
    assert method.data_spec().collate is None
    batch = make_batch(method)
    assert "masks" not in batch
    out = method.training_step(batch, 0)
    assert "loss_ibot" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.mask_token.grad is None  # nothing masked, so the token is unused


# -- the training step -------------------------------------------------------------------------------
def test_training_step_gradients_reach_the_student_only():
    method = tiny_dino().train()
    assert not method.teacher.training and not method.teacher.backbone.training  # frozen state
    assert method.student.training
    batch = make_batch(method)
    assert batch["masks"].any()
    out = method.training_step(batch, 0)
    assert set(out) == {"loss", "loss_dino", "loss_ibot", "loss_koleo", "teacher_entropy"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    for key, value in out.items():
        assert torch.isfinite(value), key
    out["loss"].backward()
    student = method.student
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    for p in (student.backbone.patch_embed.proj.weight, student.backbone.blocks[0].attn.qkv.weight,
              student.backbone.cls_token, student.head.mlp[0].weight,
              student.head.last_layer.parametrizations.weight.original1, method.mask_token):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, p in method.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # the teacher is state: eval mode whatever the method's mode, and checkpointed whole
    method.train()
    assert not method.teacher.training and all(not m.training for m in method.teacher.modules())
    sd = method.state_dict()
    teacher_keys = {k for k in sd if k.startswith("teacher.")}
    assert teacher_keys == {f"teacher.{k}" for k in method.teacher.state_dict()}
    assert {"center", "patch_center", "mask_token"} <= set(sd)
    assert torch.equal(sd["teacher.backbone.pos_embed"], method.teacher.backbone.pos_embed)


def manual_step(method: DINO, batch: dict, temp: float) -> dict[str, torch.Tensor]:
    """The DINO + iBOT + KoLeo loss, recomputed from the pure functions view by view."""
    views, masks = batch["views"], batch["masks"]
    n_global, b = 2, len(views[0])
    globals_ = torch.cat(views[:n_global])
    with torch.no_grad():
        t_tokens = method.teacher.backbone.forward_features(globals_)
        t_cls = method.teacher.head(t_tokens[:, 0])
        t_probs = teacher_softmax_centered(t_cls, method.center, temp)
        t_patch = teacher_softmax_centered(method.teacher.head(t_tokens[:, 1:][masks]), method.patch_center, temp)
    vit = method.student.backbone
    s_global = vit.forward_features(globals_, mask=masks, mask_token=method.mask_token)
    s_views = [method.student.head(s_global[i * b:(i + 1) * b, 0]) for i in range(n_global)]
    s_views += [method.student.head(vit.forward_features(v)[:, 0]) for v in views[n_global:]]
    dino = dino_loss(s_views, [t_probs[i * b:(i + 1) * b] for i in range(n_global)], method.student_temp)
    ibot = ibot_patch_loss(method.student.head(s_global[:, 1:][masks]), t_patch, masks, method.student_temp)
    koleo = koleo_loss(s_global[:b, 0]) + koleo_loss(s_global[b:, 0])
    return {"dino": dino, "ibot": ibot, "koleo": koleo, "loss": 1.0 * dino + 0.5 * ibot + 0.2 * koleo}


def test_loss_equals_manual_recomputation():
    method = tiny_dino(ibot_weight=0.5, koleo_weight=0.2).train()
    perturb(method.teacher)  # a teacher unlike the student, so taking targets from the wrong one shows
    with torch.no_grad():
        method.center.copy_(torch.randn_like(method.center))
        method.patch_center.copy_(torch.randn_like(method.patch_center))
    method.scheduled["teacher_temp"] = 0.05  # the engine's value is what the step uses
    batch = make_batch(method)
    expected = manual_step(method, batch, temp=0.05)
    out = method.training_step(batch, 0)
    for key in ("dino", "ibot", "koleo"):
        torch.testing.assert_close(out[f"loss_{key}"], expected[key].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], expected["loss"], rtol=1e-5, atol=1e-5)
    # a different temperature gives a different loss: the scheduled value is read
    assert not torch.allclose(manual_step(method, batch, temp=0.07)["dino"], expected["dino"])


def test_packed_crops_give_the_same_loss():
    method = tiny_dino().train()
    batch = make_batch(method)
    centers = method.center.clone(), method.patch_center.clone()
    shapes: list[tuple[int, ...]] = []
    method.student.backbone.blocks[0].register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    results = {}
    for pack in (False, True):
        method.pack_crops = pack
        with torch.no_grad():
            method.center.copy_(centers[0])
            method.patch_center.copy_(centers[1])
        method.zero_grad()
        shapes.clear()
        out = method.training_step(batch, 0)
        out["loss"].backward()
        results[pack] = out, method.student.backbone.blocks[0].attn.qkv.weight.grad.clone()
        # the student's blocks really ran the crops apart, or as one packed sequence
        dim = method.student.backbone.embed_dim
        assert shapes == ([(1, 2 * B * 65 + 2 * B * 17, dim)] if pack else [(2 * B, 65, dim), (2 * B, 17, dim)])
    (a, grad_a), (b, grad_b) = results[False], results[True]
    for key in ("loss", "loss_dino", "loss_ibot", "loss_koleo", "teacher_entropy"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)  # float32, block-diagonal attention
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


# -- centering -----------------------------------------------------------------------------------------
def test_center_moves_toward_the_teacher_mean_logit():
    method = tiny_dino(center_momentum=0.8).train()
    with torch.no_grad():
        method.center.copy_(torch.randn_like(method.center))
    before, patch_before = method.center.clone(), method.patch_center.clone()
    batch = make_batch(method)
    globals_ = torch.cat(batch["views"][:2])
    with torch.no_grad():
        tokens = method.teacher.backbone.forward_features(globals_)
        mean_logit = method.teacher.head(tokens[:, 0]).mean(0, keepdim=True)
        mean_patch = method.teacher.head(tokens[:, 1:][batch["masks"]]).mean(0, keepdim=True)
    method.training_step(batch, 0)
    torch.testing.assert_close(method.center - before, (1 - 0.8) * (mean_logit - before), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method.patch_center, 0.8 * patch_before + 0.2 * mean_patch, rtol=1e-4, atol=1e-6)


def test_sinkhorn_knopp_step_leaves_the_center_alone():
    method = tiny_dino(centering="sinkhorn_knopp").train()
    with torch.no_grad():
        method.center.copy_(torch.randn_like(method.center))
    before, patch_before = method.center.clone(), method.patch_center.clone()
    batch = make_batch(method)
    globals_ = torch.cat(batch["views"][:2])
    with torch.no_grad():
        t_cls = method.teacher.head(method.teacher.backbone.forward_features(globals_)[:, 0])
        targets = sinkhorn_knopp(t_cls, 0.07)
        s_global = method.student.backbone.forward_features(globals_, mask=batch["masks"], mask_token=method.mask_token)
        s_views = list(method.student.head(s_global[:, 0]).chunk(2))
        s_views += [method.student.head(method.student.backbone.forward_features(v)[:, 0]) for v in batch["views"][2:]]
        expected = dino_loss(s_views, list(targets.chunk(2)), method.student_temp)
    out = method.training_step(batch, 0)
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.equal(method.center, before) and torch.equal(method.patch_center, patch_before)
    torch.testing.assert_close(out["loss_dino"], expected, rtol=1e-5, atol=1e-5)


# -- schedules and hooks -------------------------------------------------------------------------------
def test_schedules_momentum_cosine_and_teacher_temp_warmup():
    method = tiny_dino(momentum_teacher=0.99, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=3)
    schedules = method.schedules()
    assert set(schedules) == {"momentum", "teacher_temp"}
    momentum, temp = schedules["momentum"], schedules["teacher_temp"]
    total, per_epoch = 100, 10
    assert momentum(0, total, per_epoch) == pytest.approx(0.99)
    assert momentum(total // 2, total, per_epoch) == pytest.approx(0.995)  # cosine midpoint
    assert momentum(total, total, per_epoch) == pytest.approx(1.0)
    values = [momentum(s, total, per_epoch) for s in range(total + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    # linear warmup over 3 epochs = 30 steps, then constant
    assert temp(0, total, per_epoch) == pytest.approx(0.04)
    assert temp(10, total, per_epoch) == pytest.approx(0.05)
    assert temp(15, total, per_epoch) == pytest.approx(0.055)
    assert temp(30, total, per_epoch) == pytest.approx(0.07)
    assert temp(99, total, per_epoch) == pytest.approx(0.07)


def test_on_step_end_is_the_ema_update():
    method = tiny_dino()
    perturb(method.student)  # as if the optimizer had stepped
    old = {k: v.clone() for k, v in method.teacher.named_parameters()}
    student = dict(method.student.named_parameters())
    method.scheduled["momentum"] = 0.5
    method.on_step_end(Progress(step=1, total_steps=10, epoch=0, steps_per_epoch=5))
    for name, p in method.teacher.named_parameters():
        torch.testing.assert_close(p, 0.5 * old[name] + 0.5 * student[name], rtol=0, atol=1e-6)
    w = method.teacher.backbone.blocks[0].attn.qkv.weight
    assert not torch.equal(w, old["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(w, method.student.backbone.blocks[0].attn.qkv.weight)
    assert not method.teacher.backbone.cls_token.requires_grad


@pytest.mark.parametrize("separate_ibot_head,norm_last_layer", [(False, True), (True, False)])
def test_before_optimizer_step_freezes_the_last_layer_in_epoch_0(separate_ibot_head, norm_last_layer):
    method = tiny_dino(separate_ibot_head=separate_ibot_head, norm_last_layer=norm_last_layer,
                       freeze_last_layer=1).train()
    heads = [method.student.head] + ([method.student.ibot_head] if separate_ibot_head else [])
    last = [p for h in heads for p in h.last_layer_parameters()]
    assert len(last) == len(heads) * (1 if norm_last_layer else 2)
    method.training_step(make_batch(method), 0)["loss"].backward()
    assert all(p.grad is not None for p in last)
    method.before_optimizer_step(Progress(step=5, total_steps=10, epoch=1, steps_per_epoch=5))
    assert all(p.grad is not None for p in last)  # epoch 1: the prototypes train
    method.before_optimizer_step(Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=5))
    assert all(p.grad is None for p in last)  # epoch 0: their gradients are dropped
    assert method.student.head.mlp[0].weight.grad is not None  # ... and only theirs
    assert method.student.backbone.cls_token.grad is not None


# -- backbone, export, init -----------------------------------------------------------------------------
def test_backbone_and_export_are_the_teacher_vit(isolated_zoo_home):
    method = tiny_dino()
    perturb(method.teacher)
    vit = method.backbone()
    assert vit is method.teacher.backbone and isinstance(vit, VisionTransformer)
    assert not any("mask_token" in k for k in vit.state_dict())
    exported = method.export("vit_nano_patch4_32.t")
    assert set(exported) == {"vit_nano_patch4_32.t"} and exported["vit_nano_patch4_32.t"] is vit
    zoo.publish(vit, "vit_nano_patch4_32.t", card={"recipe": "dino"})
    back = zoo.load("vit_nano_patch4_32.t")
    assert len(back.blocks) == 2 and set(back.state_dict()) == set(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), vit.eval().forward_features(x), rtol=0, atol=0)


def test_init_backbone_copies_into_student_and_teacher():
    method = tiny_dino()
    source = zoo.create_model(ARCH, depth=2)
    perturb(source)
    method.init_backbone(source, "vit_nano_patch4_32.src")
    src = source.state_dict()
    for part in (method.student.backbone, method.teacher.backbone):
        sd = part.state_dict()
        assert sd.keys() == src.keys()
        assert all(torch.equal(sd[k], src[k]) for k in src)
    # copies, not shared tensors: an EMA step moves the teacher only
    assert method.student.backbone.cls_token.data_ptr() != method.teacher.backbone.cls_token.data_ptr()


def test_draw_writes_attention_png(tmp_path):
    method = tiny_dino().eval()
    batch = make_batch(method)
    with torch.no_grad():
        paths = method.draw(batch, tmp_path)
    assert paths == [tmp_path / "attention.png"]
    with Image.open(paths[0]) as img:
        img.load()
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0


# -- config errors ----------------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_config_errors():
    with pytest.raises(ConfigError) as err:
        tiny_dino(n_global_crops=1)
    msg = one_line(err)
    assert "DINO loss" in msg and "n_global_crops >= 2" in msg and "got 1" in msg
    for key in ("mask_ratio_typo", "decoder_dim"):
        with pytest.raises(ConfigError) as err:
            tiny_dino(**{key: 3})
        msg = one_line(err)
        assert repr(key) in msg and "dino's arguments:" in msg
        assert "out_dim" in msg and "ibot_weight" in msg and "centering" in msg
    with pytest.raises(ConfigError) as err:
        tiny_dino(mask_ratio_typo=3)
    assert "did you mean 'mask_ratio'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        DINO("resnet18", out_dim=64)
    assert "'resnet18' is not a ViT" in one_line(err)
    with pytest.raises(ConfigError) as err:
        tiny_dino(centering="bogus")
    assert "centering" in one_line(err) and "'bogus'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        tiny_dino(global_pool="avg")
    assert "global_pool" in one_line(err)


# -- official DINO checkpoint layout ------------------------------------------------------------------
@pytest.mark.parametrize("separate_ibot_head", [False, True])
def test_official_dino_named_checkpoint_loads_the_teacher(tmp_path, separate_ibot_head):
    """main_dino.py saves {'student': DDP MultiCropWrapper, 'teacher': MultiCropWrapper, ...}; our
    `teacher` module has the same names (`backbone.*`, `head.*`, iBOT's `ibot_head.*`), so zoo.load
    takes its backbone and drops the heads (weight-norm parametrization keys included)."""
    method = tiny_dino(separate_ibot_head=separate_ibot_head)
    perturb(method.teacher)  # teacher != student: the teacher must be the one loaded
    sd = method.state_dict()
    teacher = {k.removeprefix("teacher."): v for k, v in sd.items() if k.startswith("teacher.")}
    assert all(k.startswith(("backbone.", "head.", "ibot_head.")) for k in teacher)
    assert any(k.startswith("ibot_head.") for k in teacher) == separate_ibot_head
    assert {"head.last_layer.parametrizations.weight.original0",
            "head.last_layer.parametrizations.weight.original1"} <= set(teacher)
    student = {"module." + k.removeprefix("student."): v for k, v in sd.items() if k.startswith("student.")}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 3}, path)
    for ckpt in (path, tmp_path / "teacher_only.pth"):
        if ckpt.name == "teacher_only.pth":
            torch.save({"teacher": teacher}, ckpt)
        vit = zoo.load(ckpt, arch=ARCH, depth=2)
        assert isinstance(vit, VisionTransformer) and len(vit.blocks) == 2
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), method.backbone().eval().forward_features(x),
                                       rtol=0, atol=0)
