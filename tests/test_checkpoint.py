"""Checkpoints: exact resume, atomic saves, resharding, clear errors on bad checkpoints."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from omnitrain import device, launch
from omnitrain.train import checkpoint as ckpt

CPU = device.detect("cpu")
N_LAYERS = 4


class Blocks(nn.Module):
    """Independent layers (loss = sum over layers), so a rank owning some layers
    trains them exactly as one process owning all would; HF-like names."""

    def __init__(self, width: int = 8, n: int = N_LAYERS, p_drop: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.drop = nn.Dropout(p_drop)

    def loss(self, x):
        return sum(self.drop(layer(x)).pow(2).mean() for layer in self.layers if layer.weight.device.type != "meta")


class Loader:
    """Batches drawn from its own generator; position and generator are its state."""

    def __init__(self, seed: int = 7):
        self.gen = torch.Generator().manual_seed(seed)
        self.pos = 0

    def next(self):
        self.pos += 1
        return torch.randn(4, 8, generator=self.gen)

    def state_dict(self):
        return {"pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]
        self.gen.set_state(sd["gen"])


def _build(seed: int = 0, owned=None, width: int = 8, n: int = N_LAYERS, p_drop: float = 0.1):
    torch.manual_seed(seed)
    model = Blocks(width, n, p_drop)
    for i, layer in enumerate(model.layers):
        if owned is not None and i not in owned:
            layer.to("meta")  # not materialized on this pipeline rank
    params = [p for p in model.parameters() if p.device.type != "meta"]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, Loader()


def _train(model, opt, sched, loader, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model.loss(loader.next())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_bit_for_bit(tmp_path):
    model, opt, sched, loader = _build()
    ref = _train(model, opt, sched, loader, 6)
    ref_params = _params(model)

    model, opt, sched, loader = _build()
    first = _train(model, opt, sched, loader, 3)
    path = ckpt.save(
        tmp_path, 3, model=model, optimizer=opt, scheduler=sched, loader=loader, dev=CPU, extra={"tokens": 12}
    )
    assert path == tmp_path / "checkpoints" / "step_3"
    torch.rand(5)  # move the RNG on: load must restore it

    # A fresh process would build everything anew, with other weights.
    model, opt, sched, loader = _build(seed=99)
    extra = {}
    path = ckpt.find_resume(tmp_path, "auto")
    step = ckpt.load(path, model=model, optimizer=opt, scheduler=sched, loader=loader, dev=CPU, extra=extra)
    assert step == 3 and loader.pos == 3 and extra == {"tokens": 12}
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    rest = _train(model, opt, sched, loader, 3)
    assert first + rest == ref
    _assert_same(_params(model), ref_params)


def _train_and_die(run_dir: str):
    model, opt, sched, loader = _build()
    for step in range(1, 7):
        _train(model, opt, sched, loader, 1)
        if step % 2 == 0:
            ckpt.save(run_dir, step, model=model, optimizer=opt, scheduler=sched, loader=loader, keep_last=2)
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sigkill_between_saves_resumes_exactly_from_latest(tmp_path):
    model, opt, sched, loader = _build()
    ref = _train(model, opt, sched, loader, 8)

    child = multiprocessing.get_context("fork").Process(target=_train_and_die, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_4"]

    model, opt, sched, loader = _build(seed=5)
    step = ckpt.load(ckpt.find_resume(tmp_path, "auto"), model=model, optimizer=opt, scheduler=sched, loader=loader)
    assert step == 4
    assert _train(model, opt, sched, loader, 4) == ref[4:]


def test_interrupted_save_leaves_previous_latest(tmp_path, monkeypatch):
    model, opt, sched, loader = _build()
    _train(model, opt, sched, loader, 1)
    ckpt.save(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, loader=loader)
    saved = _params(model)
    _train(model, opt, sched, loader, 1)

    real_save = ckpt.dcp.save

    def save_then_crash(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # every shard written ...
        raise OSError("disk full")  # ... but the step never becomes visible

    monkeypatch.setattr(ckpt.dcp, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, loader=loader)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)

    root = tmp_path / "checkpoints"
    assert (root / "step_2.tmp").is_dir() and not (root / "step_2").exists()
    assert ckpt.find_resume(tmp_path, "auto") == root / "step_1"
    with pytest.raises(ckpt.CheckpointError, match="unfinished save"):
        ckpt.find_resume(tmp_path, root / "step_2.tmp")

    fresh, fopt, fsched, floader = _build(seed=3)
    assert ckpt.load(root / "step_1", model=fresh, optimizer=fopt, scheduler=fsched, loader=floader) == 1
    _assert_same(_params(fresh), saved)

    # The next save clears the leftover and keep_last prunes the oldest.
    ckpt.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, loader=loader, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]


def test_find_resume(tmp_path):
    assert ckpt.find_resume(tmp_path, None) is None
    assert ckpt.find_resume(tmp_path, "auto") is None
    model, opt, sched, loader = _build()
    _train(model, opt, sched, loader, 1)
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, model=model, optimizer=opt, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]
    assert ckpt.find_resume(tmp_path, "auto") == root / "step_3"
    assert ckpt.find_resume(tmp_path / "elsewhere", str(tmp_path)) == root / "step_3"
    assert ckpt.find_resume(tmp_path / "elsewhere", str(root / "step_2")) == root / "step_2"
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope"))


def test_bad_checkpoints_raise_clearly_and_change_nothing(tmp_path):
    model, opt, sched, loader = _build()
    _train(model, opt, sched, loader, 2)
    path = ckpt.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, loader=loader)

    def check(fails, match, **kw):
        m, o, s, lo = fails
        before = _params(m)
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.load(path, model=m, optimizer=o, scheduler=s, loader=lo, **kw)
        _assert_same(_params(m), before)
        assert not o.state and s.last_epoch == 0 and lo.pos == 0

    check(_build(width=16), r"shape mismatches .*layers\.0\.weight: checkpoint \(8, 8\) vs model \(16, 16\)")
    check(_build(n=5), r"names missing .*layers\.4\.")
    check(_build(n=3), r"holds 2 model tensors this model does not have \(first: model\.layers\.3\.bias")
    # A subset model is fine without strict.
    m, o, s, lo = _build(n=3)
    assert ckpt.load(path, model=m, optimizer=o, scheduler=s, loader=lo, strict=False) == 2

    shard = next(path.glob("*.distcp"))
    shard.rename(shard.with_suffix(".gone"))
    check(_build(), r"incomplete: __0_0\.distcp missing")


def test_save_without_optimizer_loads_into_a_fresh_one(tmp_path):
    model, opt, sched, loader = _build()
    _train(model, opt, sched, loader, 2)
    path = ckpt.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, loader=loader, save_optimizer=False)
    m, o, s, lo = _build(seed=1)
    assert ckpt.load(path, model=m, optimizer=o, scheduler=s, loader=lo) == 2
    _assert_same(_params(m), _params(model))
    assert not o.state  # fresh, not touched by torch's zero-lr init


def _stage_save(run_dir: str):
    rank, world = launch.init_distributed(CPU, timeout_s=30)
    half = N_LAYERS // world
    # No dropout: the stages would draw their masks in another order than one process.
    model, opt, sched, loader = _build(owned=range(rank * half, (rank + 1) * half), p_drop=0.0)
    _train(model, opt, sched, loader, 3)
    ckpt.save(run_dir, 3, model=model, optimizer=opt, scheduler=sched, loader=loader, keep_last=1)
    return sorted(k for k, v in model.state_dict().items() if v.device.type != "meta")


def test_two_pipeline_ranks_save_one_process_loads_all(tmp_path):
    owned0 = launch.launch(_stage_save, 2, str(tmp_path), timeout_s=30)
    assert owned0 == ["layers.0.bias", "layers.0.weight", "layers.1.bias", "layers.1.weight"]
    path = ckpt.find_resume(tmp_path, "auto")
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    model, opt, sched, loader = _build(p_drop=0.0)
    _train(model, opt, sched, loader, 3)

    m, o, s, lo = _build(seed=4, p_drop=0.0)
    assert ckpt.load(path, model=m, optimizer=o, scheduler=s, loader=lo) == 3
    _assert_same(_params(m), _params(model))
    for p, q in zip(opt.param_groups[0]["params"], o.param_groups[0]["params"]):
        _assert_same(opt.state[p], o.state[q])
    assert s.last_epoch == 3 and lo.pos == 3
    # Continuing gives the same as one process that never stopped.
    assert _train(m, o, s, lo, 2) == _train(model, opt, sched, loader, 2)


def _stage_load(path: str, ref: dict):
    rank, world = launch.init_distributed(CPU, timeout_s=30)
    half = N_LAYERS // world
    owned = range(rank * half, (rank + 1) * half)
    model, opt, sched, loader = _build(seed=rank + 10, owned=owned, p_drop=0.0)
    assert ckpt.load(path, model=model, optimizer=opt, scheduler=sched, loader=loader) == 3
    mine = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    _assert_same(mine, {k: ref[k] for k in mine})
    assert len(opt.state) == 2 * half and loader.pos == 3
    # One rank's model does not fit: every rank raises, none blocks in the load.
    bad = _build(width=16 if rank == 1 else 8, owned=owned, p_drop=0.0)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(path, model=bad[0], optimizer=bad[1], scheduler=bad[2], loader=bad[3])
    return str(info.value)


def test_one_process_saves_two_pipeline_ranks_load_their_halves(tmp_path):
    model, opt, sched, loader = _build(p_drop=0.0)
    _train(model, opt, sched, loader, 3)
    path = ckpt.save(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, loader=loader)
    message = launch.launch(_stage_load, 2, str(path), _params(model), timeout_s=30)
    assert message.startswith("rank 1: checkpoint does not fit this model") and "(8, 8) vs model (16, 16)" in message
