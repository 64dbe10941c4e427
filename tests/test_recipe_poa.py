"""POA's own pieces: the sampling pool (the official space's counts), the per-step draws (pure, resumable,
one pass covers the pool), the same-view loss, the elastic multi-head, the step's branches and gates,
bad elastic spaces, and what a run exports. The elastic ViT itself is tested in test_elastic.py; the
registry-wide test trains, resumes and publishes the CPU recipe."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.models.elastic import extract
from zoo.recipes.dino import ibot_masks
from zoo.recipes.poa import POA, MultiHead, elastic_draws, elastic_pool, same_view_distillation

OFFICIAL_WIDTHS = list(range(384, 1025, 64))
OFFICIAL_DEPTHS = list(range(12, 25))


def test_pool_matches_the_official_space():
    pool = elastic_pool(OFFICIAL_WIDTHS, OFFICIAL_DEPTHS, scale=3)
    counts = Counter(pool)
    assert len(pool) == 573 - 1  # 573 entries, the full network's one dropped
    assert counts[(384, 12)] == 9 and counts[(768, 12)] == 5 and (1024, 24) not in counts
    assert len(counts) == 11 * 13 - 1  # every other sub-network is drawable
    assert counts[(384, 24)] == 3 and counts[(1024, 12)] == 3  # one corner at S, the other at 1: S·1
    assert elastic_pool(OFFICIAL_WIDTHS[::-1], OFFICIAL_DEPTHS, 3) == pool  # order of the lists does not matter
    flat = elastic_pool([64, 128], [2, 4], scale=1)  # S = 1: uniform
    assert Counter(flat) == {(64, 2): 1, (64, 4): 1, (128, 2): 1}


def test_draws_are_a_pure_function_of_the_step_and_cover_the_pool_each_pass():
    pool = elastic_pool([64, 96, 128], [3, 4, 5, 6], 3)
    one_pass = [elastic_draws(pool, s, 1)[0] for s in range(len(pool))]
    assert Counter(one_pass) == Counter(pool)  # shuffled once, consumed in turn
    second = [elastic_draws(pool, s, 1)[0] for s in range(len(pool), 2 * len(pool))]
    assert Counter(second) == Counter(pool) and second != one_pass  # reshuffled for the next pass
    assert elastic_draws(pool, 7, 3) == one_pass[21:24]  # k per step: draws 3·7 .. 3·7 + 2
    assert elastic_draws(pool, 5, 2) == elastic_draws(pool, 5, 2)  # a resumed run draws the same
    ranks = [[elastic_draws(pool, s, 1, rank=r)[0] for s in range(len(pool))] for r in (0, 1)]
    assert ranks[0] != ranks[1] and Counter(ranks[1]) == Counter(pool)  # each rank shuffles its own pool
    assert [elastic_draws(pool, s, 1, seed=1)[0] for s in range(len(pool))] != one_pass  # pool_seed: another order


def test_same_view_distillation_is_ce_to_the_stopped_intact_softmax_per_group():
    torch.manual_seed(0)
    intact = [torch.randn(6, 10, requires_grad=True), torch.randn(12, 10, requires_grad=True)]
    elastic = [torch.randn(6, 10, requires_grad=True), torch.randn(12, 10, requires_grad=True)]
    loss = same_view_distillation(intact, elastic, temp=0.1)
    expected = sum((-(F.softmax(t / 0.1, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)).mean() for t, s in zip(intact, elastic))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(t.grad is None for t in intact)  # the intact student is the target only
    assert all(s.grad.abs().sum() > 0 for s in elastic)
    same = [t.detach().clone().requires_grad_() for t in intact]
    same_view_distillation(intact, same, 0.1).backward()
    assert all(s.grad.abs().max() < 1e-6 for s in same)  # matching the target exactly: no gradient
    with pytest.raises(ValueError, match="groups"):
        same_view_distillation(intact, elastic[:1], 0.1)


def test_multihead_reads_the_leading_columns_scaled_by_alpha():
    torch.manual_seed(0)
    heads = MultiHead(128, [32, 64], hidden_dim=48, bottleneck_dim=16, nlayers=3)
    x = torch.randn(5, 64)
    full = heads(torch.cat([x * 2.0, torch.zeros(5, 64)], dim=1))  # α = 128 / 64
    sliced = heads(x, width=64)
    assert [s.shape for s in sliced] == [(5, 32), (5, 64)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sliced, full))
    sum(s.sum() for s in sliced).backward()
    for h in heads.heads:
        g = h.mlp[0].weight.grad
        assert g[:, :64].abs().sum() > 0 and torch.count_nonzero(g[:, 64:]) == 0
    assert len(heads.last_layer_parameters()) == 2  # norm_last_layer: per head its directions, magnitudes fixed
    assert all(torch.equal(a, b) for a, b in zip(heads(x.repeat(1, 2)), heads(x.repeat(1, 2), width=128)))


def tiny(**kw) -> POA:
    args = dict(arch="vit_nano_patch4_32", depth=4, widths=[64, 96, 128], depths=[2, 3, 4], out_dims=[64, 128],
                hidden_dim=64, bottleneck_dim=32, n_local_crops=2, local_crops_size=16, elastic_per_step=2,
                ibot_start_epoch=0, export_sizes=[[64, 2], [96, 4]])
    torch.manual_seed(0)
    return POA(**{**args, **kw})


def batch_for(method: POA, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] + \
            [torch.randn(b, 3, 16, 16, generator=g) for _ in range(method.n_local)]
    return {"views": views, "masks": ibot_masks(2 * b, (8, 8), generator=g)}


def test_step_trains_both_students_and_gates_ibot():
    method = tiny()
    method.train()
    method.scheduled = {"ibot_active": 1.0, "teacher_temp": 0.05}
    out = method.training_step(batch_for(method), step=3)
    for key in ("loss_dino_intact", "loss_dino_elastic", "loss_same_view", "loss_ibot_intact", "loss_ibot_elastic",
                "loss_koleo"):
        assert torch.isfinite(out[key]), key
    drawn = method.draws(3)
    assert len(drawn) == 2 and out["elastic_width"].item() == sum(w for w, _ in drawn) / 2
    out["loss"].backward()
    vit = method.student.backbone
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())  # the EMA teacher takes no gradient

    gated = tiny()
    gated.scheduled = {"ibot_active": 0.5, "teacher_temp": 0.05}  # still in its warmup: no iBOT, no masking
    out = gated.training_step(batch_for(gated), step=3)
    assert "loss_ibot_intact" not in out
    out["loss"].backward()
    assert gated.mask_token.grad is None  # unmasked crops never read the mask token


def test_lambda_one_trains_the_intact_student_only():
    """λ = 1: the elastic terms weigh nothing, so the gradient equals an intact-only step's."""
    a, b = tiny(intact_weight=1.0, koleo_weight=0.0), tiny(intact_weight=1.0, koleo_weight=0.0)
    batch = batch_for(a)
    for m in (a, b):
        m.scheduled = {"ibot_active": 1.0, "teacher_temp": 0.05}
    a.training_step(batch, 0)["loss"].backward()
    b.draws = lambda step: [(128, 4)]  # the "elastic" student is the intact network itself
    b.training_step(batch, 0)["loss"].backward()
    ga, gb = a.student.backbone.blocks[1].mlp.fc1.weight.grad, b.student.backbone.blocks[1].mlp.fc1.weight.grad
    assert torch.allclose(ga, gb, atol=1e-6)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(widths=[64, 100]), "multiple of the head size"),
    (dict(widths=[64, 256]), "valid widths"),
    (dict(depths=[2, 9]), "outside 1..4"),
    (dict(export_sizes=[[96, 5]]), "outside 1..4"),
    (dict(widths=[128], depths=[4]), "only the full network"),
    (dict(out_dim=64), "out_dims"),
    (dict(centering="center"), "Sinkhorn-Knopp"),
    (dict(widths=[]), "elastic space"),
    (dict(elastic_per_step=0), "elastic_per_step"),
    (dict(intact_weight=1.5), "intact_weight"),
])
def test_bad_elastic_space_is_a_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_exports_the_intact_teacher_and_each_size_cut_from_it():
    method = tiny()
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a teacher that differs from the student
    exports = method.export("vit_nano_patch4_32.poa_test")
    assert list(exports) == ["vit_nano_patch4_32.poa_test", "vit_nano_patch4_32.poa_test_w64_d2",
                             "vit_nano_patch4_32.poa_test_w96_d4"]
    intact = exports["vit_nano_patch4_32.poa_test"]
    assert intact.model is method.teacher.backbone and intact.card["elastic"]["widths"] == [64, 96, 128]
    small = exports["vit_nano_patch4_32.poa_test_w64_d2"]
    assert small.card["elastic"] | {"parent": None} == {"width": 64, "depth": 2, "block_ids": [0, 3], "parent_width": 128,
                                                        "parent_depth": 4, "parent": None}
    assert small.card["elastic"]["parent"] == "vit_nano_patch4_32.poa_test"
    ref = extract(method.teacher.backbone, 64, 2).state_dict()
    got = small.model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert small.model.zoo_arch == "vit_nano_patch4_32" and small.model.embed_dim == 64
