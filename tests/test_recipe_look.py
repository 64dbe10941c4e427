"""LOOK (recipes/look.py) and its supervised baselines (recipes/supervised.py): the leave-one-out vote, the
memory bank (also across 2 gloo ranks, whole and sharded), SupCon's loss, and the one-line errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError, SampleError
from zoo.recipes.look import LOOK, class_votes, loo_knn_loss, loo_knn_vote, neighbour_scores
from zoo.recipes.supervised import LabelledViews, Supervised, supcon_loss

ARCH = dict(arch="vit_tiny_patch4_32", depth=1)
UNIFORM = 1e9  # a temperature at which every selected neighbour's weight is 1


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def fit(method, batch, steps: int) -> None:
    """`steps` AdamW steps (lr 1e-3) on one batch, with the method's step-end hook, as the engine calls it."""
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    for step in range(steps):
        opt.zero_grad()
        method.training_step(batch, step)["loss"].backward()
        opt.step()
        method.on_step_end(None)


def test_leave_one_out_excludes_exactly_the_anchor_index():
    n = 12
    bank, ids = unit(n, 8), torch.arange(n)
    labels = torch.zeros(n, dtype=torch.long)
    labels[[2, 7]] = 1  # the anchor (sample 2) and one other sample share label 1
    z = bank[[2, 2]].clone()  # two views of sample 2: each is its own entry's exact copy, its nearest neighbour
    scores = neighbour_scores(z, bank, ids, labels, torch.tensor([2, 2]))
    assert torch.isinf(scores[:, 2]).all() and torch.isfinite(scores[:, [i for i in range(n) if i != 2]]).all()
    p, has = loo_knn_vote(scores, labels, torch.tensor([1, 1]), k=n, temperature=UNIFORM)
    assert has.all() and torch.allclose(p, torch.full((2,), 1 / (n - 1)))  # 1 of the n - 1 others, itself left out
    # the nearest neighbour is never itself: with k = 1 the vote is its nearest *other* entry's label
    p1, _ = loo_knn_vote(scores, labels, torch.tensor([1, 1]), k=1, temperature=0.1)
    nearest_other = scores[0].argmax()
    assert nearest_other != 2 and p1[0] == float(labels[nearest_other] == 1)
    # a sharded bank: the same rule by sample index, whatever row holds it
    odd = ids[1::2]
    s_odd = neighbour_scores(bank[[7]], bank[odd], odd, labels[odd], torch.tensor([7]))
    assert torch.isinf(s_odd[0, 3]) and torch.isfinite(s_odd[0, [0, 1, 2, 4, 5]]).all()


def test_vote_with_k_equal_bank_and_uniform_weights_is_the_class_frequency():
    n, classes = 40, 3
    bank = unit(n, 6, seed=1)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(2))
    anchors = torch.arange(0, n, 5)
    for c in range(classes):
        scores = neighbour_scores(unit(len(anchors), 6, seed=3), bank, torch.arange(n), labels, anchors)
        p, _ = loo_knn_vote(scores, labels, torch.full((len(anchors),), c), k=n, temperature=UNIFORM)
        expected = [(int((labels == c).sum()) - int(labels[a] == c)) / (n - 1) for a in anchors.tolist()]
        assert torch.allclose(p, torch.tensor(expected), atol=1e-6)
    votes = class_votes(*scores.topk(n, dim=1), labels, classes, temperature=UNIFORM)
    assert torch.allclose(votes.sum(1), torch.full((len(anchors),), n - 1.0))


def test_gradient_flows_through_the_selected_neighbours_weights_only():
    n = 20
    bank, labels = unit(n, 4, seed=4), torch.arange(n) % 2
    z = unit(3, 4, seed=5).requires_grad_()
    k = 5
    scores = neighbour_scores(z, bank, torch.arange(n), labels, torch.tensor([0, 1, 2]))
    p, has = loo_knn_vote(scores, labels, torch.tensor([0, 1, 0]), k=k, temperature=0.1)
    loo_knn_loss(p, has).backward()
    # the same loss written out on the fixed top-k selection
    z2 = z.detach().clone().requires_grad_()
    s = (z2 @ bank.T).masked_fill(torch.eye(n)[:3].bool(), float("-inf"))
    idx = s.detach().topk(k, dim=1).indices
    w = torch.softmax(s.gather(1, idx) / 0.1, dim=1)
    pp = (w * (labels[idx] == torch.tensor([0, 1, 0])[:, None])).sum(1)
    (-torch.log(pp[pp > 0]).mean()).backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-5) and z.grad.abs().sum() > 0
    assert not bank.requires_grad


def test_no_same_class_neighbour_is_left_out_and_an_empty_bank_gives_zero():
    bank, labels = unit(6, 4), torch.tensor([0, 0, 0, 0, 0, -1])  # the last entry not filled yet
    scores = neighbour_scores(unit(2, 4, seed=9), bank, torch.arange(6), labels, torch.tensor([0, 1]))
    assert torch.isinf(scores[:, 5]).all()
    p, has = loo_knn_vote(scores, labels, torch.tensor([1, 0]), k=3, temperature=0.1)
    assert p[0] == 0 and p[1] == 1 and has.all()
    assert loo_knn_loss(p, has) == 0  # only anchor 1 counts, and it is sure
    empty = neighbour_scores(unit(2, 4), bank, torch.arange(6), torch.full((6,), -1), torch.tensor([0, 1]))
    p, has = loo_knn_vote(empty, torch.full((6,), -1), torch.tensor([0, 0]), k=3, temperature=0.1)
    assert not has.any() and loo_knn_loss(p, has).item() == 0


def test_bank_update_by_index_and_momentum():
    look = LOOK(num_classes=2, k=2, head_dim=4, bank_momentum=0.5, **ARCH)
    look.on_data(10)
    a, b = unit(2, 4, seed=1), unit(2, 4, seed=2)
    look.update_bank(torch.tensor([3, 8]), a, torch.tensor([1, 0]))
    assert torch.allclose(look.bank[[3, 8]], a) and look.bank_labels.tolist() == [-1, -1, -1, 1, -1, -1, -1, -1, 0, -1]
    look.update_bank(torch.tensor([8, 3]), b, torch.tensor([0, 1]))
    assert torch.allclose(look.bank[8], F.normalize(0.5 * a[1] + 0.5 * b[0], dim=0))
    assert torch.allclose(look.bank[3], F.normalize(0.5 * a[0] + 0.5 * b[1], dim=0))


def test_training_step_writes_the_bank_after_the_step_and_learns_the_vote():
    torch.manual_seed(0)
    look = LOOK(num_classes=2, k=3, head_dim=8, **ARCH)
    look.on_data(16)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    batch = {"label": labels, "image": images, "__index__": torch.arange(8)}
    out = look.training_step(batch, 0)
    assert out["loss"].item() == 0 and (look.bank_labels == -1).all()  # nothing in the bank yet
    look.on_step_end(None)
    assert look.bank_labels[:8].tolist() == labels.tolist() and (look.bank_labels[8:] == -1).all()
    first = look.training_step(batch, 1)["p"].item()
    fit(look, batch, 15)
    assert look.training_step(batch, 16)["p"].item() > first + 0.1


def test_look_bad_input_is_one_line():
    look = LOOK(num_classes=4, k=50, **ARCH)
    with pytest.raises(ConfigError, match="k=50 must be smaller than the memory bank \\(50 samples"):
        look.on_data(50)
    with pytest.raises(ConfigError, match="sizes.json"):
        look.on_data(None)
    with pytest.raises(ConfigError, match="method.bank_shard: true"):
        look.on_data(10**12)
    views = LabelledViews([lambda im: im], num_classes=4)
    with pytest.raises(SampleError, match="has no 'label'"):
        views({"image": 1, "__key__": "000000007"})
    with pytest.raises(SampleError, match="label 4, outside the declared classes 0..3"):
        views({"image": 1, "label": 4, "__key__": "000000007"})
    with pytest.raises(ConfigError, match="num_classes must be"):
        Supervised(num_classes=1, **ARCH)


def test_supcon_loss_matches_the_papers_sum():
    z, y = unit(6, 5, seed=7), torch.tensor([0, 1, 0, 1, 1, 2])
    loss = supcon_loss(z, y, z, y, temperature=0.5)
    per = []
    for i in range(6):
        pos = [p for p in range(6) if p != i and y[p] == y[i]]
        if not pos:
            continue
        den = sum(torch.exp(z[i] @ z[a] / 0.5) for a in range(6) if a != i)
        per.append(-sum(torch.log(torch.exp(z[i] @ z[p] / 0.5) / den) for p in pos) / len(pos))
    assert torch.allclose(loss, torch.stack(per).mean(), atol=1e-5)
    # a rank's anchors against every rank's rows: the same terms as the whole computation, for those anchors
    part = supcon_loss(z[2:4], y[2:4], z, y, anchor_offset=2, temperature=0.5)
    assert torch.allclose(part, torch.stack(per[2:4]).mean(), atol=1e-5)


def test_mixup_collate_mixes_images_and_targets():
    torch.manual_seed(0)
    ce = Supervised(num_classes=3, mixup=0.8, cutmix=1.0, **ARCH)
    spec = ce.data_spec()
    samples = [{"image": torch.rand(3, 32, 32), "label": i % 3} for i in range(6)]
    batch = spec.collate(samples)
    assert batch["target"].shape == (6, 3) and torch.allclose(batch["target"].sum(1), torch.ones(6))
    assert batch["target"].max() < 1  # smoothed and mixed
    out = ce.training_step(batch, 0)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0


# -- 2 gloo ranks ------------------------------------------------------------------------------------
def _ranks(rank: int, world: int, init: str, queue, received) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    n, dim, b = 12, 6, 3
    feats, labels = unit(n, dim, seed=11), torch.arange(n) % 3
    mine = torch.tensor([[4, 0, 9], [2, 7, 5]][rank])  # each rank's batch: sample indices
    out = {}
    for shard in (False, True):
        look = LOOK(num_classes=3, k=4, head_dim=dim, bank_shard=shard, **ARCH)
        look.on_data(n)
        look.update_bank(mine, feats[mine], labels[mine])
        out[shard] = (look.bank.clone(), look.bank_labels.clone(), look.bank_ids().clone())
        # then a full bank, and the vote of this rank's anchors (with gradients)
        look.update_bank(torch.arange(n)[rank::2], feats[rank::2], labels[rank::2])
        z = unit(b, dim, seed=20 + rank).requires_grad_()
        p, has, _ = look.vote(z, labels[mine], mine)
        loo_knn_loss(p, has).backward()
        out[f"p{shard}"], out[f"grad{shard}"] = p.detach(), z.grad.clone()
    queue.put((rank, out))
    received.wait(timeout=300)  # the tensors travel as shared memory this process serves: stay until they arrive
    dist.barrier()
    dist.destroy_process_group()


def test_bank_indices_stay_aligned_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, received = ctx.Queue(), ctx.Event()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_ranks, args=(r, 2, init, queue, received)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    received.set()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    n, feats, labels = 12, unit(12, 6, seed=11), torch.arange(12) % 3
    seen = [4, 0, 9, 2, 7, 5]
    # whole bank on every rank: identical, and row i holds sample i, whichever rank saw it
    (b0, l0, _), (b1, l1, _) = results[0][False], results[1][False]
    assert torch.equal(b0, b1) and torch.equal(l0, l1)
    assert torch.allclose(b0[seen], feats[seen]) and l0[seen].tolist() == labels[seen].tolist()
    assert (l0[[i for i in range(n) if i not in seen]] == -1).all()
    # sharded: rank r holds samples r, r + 2, ...; each row holds the sample its id names
    for r in (0, 1):
        bank, lab, ids = results[r][True]
        assert ids.tolist()[: len(range(r, n, 2))] == list(range(r, n, 2))
        for row, i in enumerate(ids.tolist()):
            if i in seen:
                assert torch.allclose(bank[row], feats[i]) and lab[row] == labels[i]
            else:
                assert lab[row] == -1
    # the sharded vote and its gradients equal the whole bank's
    for r in (0, 1):
        assert torch.allclose(results[r]["pTrue"], results[r]["pFalse"], atol=1e-6)
        assert torch.allclose(results[r]["gradTrue"], results[r]["gradFalse"], atol=1e-5)


def test_a_checkpoint_loads_into_a_fresh_method_and_a_bank_of_other_data_is_refused():
    look = LOOK(num_classes=2, k=2, head_dim=4, **ARCH)
    look.on_data(10)
    look.update_bank(torch.tensor([1, 4]), unit(2, 4), torch.tensor([0, 1]))
    fresh = LOOK(num_classes=2, k=2, head_dim=4, **ARCH)  # built to read it: no on_data
    fresh.load_state_dict(look.state_dict())
    assert torch.equal(fresh.bank, look.bank) and torch.equal(fresh.bank_labels, look.bank_labels)
    other = LOOK(num_classes=2, k=2, head_dim=4, **ARCH)
    other.on_data(12)
    with pytest.raises(ConfigError, match="memory bank holds 10 rows of 4, this run's 12"):
        other.load_state_dict(look.state_dict())


def test_cross_entropy_learns_a_fixed_batch():
    """The registry test's 8 fresh batches of 8 are too few for a ViT trained from scratch by cross-entropy to
    show it learns (its loss moves by noise); on one batch it must fit."""
    from zoo.data.builtin import generate
    from zoo.data.transforms import eval_transform

    torch.manual_seed(0)
    ce = Supervised(num_classes=5, arch="vit_nano_patch4_32")
    t = eval_transform(ce.encoder.pretrained_cfg)
    samples = list(generate("digits_coarse", 16))
    batch = {"image": torch.stack([t(s["image"]) for s in samples]), "label": torch.tensor([s["label"] for s in samples])}
    first = ce.training_step(batch, 0)["loss"].item()
    fit(ce, batch, 20)
    out = ce.training_step(batch, 20)
    assert out["loss"].item() < first - 0.3 and out["acc"] >= 40, (first, out)  # chance: 20 %
