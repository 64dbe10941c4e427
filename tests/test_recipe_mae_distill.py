"""Self-distillation further pretraining (recipes/mae_distill.py): MAE from a published model plus the squared-L2
distance of the unmasked final class token to a frozen teacher, zero at step 0 when the teacher is the start."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.errors import CheckpointMismatchError, ConfigError
from zoo.recipes.mae_distill import MAEDistill, cls_distillation_loss

TINY = dict(arch="vit_nano_patch4_32", depth=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def published_like(seed: int = 1, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.create_model("vit_nano_patch4_32", pos_embed="sincos", **{"depth": 2, **overrides})


def started(**kw) -> MAEDistill:
    torch.manual_seed(0)
    method = MAEDistill(**{**TINY, **kw})
    method.init_backbone(published_like(), "vit_nano_patch4_32.src")
    return method


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_loss_is_squared_l2_per_sample_averaged_over_the_batch():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    expected = sum(float(((s[i] - t[i]) ** 2).sum()) for i in range(5)) / 5
    assert cls_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_term_is_zero_at_step_0_and_grows_as_the_student_moves():
    method = started()
    source = published_like()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in method.encoder.state_dict().items())
    out = method.training_step({"image": images()}, 0)
    assert out["loss_distill"].item() == 0.0 and out["loss_rec"].item() > 0
    assert out["loss"].item() == pytest.approx(out["loss_rec"].item())

    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert not any(p is q for p in trainable for q in method.teacher.parameters()), "the teacher must not train"
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for step in range(3):
        opt.zero_grad()
        method.training_step({"image": images(seed=step)}, step)["loss"].backward()
        opt.step()
    out = method.training_step({"image": images()}, 3)
    assert out["loss_distill"].item() > 0
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.state_dict().items())


def test_the_term_uses_the_unmasked_final_class_token_and_its_weight():
    method = started(distill_weight=2.5)
    with torch.no_grad():
        method.encoder.blocks[-1].mlp.fc2.bias.add_(0.1)  # the student drifts
    x = images()
    out = method.training_step({"image": x}, 0)
    expected = cls_distillation_loss(method.encoder.forward_features(x)[:, 0], method.teacher.forward_features(x)[:, 0])
    assert out["loss_distill"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_rec"].item() + 2.5 * expected.item(), rel=1e-5)


def test_without_init_from_the_step_says_to_set_it():
    method = MAEDistill(**TINY)
    with pytest.raises(ConfigError, match="init_from"):
        method.training_step({"image": images()}, 0)


def test_init_from_another_architecture_is_refused_in_one_line():
    method = MAEDistill(**TINY)
    with pytest.raises(CheckpointMismatchError) as e:
        method.init_backbone(published_like(depth=3, embed_dim=64, num_heads=2), "other")
    assert "\n" not in str(e.value) and "other" in str(e.value)


def test_the_teacher_copy_is_checkpointed_and_a_fresh_method_resumes_it():
    method = started()
    sd = method.state_dict()
    assert any(k.startswith("teacher.") for k in sd) and bool(sd["initialised"])
    fresh = MAEDistill(**TINY)
    fresh.load_state_dict(sd)
    x = images()
    assert fresh.training_step({"image": x}, 0)["loss_distill"].item() == 0.0  # no init_from needed after a resume


def test_a_named_teacher_is_loaded_frozen_and_not_checkpointed(isolated_zoo_home):
    teacher = published_like(seed=5)
    zoo.publish(teacher, "vit_nano_patch4_32.stage1")
    method = started(teacher="vit_nano_patch4_32.stage1")
    assert not any(k.startswith("teacher.") for k in method.state_dict())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    out = method.training_step({"image": images()}, 0)
    assert out["loss_distill"].item() > 0  # the stage-1 teacher differs from the published start


def test_further_pretraining_learns_a_fixed_batch():
    """What the registry test's 8 steps cannot show (its no-learning run keeps the term at exactly 0, any learning
    run moves the student off its start): the first AdamW steps kick the student away (the term spikes), then the
    total falls while the reconstruction falls below its start."""
    method = started()
    x = images(16)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    rows = []
    for step in range(40):
        out = method.training_step({"image": x}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        rows.append((out["loss"].item(), out["loss_rec"].item(), out["loss_distill"].item()))
    kicked, last = rows[1:6], rows[-5:]
    assert sum(r[0] for r in last) < 0.7 * sum(r[0] for r in kicked), rows
    assert sum(r[1] for r in last) / 5 < rows[0][1], rows
    assert max(r[2] for r in last) < max(r[2] for r in kicked), rows
