"""Packed and cost-balanced micro-batches train exactly like the plain
ones (CPU, gloo, fp32, same bounds as tests/test_pipeline_parity.py): the
Omni thinker on synthetic image / video / audio / text samples, 2 steps of
4 samples in micro-batches of 2, against one unpacked, unbalanced process.

- packing (data/packing.py) single, pp2 and tp2: rope per sample,
  attention within samples, the same label tokens;
- balancing (data/balance.py) dp2, and pp2 x dp2 balanced and packed:
  samples move between ranks and micro-batches, the global batch does not.
The logged metrics say what packing saved and how even the costs were.
"""

from __future__ import annotations

import functools

import pytest

import _synth
from _layouts import _default_family, check_parity, run_layout
from omnitrain.data import balance, packing

STEPS, GLOBAL, MICRO = 2, 4, 2
# The synthetic lengths cycle 27, 68, 27, 97, 29, 81: some pairs fit one row, some do not.
MAX_TOKENS = 100


class PackedSynthLoader(_synth.SynthLoader):
    """The synthetic loader's samples, packed (`max_tokens`) and/or balanced
    (`balanced`) by the production functions, as data/loader.py uses them."""

    def __init__(self, *, max_tokens=None, balanced=False, **kw):
        super().__init__(**kw)
        self.max_tokens, self.balanced = max_tokens, balanced

    def __iter__(self):
        m = self.per_step
        k, j0 = divmod(self.micro_step, m)
        while True:
            ss = _synth.samples(self.G, offset=k * self.G, kinds=self.kinds)
            if self.balanced:
                cost = _default_family().batch_cost
                plan = balance.assign([cost(_synth.collate([s])) for s in ss], self.dp, m, self.mbs)
            else:
                plan = balance.contiguous(self.G, self.dp, m, self.mbs)
            for j in range(j0, m):
                group = [ss[i] for i in plan[self.r][j]]
                if self.max_tokens:
                    mb = packing.pack_samples(group, _synth.collate, [len(s["ids"]) for s in group], self.max_tokens, _synth.PAD)
                else:
                    mb = _synth.collate(group)
                self.micro_step += 1
                yield mb
            k, j0 = k + 1, 0


def _loader(dp_rank, dp_size, **kw):
    return PackedSynthLoader(global_batch_size=GLOBAL, micro_batch_size=MICRO, dp_rank=dp_rank, dp_size=dp_size, **kw)


def _run(tmp, name, overrides, rows=None, **kw):
    return run_layout(
        tmp / name, overrides, steps=STEPS, global_batch=GLOBAL, micro=MICRO,
        make_loader=functools.partial(_loader, **kw), rows=rows,
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("packing")


@pytest.fixture(scope="module")
def reference(tmp):
    rows = []
    run = _run(tmp, "single", ["parallel=single"], rows=rows)
    return run, rows


PACKED = {
    "single": ["parallel=single"],
    "pp2": ["parallel=pp2"],
    "tp2": ["parallel=tp2"],
}
BALANCED = {
    "dp2": (["parallel=dp2"], None),
    # one micro-batch per rank: gpipe (1f1b needs pp.size of them)
    "pp2_dp2_packed": (["parallel=pp2", "parallel.dp=2", "parallel.pp.schedule=gpipe"], MAX_TOKENS),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_matches_unpacked(tmp, reference, name):
    rows = []
    run = _run(tmp, f"packed_{name}", PACKED[name], rows=rows, max_tokens=MAX_TOKENS)
    check_parity(run, reference[0], STEPS, name, tensor_tol=1e-4 if "tp" in name else 1e-5)
    ref_rows = reference[1]
    for r, ref in zip(rows, ref_rows):
        # the same real tokens in fewer computed positions
        assert r["tokens"] == ref["tokens"]
        assert ref["pad_frac"] == ref["pad_frac_unpacked"] > 0
        assert r["pad_frac_unpacked"] == pytest.approx(ref["pad_frac"])
        assert r["pad_frac"] < r["pad_frac_unpacked"]


@pytest.mark.parametrize("name", list(BALANCED))
def test_balanced_matches_unbalanced(tmp, reference, name):
    overrides, max_tokens = BALANCED[name]
    rows = []
    run = _run(tmp, f"balanced_{name}", overrides, rows=rows, max_tokens=max_tokens, balanced=True)
    check_parity(run, reference[0], STEPS, name)
    cost = _default_family().batch_cost
    m = GLOBAL // (MICRO * 2)
    better = False
    for k, r in enumerate(rows):
        costs = [cost(_synth.collate([s])) for s in _synth.samples(GLOBAL, offset=k * GLOBAL)]
        on = balance.imbalance(costs, balance.assign(costs, 2, m, MICRO))
        off = balance.imbalance(costs, balance.contiguous(GLOBAL, 2, m, MICRO))
        # the logged max/mean costs are the balanced plan's, never worse than the sampler's split
        assert (r["cost_imbalance_ranks"], r["cost_imbalance_micro"]) == pytest.approx(on, rel=1e-6), (k, on, off)
        assert on[0] <= off[0] + 1e-12 and on[1] <= off[1] + 1e-12, (k, on, off)
        better |= on < off
    assert better
