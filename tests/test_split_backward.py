"""Split backward (pipeline/split_backward.py): B's input grads and B + W's
parameter grads equal one plain backward's, and W does not walk the
input-grad chain again."""

import torch
from torch import nn

from omnitrain.pipeline.split_backward import backward_input, backward_weight


class Count(torch.autograd.Function):
    """Identity that counts its backward runs."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        Count.calls += 1
        return g


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 12)
        self.norm = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)  # used twice along the input path: the plain fallback
        self.emb = nn.Embedding(9, 6)  # on raw ids beside the received activations
        self.only = nn.Linear(1, 6)  # an output that depends on parameters alone
        self.unused = nn.Linear(2, 2)

    def forward(self, x, ids):
        h = torch.tanh(self.l1(x)) + x + self.emb(ids)
        h = Count.apply(h)
        a, b = self.l2(self.norm(h)).chunk(2, dim=-1)  # a node with two outputs
        h = self.shared(torch.relu(self.shared(a * b)))
        return {"h": h, "x": x, "only": self.only(torch.ones(len(ids), 1))}


def _run(split: bool, steps=2):
    model = Stage()
    params = [p for p in model.parameters()]
    xs = []
    for k in range(steps):  # two micro-batches: W accumulates like backward does
        g = torch.Generator().manual_seed(k)
        x = torch.randn(5, 6, generator=g).requires_grad_(True)
        ids = torch.randint(0, 9, (5,), generator=g)
        out = model(x, ids)
        grads = {n: torch.randn(t.shape, generator=g) for n, t in out.items()}
        roots, gs = list(out.values()), list(grads.values())
        if split:
            Count.calls = 0
            work = backward_input(roots, gs, [x], params)
            assert Count.calls == 1
            backward_weight(work)
            assert Count.calls == 1, "W ran the input-grad chain again"
            assert [p for p in work.plain] == [model.shared.weight, model.shared.bias]
            assert work.groups and work.root_groups
        else:
            torch.autograd.backward(roots, gs)
        xs.append(x.grad)
    return xs, {n: p.grad for n, p in model.named_parameters()}


def test_split_backward_matches_one_backward():
    ref_x, ref = _run(False)
    got_x, got = _run(True)
    for a, b in zip(got_x, ref_x):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert got["unused.weight"] is None and ref["unused.weight"] is None
    for n, g in ref.items():
        if g is not None:
            torch.testing.assert_close(got[n], g, rtol=0, atol=1e-6, msg=n)


def test_last_stage_loss_and_no_inputs():
    for split in (False, True):
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
        torch.manual_seed(1)
        for p in model.parameters():
            nn.init.normal_(p)
        x = torch.randn(4, 3, requires_grad=True)
        loss = model(x).square().mean()
        if split:
            backward_weight(backward_input([loss], None, [x], list(model.parameters())))
            got = [p.grad for p in model.parameters()] + [x.grad]
        else:
            loss.backward()
            ref = [p.grad for p in model.parameters()] + [x.grad]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
