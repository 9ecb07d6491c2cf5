"""The packer and the balancer as pure functions (deterministic, capacity
respected, every sample once), the packed micro-batch layout, the real
loader with data.packing / data.balance, and a VL family's packed forward
(the Omni thinker's multi-process parity is tests/test_packing_parity.py)."""

from __future__ import annotations

import random

import pytest
import torch

import _synth
from data_fixtures.helpers import data_cfg, model_cfg, processor
from omnitrain.data import DataError, balance, build_loader, packing
from _dist import run_workers
from omnitrain.models.family import LossNorm


# ---- packer -------------------------------------------------------------------
def test_plan_first_fit_decreasing_every_sample_once_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 12))]
        cap = rng.randint(50, 120)
        rows = packing.plan(lengths, cap)
        assert rows == packing.plan(lengths, cap)  # deterministic
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= cap for r in rows)
        assert all(r == sorted(r) for r in rows)
        # first fit decreasing: a sample opens a new row only if no earlier row had room for it
        for k, r in enumerate(rows[1:], 1):
            first = max(r, key=lambda i: (lengths[i], -i))  # the sample that opened row k
            placed_before = [i for row in rows[:k] for i in row if (lengths[i], -i) > (lengths[first], -first)]
            assert all(sum(lengths[i] for i in row if i in placed_before) + lengths[first] > cap for row in rows[:k])
    assert packing.plan([60, 60, 30, 30], 90) == [[0, 2], [1, 3]]  # next-fit in order would need 3 rows
    assert packing.plan([5], 5) == [[0]]


def test_plan_refuses_a_sample_longer_than_max_tokens():
    with pytest.raises(DataError, match=r"sample 1 of the micro-batch has 11 tokens, more than data.max_tokens=10"):
        packing.plan([3, 11], 10)


@pytest.fixture(scope="module")
def packed():
    ss = _synth.samples(6)
    lengths = [len(s["ids"]) for s in ss]  # 27, 68, 27, 97, 29, 81
    return ss, packing.pack_samples(ss, _synth.collate, lengths, 120, _synth.PAD)


def test_packed_layout(packed):
    ss, mb = packed
    rows = packing.plan([len(s["ids"]) for s in ss], 120)
    order = [i for r in rows for i in r]
    plain = _synth.collate([ss[i] for i in order])
    idx = mb["pack_index"].tolist()
    assert mb["input_ids"].shape == (len(rows), max(s + n for _, s, n in idx))
    assert [n for _, _, n in idx] == [len(ss[i]["ids"]) for i in order]
    # each sample's tokens where the index says; its first label ignored, the rest kept
    for b, (r, s, n) in enumerate(idx):
        assert torch.equal(mb["input_ids"][r, s : s + n], plain["input_ids"][b, :n])
        assert mb["labels"][r, s] == -100
        assert torch.equal(mb["labels"][r, s + 1 : s + n], plain["labels"][b, 1:n])
    assert int(mb["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    # the same label tokens, media untouched (already in sample order)
    assert int((mb["labels"][:, 1:] != -100).sum()) == int((plain["labels"][:, 1:] != -100).sum())
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "input_features"):
        assert torch.equal(mb[k], plain[k]), k
    # the unpacked view is what the collator gives
    view = packing.unpack(mb, _synth.PAD)
    assert torch.equal(view["input_ids"], plain["input_ids"]) and torch.equal(view["attention_mask"], plain["attention_mask"])
    # positions restart per sample; padding continues its row's last sample
    pos, seg = packing.sequence_positions(mb), packing.segment_ids(mb)
    for b, (r, s, n) in enumerate(idx):
        assert pos[r, s : s + n].tolist() == list(range(n))
        assert (seg[r, s : s + n] == b).all()
    computed, unpacked = packing.computed_tokens(mb)
    assert computed == mb["input_ids"].numel() < unpacked == plain["input_ids"].numel()
    assert packing.num_samples(mb) == 6


# ---- balancer -----------------------------------------------------------------
def test_lpt_every_item_once_exact_capacity_deterministic():
    rng = random.Random(1)
    for _ in range(200):
        groups, cap = rng.randint(1, 5), rng.randint(1, 5)
        costs = [rng.choice([1.0, 5.0, rng.random() * 100]) for _ in range(groups * cap)]
        out = balance.lpt(costs, groups, cap)
        assert out == balance.lpt(costs, groups, cap)
        assert sorted(i for g in out for i in g) == list(range(len(costs)))
        assert all(len(g) == cap for g in out)
    assert balance.lpt([10, 1, 1, 10], 2, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        balance.lpt([1, 2, 3], 2, 2)


def test_assign_keeps_the_global_batch_and_evens_the_costs():
    rng = random.Random(2)
    for _ in range(50):
        dp, m, b = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        n = dp * m * b
        costs = [rng.choice([1.0, 2.0, 50.0, 400.0]) * (1 + rng.random()) for _ in range(n)]
        plan = balance.assign(costs, dp, m, b)
        assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(n))
        assert all(len(rank) == m and all(len(mb) == b for mb in rank) for rank in plan)
        on, off = balance.imbalance(costs, plan), balance.imbalance(costs, balance.contiguous(n, dp, m, b))
        assert on[0] <= off[0] + 1e-9 or dp == 1
    assert balance.contiguous(8, 2, 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    costs = [100, 100, 1, 1, 1, 1, 1, 1]  # the unbalanced split puts both big samples on rank 0
    assert balance.imbalance(costs, balance.contiguous(8, 2, 2, 2))[0] > 1.9
    assert balance.imbalance(costs, balance.assign(costs, 2, 2, 2))[0] == pytest.approx(1.0)
    assert balance.max_over_mean([]) == 1.0


# ---- the real loader ----------------------------------------------------------
NAMES = "mllm_demo,mllm_audio_demo"


def _loader(rank=0, dp=1, micro=2, global_bs=4, **kw):
    kw.setdefault("dataset", NAMES)
    return build_loader(data_cfg(**kw), model_cfg(), processor(), seed=7, micro_batch_size=micro,
                        global_batch_size=global_bs, dp_rank=rank, dp_size=dp)


def _balanced_dp2(rank, world):
    """One dp rank of data.balance over dp2 (the default group): what it trains
    on, a rerun, a resume inside a step, and which samples it loaded."""
    from omnitrain.data import dispatch
    from omnitrain.data.dataset import ProcessedDataset

    loaded, moved = [], []
    get, swap = ProcessedDataset.__getitem__, dispatch.exchange_objects
    ProcessedDataset.__getitem__ = lambda self, key: loaded.append(key) or get(self, key)

    def counting(outgoing, *, group, rank):
        got = swap(outgoing, group=group, rank=rank)
        moved.extend(i for r, part in enumerate(got) if r != rank for i in part)
        return got

    dispatch.exchange_objects = counting
    kw = dict(rank=rank, dp=world, micro=1, balance=True)
    got = [_samples(mb) for mb in _loader(packing=True, max_tokens=512, **kw).iterate(4)]  # bounded: no prefetch past it
    keys = list(loaded)
    again = [_samples(mb) for mb in _take(_loader(packing=True, max_tokens=512, **kw), 4)]
    first = _loader(**kw)
    _take(first, 3)
    resumed = _loader(**kw)
    resumed.load_state_dict(first.state_dict())
    return got, keys, again, _samples(_take(resumed, 1)[0]), len(moved)


def _samples(mb):
    """Each sample's tokens (packed or not), sorted: what a step trains on."""
    if "pack_index" in mb:
        return [mb["input_ids"][r, s : s + n].tolist() for r, s, n in mb["pack_index"].tolist()]
    return [ids[m.bool()].tolist() for ids, m in zip(mb["input_ids"], mb["attention_mask"])]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_packs_and_balances_the_same_global_batches():
    plain = _take(_loader(), 4)  # two steps of two micro-batches
    ref = [sorted(_samples(plain[0]) + _samples(plain[1])), sorted(_samples(plain[2]) + _samples(plain[3]))]
    packed = _take(_loader(packing=True, max_tokens=512), 4)
    assert all("pack_index" in mb and mb["input_ids"].shape[1] <= 512 for mb in packed)
    assert sum(mb["input_ids"].shape[0] for mb in packed) < 8  # some samples share a row
    assert [sorted(_samples(packed[0]) + _samples(packed[1])), sorted(_samples(packed[2]) + _samples(packed[3]))] == ref
    for mb_plain, mb_packed in zip(plain, packed):
        assert int((mb_plain["labels"][:, 1:] != -100).sum()) == int((mb_packed["labels"][:, 1:] != -100).sum())
    # balanced over dp2 (two processes swapping samples): every sample of the
    # step once, the same on a rerun; each rank loaded only its own share
    ranks = run_workers(_balanced_dp2, 2)
    for step in range(2):
        got = sorted(s for got, *_ in ranks for mb in got[2 * step : 2 * step + 2] for s in mb)
        assert got == ref[step]
    for got, keys, again, *_ in ranks:
        assert again == got
        assert len(got) == 4 and len(keys) == 4  # its unbalanced shares of steps 1-2 (two samples each), no more
    assert not set(ranks[0][1][:4]) & set(ranks[1][1][:4])  # steps 1-2: no sample loaded on both ranks
    assert sum(r[4] for r in ranks) > 0  # the swap ran: some samples trained on another rank than loaded them
    # a resume inside a step gets the rest of that step's micro-batches
    for got, _, _, resumed, _ in ranks:
        assert resumed == got[3]


def test_loader_names_a_sample_too_long_to_pack():
    with pytest.raises(DataError, match=r"dataset 'mllm_\w+', sample \d+: \d+ tokens, more than data.max_tokens=40"):
        _take(_loader(packing=True, max_tokens=40), 1)
    skipping = _loader(packing=True, max_tokens=40, on_error="skip")
    _take(skipping, 2)
    assert skipping.stats()["failed"] == {"too_long_to_pack": 4}


# ---- a VL family's packed forward (Qwen2.5-VL: video rope spaced by seconds;
# Qwen3-VL: its own decode, DeepStack features added at packed visual positions) ----
@pytest.mark.parametrize("model_name,kinds", [("qwen25_vl", _synth.KINDS_VL), ("qwen3_vl", _synth.KINDS_Q3_VL)])
def test_vl_packed_loss_and_grads_equal_unpacked(model_name, kinds):
    from conftest import compose_cfg
    from hydra.utils import instantiate

    from omnitrain.parallel.layout import whole_plan

    small = ["model.config.vision_config.depth=4", "model.config.vision_config.deepstack_visual_indexes=[0,1,2]", "model.config.text_config.num_hidden_layers=4"] if model_name == "qwen3_vl" else []
    fam = instantiate(compose_cfg([f"model={model_name}", *small]).model, _convert_="all")
    plan = whole_plan(fam.depths)
    model = fam.build(plan, torch.device("cpu"), seed=5)
    ss = _synth.samples(7, kinds=kinds)
    plain = _synth.collate(ss)
    mb = packing.pack_samples(ss, _synth.collate, [len(s["ids"]) for s in ss], 96, _synth.PAD)
    assert mb["input_ids"].shape[0] < len(ss)
    n = fam.count_label_tokens(plain)
    assert fam.count_label_tokens(mb) == n and fam.count_samples(mb) == fam.count_samples(plain)

    def run(batch, norm):
        model.zero_grad()
        loss = fam.stage_forward(model, plan, batch, {}, norm)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    for norm in (n, LossNorm("sample_mean", n, fam.count_samples(plain))):
        (l0, g0), (l1, g1) = run(plain, norm), run(mb, norm)
        assert abs(l1 - l0) / abs(l0) < 1e-5, (norm, l0, l1)
        assert g0.keys() == g1.keys()
        flat0, flat1 = torch.cat([g.reshape(-1) for g in g0.values()]), torch.cat([g1[k].reshape(-1) for k in g0])
        assert float((flat1 - flat0).norm() / flat0.norm()) < 1e-5
