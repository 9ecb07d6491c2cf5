"""The executor reproduces a single-process run: losses and every gradient.

A toy 4-block model whose cuts carry what an omni model's cuts carry: float
tensors whose length changes per micro-batch, int ids, a bool mask, a tensor
passed through unchanged over two blocks, one that depends on no input (only
on parameters), and one the next block ignores (its grad is None -> zeros).
"""

import pytest
import torch
from torch import nn

from omnitrain.pipeline import p2p
from omnitrain.pipeline import schedule as sched
from omnitrain.pipeline.executor import run_pipeline
from _dist import run_workers

D, V = 8, 11


def make_model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "lin0": nn.Linear(D, D),
            "skip": nn.Linear(D, D),
            "lin1": nn.Linear(D, D),
            "emb1": nn.Embedding(V, D),
            "bias1": nn.Linear(1, D),
            "lin2": nn.Linear(D, D),
            "lin3": nn.Linear(D, 1),
        }
    )


BLOCK_PARAMS = [("lin0", "skip"), ("lin1", "emb1", "bias1"), ("lin2",), ("lin3",)]


def make_data(m: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(m)
    data = []
    for i in range(m):
        n = 3 + (5 * i) % 7  # sequence length changes per micro-batch
        data.append(
            {
                "x": torch.randn(n, D, generator=g),
                "ids": torch.randint(0, V, (n,), generator=g),
                "target": torch.randn(n, generator=g),
            }
        )
    return data


def block(k: int, model, x: dict, raw: dict, m: int):
    if k == 0:
        return {
            "h": torch.tanh(model["lin0"](raw["x"])),
            "skip": model["skip"](raw["x"]),
            "ids": raw["ids"],
            "mask": raw["ids"] % 3 != 0,
        }
    if k == 1:
        h = torch.tanh(model["lin1"](x["h"])) + model["emb1"](x["ids"])
        n = x["ids"].shape[0]
        return {
            "h": h,
            "bias": model["bias1"](torch.ones(n, 1)),  # depends on parameters only
            "unused": h * 2,  # block 2 ignores it
            "skip": x["skip"],  # passed through unchanged
            "ids": x["ids"],
            "mask": x["mask"],
        }
    if k == 2:
        h = torch.tanh(model["lin2"](x["h"] + x["bias"])) * x["mask"][:, None]
        return {"h": h, "skip": x["skip"]}
    y = model["lin3"](x["h"] + x["skip"]).squeeze(-1)
    return ((y - raw["target"]) ** 2).mean() / m


class ToyStage:
    def __init__(self, blocks, model, data, m):
        self.blocks, self.model, self.data, self.m = blocks, model, data, m

    def forward(self, mb, inputs):
        x = inputs
        for k in self.blocks:
            x = block(k, self.model, x, self.data[mb], self.m)
        return x

    def parameters(self):  # what W (split backward) computes grads for
        names = {n for k in self.blocks for n in BLOCK_PARAMS[k]}
        return [p for n, p in self.model.named_parameters() if n.split(".")[0] in names]


def reference(m: int):
    model, data = make_model(), make_data(m)
    losses = []
    for mb in range(m):
        x = {}
        for k in range(4):
            x = block(k, model, x, data[mb], m)
        x.backward()
        losses.append(x.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def _grads(model, blocks):
    names = {n for k in blocks for n in BLOCK_PARAMS[k]}
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.split(".")[0] in names}


def _pipelined(rank, world, runs):
    import torch.distributed as dist

    batches = []  # receives posted inside a batch_isend_irecv, per run
    real = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: batches.append(sum(op.op is dist.irecv for op in ops)) or real(ops)
    up = dist.new_group(list(range(world)))  # "directional": messages to a lower rank travel here
    ways = []  # (sent to a lower rank, over `up`) per send
    send = p2p.isend_bundle
    p2p.isend_bundle = lambda b, dst, **kw: ways.append((dst < rank, kw["group"] is up)) or send(b, dst, **kw)
    out = []
    for name, m, v, *opts in runs:
        batches.clear()
        ways.clear()
        s = sched.build(name, world, m, v)
        model, data = make_model(), make_data(m)
        stages = s.stages_of(rank)
        per_stage = 4 // s.num_stages  # toy blocks per (virtual) stage
        objs = {st: ToyStage(range(st * per_stage, (st + 1) * per_stage), model, data, m) for st in stages}
        res = run_pipeline(
            s.actions[rank],
            objs,
            rank_of=s.rank_of,
            group=None,
            num_microbatches=m,
            num_stages=s.num_stages,
            # main-thread receives, each send batched with the next receive (batch_isend_irecv), as on accelerators
            prefetch=not opts,
            up_group=up if opts == ["directional"] else None,
        )
        blocks = [b for st in stages for b in objs[st].blocks]
        out.append((res.losses, _grads(model, blocks), sorted(res.forward_s), sum(batches), list(ways)))
    dist.batch_isend_irecv = real
    p2p.isend_bundle = send
    return out


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-6 * max(b.abs().max().item(), 1e-12)


RUNS = {
    1: [("interleaved_1f1b", 4, 4), ("zbv", 3, 2)],  # several stages on one rank: local hand-over
    2: [(n, m, 1) for n in ("gpipe", "1f1b") for m in range(4, 9)] + [("interleaved_1f1b", m, 2) for m in (4, 5)]
    + [("zero_bubble", m, 1) for m in (2, 5, 8)] + [(n, 5, 1, "batched") for n in ("gpipe", "1f1b", "zero_bubble")]
    + [("zbv", m, 2) for m in (2, 5)] + [("zbv", 4, 2, "main-thread")]  # V: stage 3 (the loss) back on rank 0
    + [("zbv", 4, 2, "directional"), ("interleaved_1f1b", 4, 2, "directional")],
    4: [(n, m, 1) for n in ("gpipe", "1f1b") for m in range(4, 9)] + [("zero_bubble", m, 1) for m in (4, 7)]
    + [(n, 6, 1, "batched") for n in ("gpipe", "1f1b", "zero_bubble")],
}


@pytest.mark.parametrize("p", sorted(RUNS))
def test_pipeline_matches_single_process(p):
    results = run_workers(_pipelined, p, RUNS[p])
    for i, (name, m, v, *_) in enumerate(RUNS[p]):
        ref_losses, ref_grads = reference(m)
        s = sched.build(name, p, m, v)
        seen = set()
        for rank in range(p):
            losses, grads, stages, _, ways = results[rank][i]
            if RUNS[p][i][3:] == ("directional",):  # upward messages (and only they) took the second group
                assert all(lower == up for lower, up in ways), name
            assert stages == s.stages_of(rank)
            if rank == s.rank_of(s.num_stages - 1):
                assert len(losses) == m
                assert all(_close(a, b) for a, b in zip(losses, ref_losses)), (name, m)
            else:
                assert losses == []
            for n, g in grads.items():
                assert _close(g, ref_grads[n]), (name, m, rank, n)
            seen |= set(grads)
        assert seen == set(ref_grads), (name, m)
        if RUNS[p][i][3:] == ("directional",):
            assert any(lower for rank in range(p) for lower, _ in results[rank][i][4]), name
        if RUNS[p][i][3:] == ("batched",):  # the batched path ran, receives included
            assert sum(results[rank][i][3] for rank in range(p)) > 0, name


def _stage_errors(rank, world):
    s = sched.one_f_one_b(2, 2)

    class Bad:
        def forward(self, mb, inputs):
            return torch.ones(2, requires_grad=True)  # not a scalar on the last stage

    class First:
        def forward(self, mb, inputs):
            return {"h": torch.ones(2, requires_grad=True)}

    run_pipeline(s.actions[rank], Bad() if rank else First(), num_microbatches=2)


def test_a_failing_rank_fails_cleanly():
    with pytest.raises(AssertionError, match="last stage must return a scalar loss"):
        run_workers(_stage_errors, 2)
