"""DINO + iBOT pure pieces: the losses against naive loops, the teacher targets (centering,
Sinkhorn-Knopp against a float64 reference), KoLeo against brute force, the block masks, the head."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.recipes.dino import (
    DINOHead,
    block_mask,
    dino_loss,
    ibot_masks,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax_centered,
    update_center,
)

TAU_S = 0.1


def naive_ce(t: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    """-sum_k t_k log softmax(s / tau)_k for one pair of vectors, written out."""
    log_z = torch.logsumexp(s / tau, dim=0)
    return -sum(t[k] * (s[k] / tau - log_z) for k in range(t.shape[0]))


def random_views(n_teacher: int, n_student: int, b: int = 4, k: int = 7):
    teacher = [torch.softmax(torch.randn(b, k) / 0.5, dim=-1) for _ in range(n_teacher)]
    student = [torch.randn(b, k) for _ in range(n_student)]
    return teacher, student


# -- dino_loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_teacher,n_student", [(2, 2), (2, 6), (1, 3), (2, 1)])
def test_dino_loss_matches_naive_double_loop(n_teacher, n_student):
    teacher, student = random_views(n_teacher, n_student)
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            total += sum(naive_ce(t[b], s[b], TAU_S) for b in range(t.shape[0])) / t.shape[0]
            terms += 1
    expected = total / terms
    torch.testing.assert_close(dino_loss(student, teacher, TAU_S), expected)


def test_dino_loss_skips_same_view_pairs():
    # With 2 teacher views and only student view 0, the sole term is (teacher 1, student 0):
    # teacher 0 meets only its own view, so changing it changes nothing.
    teacher, student = random_views(2, 1)
    base = dino_loss(student, teacher, TAU_S)
    other = [torch.softmax(torch.randn_like(teacher[0]) * 5, dim=-1), teacher[1]]
    torch.testing.assert_close(dino_loss(student, other, TAU_S), base)
    # In the 2 x 2 case the gradient on student view 0 depends on teacher view 1 only.
    teacher, student = random_views(2, 2)
    grads = []
    for t0 in (teacher[0], torch.softmax(torch.randn_like(teacher[0]) * 5, dim=-1)):
        s = [x.clone().requires_grad_() for x in student]
        dino_loss(s, [t0, teacher[1]], TAU_S).backward()
        grads.append(s[0].grad)
    torch.testing.assert_close(grads[0], grads[1])
    # ... whereas including the same-view pairs would give another number.
    with_same = sum(
        (-(t * F.log_softmax(s / TAU_S, -1)).sum(-1)).mean() for t in teacher for s in student
    ) / 4
    assert not torch.isclose(dino_loss(student, teacher, TAU_S), with_same)


def test_dino_loss_float32_and_needs_a_cross_pair():
    teacher, student = random_views(2, 3)
    loss = dino_loss([s.half() for s in student], [t.half() for t in teacher], TAU_S)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="different views"):
        dino_loss(student[:1], teacher[:1], TAU_S)


# -- ibot_patch_loss ---------------------------------------------------------------------------
def make_patches(b: int = 3, n: int = 6, k: int = 5):
    s = torch.randn(b, n, k)
    t = torch.softmax(torch.randn(b, n, k) / 0.3, dim=-1)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[2, :5] = True  # image 1 has no masked patch
    return s, t, mask


def test_ibot_patch_loss_matches_naive_loop():
    s, t, mask = make_patches()
    per_image = []
    for i in range(s.shape[0]):
        idx = mask[i].nonzero().flatten().tolist()
        per_image.append(sum(naive_ce(t[i, j], s[i, j], TAU_S) for j in idx) / max(len(idx), 1))
    expected = sum(per_image) / s.shape[0]  # the unmasked image counts as a 0 in the mean
    torch.testing.assert_close(ibot_patch_loss(s[mask], t[mask], mask, TAU_S), torch.as_tensor(expected))


def test_ibot_patch_loss_takes_only_the_masked_patches():
    s, t, mask = make_patches()
    s3 = s.clone().requires_grad_()
    ibot_patch_loss(s3[mask], t[mask], mask, TAU_S).backward()  # the unmasked rows never reach the loss
    assert (s3.grad[~mask] == 0).all() and (s3.grad[mask].abs().sum(-1) > 0).all()
    empty = torch.zeros_like(mask)
    assert ibot_patch_loss(s[empty], t[empty], empty, TAU_S) == 0
    # an image with more masked patches weighs each of them less: moving one patch between images changes the loss
    other = mask.clone()
    other[0, 1], other[2, 5] = False, True
    assert not torch.isclose(ibot_patch_loss(s[other], t[other], other, TAU_S),
                             ibot_patch_loss(s[mask], t[mask], mask, TAU_S))


# -- teacher targets ---------------------------------------------------------------------------
def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_teacher_softmax_centered_is_a_sharpened_distribution():
    logits, center = torch.randn(8, 11), torch.randn(1, 11)
    p = teacher_softmax_centered(logits, center, 0.07)
    assert p.shape == logits.shape and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(8))
    torch.testing.assert_close(p, torch.softmax((logits - center) / 0.07, dim=-1))
    sharper = teacher_softmax_centered(logits, center, 0.04)
    softer = teacher_softmax_centered(logits, center, 0.5)
    assert (entropy(sharper) < entropy(p)).all() and (entropy(p) < entropy(softer)).all()
    assert not teacher_softmax_centered(logits.requires_grad_(), center, 0.07).requires_grad


def test_update_center_moves_toward_batch_mean():
    center, logits, m = torch.randn(1, 5), torch.randn(16, 5), 0.9
    new = update_center(center, logits, m)
    assert new.shape == (1, 5)
    mean = logits.mean(0, keepdim=True)
    torch.testing.assert_close(new - center, (1 - m) * (mean - center))
    torch.testing.assert_close(update_center(center, logits, 0.0), mean)


def sinkhorn_reference(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp in float64 on a (B, K) matrix, written row/column-wise without transposes."""
    p = torch.exp(logits.double() / temp)
    b, k = p.shape
    p = p / p.sum()
    for _ in range(n_iterations):
        p = p / p.sum(0, keepdim=True) / k  # each prototype (column) gets mass 1/K
        p = p / p.sum(1, keepdim=True) / b  # each sample (row) gets mass 1/B
    return p * b


def test_sinkhorn_knopp_balances_prototypes_and_matches_float64():
    b, k = 64, 16
    logits = torch.randn(b, k) * 0.1
    q = sinkhorn_knopp(logits, 0.1)
    assert q.shape == (b, k) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=1e-2, atol=0)
    torch.testing.assert_close(q, sinkhorn_reference(logits, 0.1, 3).float())
    # Peakier logits: 3 iterations only start balancing; many iterations converge to B/K each.
    logits = torch.randn(b, k)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 100).sum(0), torch.full((k,), b / k), rtol=1e-2, atol=0)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, 5), sinkhorn_reference(logits, 0.1, 5).float())


def test_sinkhorn_knopp_is_shift_invariant_and_finite_for_large_logits():
    logits = torch.randn(8, 4) * 0.5
    q = sinkhorn_knopp(logits + 100.0, 0.04)  # exp(100 / 0.04) overflows without the shift
    assert torch.isfinite(q).all()
    # (logits + 100) / 0.04 is ~2500, whose float32 spacing (2.4e-4) sets the tolerance.
    torch.testing.assert_close(q, sinkhorn_reference(logits, 0.04, 3).float(), rtol=1e-3, atol=1e-4)
    assert sinkhorn_knopp(logits.half(), 0.04).dtype == torch.float32


# -- koleo_loss --------------------------------------------------------------------------------
def test_koleo_matches_brute_force():
    x = torch.randn(9, 5)
    z = [row / row.norm() for row in x]
    terms = []
    for i in range(len(z)):
        j = max((j for j in range(len(z)) if j != i), key=lambda j: float(z[i] @ z[j]))
        terms.append(math.log(float((z[i] - z[j]).norm()) + 1e-8))
    torch.testing.assert_close(koleo_loss(x), torch.tensor(-sum(terms) / len(terms)))


def test_koleo_prefers_spread_out_points_and_needs_two_rows():
    spread = torch.eye(6)  # orthonormal: every nearest neighbour at distance sqrt(2)
    clustered = torch.ones(6, 6) + 0.01 * torch.randn(6, 6)
    assert koleo_loss(spread) < koleo_loss(clustered)
    torch.testing.assert_close(koleo_loss(spread), torch.tensor(-math.log(math.sqrt(2))))
    # Two antipodal points: the neighbour is the other point, never the point itself.
    torch.testing.assert_close(koleo_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), torch.tensor(-math.log(2)))
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 5))


# -- masks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(14, 14), (4, 8)])
def test_block_mask_count(grid):
    n = grid[0] * grid[1]
    for count in sorted({0, 1, 2, 3, 5, n // 10, n // 4}):
        for seed in range(10):
            m = block_mask(grid, count, generator=torch.Generator().manual_seed(seed))
            assert m.shape == grid and m.dtype == torch.bool
            assert int(m.sum()) == count, (count, seed)
    for count in (n // 2, 3 * n // 4, n):  # dense targets may stall short, never overshoot
        for seed in range(5):
            assert int(block_mask(grid, count, generator=torch.Generator().manual_seed(seed)).sum()) <= count
    with pytest.raises(ValueError, match="num_masking_patches"):
        block_mask(grid, n + 1)


@pytest.mark.parametrize("count,aspect,shape", [(9, 1.0, (3, 3)), (8, 2.0, (4, 2)), (8, 0.5, (2, 4))])
def test_block_mask_single_block_is_a_filled_rectangle(count, aspect, shape):
    for seed in range(5):
        m = block_mask(
            (8, 8), count, min_num_patches=count, min_aspect=aspect, max_aspect=aspect,
            generator=torch.Generator().manual_seed(seed),
        )
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.shape == shape and box.all() and int(m.sum()) == count


def test_block_mask_is_reproducible():
    a = block_mask((14, 14), 60, generator=torch.Generator().manual_seed(3))
    b = block_mask((14, 14), 60, generator=torch.Generator().manual_seed(3))
    c = block_mask((14, 14), 60, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ibot_masks_counts_within_ratio_bounds():
    grid, n_images, lo, hi = (14, 14), 10, 0.1, 0.5
    n = grid[0] * grid[1]
    bounds = torch.linspace(lo, hi, 6).tolist()
    first_rows = set()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        masks = ibot_masks(n_images, grid, mask_probability=0.5, ratio_range=(lo, hi), generator=g)
        assert masks.shape == (n_images, n) and masks.dtype == torch.bool
        counts = masks.sum(1)
        masked = sorted(c for c in counts.tolist() if c > 0)
        assert len(masked) == 5
        for i, c in enumerate(masked):  # the i-th smallest lies in the i-th ratio slice
            assert int(n * bounds[i]) <= c <= int(n * bounds[i + 1])
        first_rows.add(tuple((counts > 0).tolist()))
    assert len(first_rows) > 1  # the masked images are shuffled, not always the first five
    again = ibot_masks(n_images, grid, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, ibot_masks(n_images, grid, generator=torch.Generator().manual_seed(0)))
    assert not ibot_masks(4, grid, mask_probability=0.0).any()


# -- DINOHead ----------------------------------------------------------------------------------
def test_dino_head_shapes_and_init():
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=16)
    assert head(torch.randn(3, 24)).shape == (3, 50)
    assert head(torch.randn(2, 7, 24)).shape == (2, 7, 50)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 32), (32, 32), (32, 16)]
    assert all((m.bias == 0).all() for m in linears)
    assert sum(isinstance(m, nn.GELU) for m in head.mlp.modules()) == 2
    single = DINOHead(24, 50, bottleneck_dim=16, nlayers=1)
    assert isinstance(single.mlp, nn.Linear) and (single.mlp.in_features, single.mlp.out_features) == (24, 16)
    assert single.last_layer.bias is None


def test_dino_head_last_layer_rows_unit_norm_and_frozen_magnitude():
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=16)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and (magnitude == 1).all()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        head(torch.randn(4, 24)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    free = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    teacher = copy.deepcopy(head)  # the EMA teacher is a deep copy
    x = torch.randn(3, 24)
    torch.testing.assert_close(teacher(x), head(x))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_gradients_and_last_layer_parameters(norm_last_layer):
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    head(torch.randn(4, 24)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.mlp.parameters())
    expected = {id(p) for p in head.last_layer.parameters() if p.requires_grad}
    got = head.last_layer_parameters()
    assert {id(p) for p in got} == expected and len(got) == len(expected) == (1 if norm_last_layer else 2)
    mlp_ids = {id(p) for p in head.mlp.parameters()}
    assert not mlp_ids & {id(p) for p in got}
