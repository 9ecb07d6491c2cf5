"""End-to-end checkpoints through the real training loop and worker launch:
a resumed run continues exactly (fp32, CPU), also after SIGKILL and after a
save killed half-way, and a checkpoint saved under one layout resumes under
another with the same next-step loss."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _synth
from conftest import TESTS, compose_cfg
from omnitrain import launch
from omnitrain.parallel.context import check_layout, world_size_for
from omnitrain.train import checkpoint
from omnitrain.train.worker import worker

STEPS, GLOBAL = 4, 2
RESHARD_REL = 1e-6
# The shipped tiny model at 4-layer depths and half width: the same code paths
# at a fraction of the time and checkpoint size (2 shared cores).
SMALL = [
    "model.config.vision_config.depth=4",
    "model.config.vision_config.fullatt_block_indexes=[1,3]",
    "model.config.vision_config.out_hidden_size=32",
    "model.config.audio_config.encoder_layers=4",
    "model.config.audio_config.output_dim=32",
    "model.config.text_config.num_hidden_layers=4",
    "model.config.text_config.hidden_size=32",
    "model.config.text_config.num_attention_heads=2",
    "model.config.text_config.num_key_value_heads=1",
]
PP2 = ["parallel=pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.audio=[4,0]", "parallel.pp.layers.llm=[2,2]"]
PP4_HETERO = [
    "parallel=pp4_hetero",
    "parallel.pp.schedule=gpipe",  # 2 micro-batches on 4 stages
    "parallel.pp.layers.vision=[4,0,0,0]",
    "parallel.pp.layers.audio=[0,4,0,0]",
    "parallel.pp.layers.llm=[0,1,2,1]",
]


def _loader(dp_rank, dp_size, micro=1):
    return _synth.SynthLoader(global_batch_size=GLOBAL, micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size)


def _save_params(path, trainer):
    local = {n: p.detach().clone() for n, p in trainer.adapter.local_parameters(trainer.model)}
    torch.save(local, f"{path}/params_{trainer.ctx.rank if trainer.ctx else 0}.pt")


def _cfg(out, overrides, steps=STEPS):
    cfg = compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=1", "train.keep_last=0",
         "train.progress=false", "parallel.timeout_s=60", *SMALL, *overrides],
        output_dir=out,
    )
    check_layout(cfg)
    return cfg


def _run(out, overrides, steps=STEPS):
    """Train; returns ({step: loss}, final params of all ranks)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = _cfg(out, overrides, steps)
    loader = functools.partial(_loader, micro=cfg.train.micro_batch_size)
    rows = launch.launch(worker, world_size_for(cfg), cfg, loader, functools.partial(_save_params, str(out)), timeout_s=120)
    params = {}
    for f in sorted(out.glob("params_*.pt")):
        params.update(torch.load(f))
        f.unlink()
    return {r["step"]: r["loss"] for r in rows}, params


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted single-process run, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "single"
    losses, params = _run(out, ["parallel=single", "train.save_every=2"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    return out, losses, params


def test_resume_single_is_bit_exact(tmp_path, reference):
    ref_dir, ref_losses, ref_params = reference
    assert checkpoint.latest(ref_dir).name == f"step_{STEPS}"
    losses, params = _run(tmp_path / "resumed", ["parallel=single", f"train.resume={ref_dir}/checkpoints/step_2"])
    assert losses == {s: ref_losses[s] for s in (3, 4)}  # bit for bit
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[k], ref_params[k]) for k in params)
    assert ref_losses[4] != ref_losses[1]  # training moved: not trivially equal


def test_resume_pp2_is_bit_exact(tmp_path):
    full, _ = _run(tmp_path / "full", [*PP2, "train.save_every=2"])
    resumed, _ = _run(tmp_path / "resumed", [*PP2, f"train.resume={tmp_path}/full/checkpoints/step_2"])
    assert resumed == {s: full[s] for s in (3, 4)}


def test_reshard_single_to_pp4_hetero_to_single(tmp_path, reference):
    ref_dir, ref_losses, _ = reference
    # single step 2 -> pp4_hetero runs steps 3, 4 (saving both)
    pp4, _ = _run(tmp_path / "pp4", [*PP4_HETERO, "train.save_every=1", f"train.resume={ref_dir}/checkpoints/step_2"])
    assert sorted(pp4) == [3, 4]
    assert _rel(pp4[3], ref_losses[3]) < RESHARD_REL, (pp4, ref_losses)
    # pp4_hetero step 3 -> single runs step 4
    single, _ = _run(tmp_path / "single", ["parallel=single", f"train.resume={tmp_path}/pp4/checkpoints/step_3"])
    assert sorted(single) == [4]
    assert _rel(single[4], pp4[4]) < RESHARD_REL, (single, pp4)
    assert _rel(single[4], ref_losses[4]) < RESHARD_REL


def test_reshard_single_to_dp2(tmp_path, reference):
    # The data position maps by global step: dp2 ranks take their halves of step 3.
    ref_dir, ref_losses, _ = reference
    dp2, _ = _run(tmp_path / "dp2", ["parallel=dp2", f"train.resume={ref_dir}/checkpoints/step_2"], steps=3)
    assert _rel(dp2[3], ref_losses[3]) < RESHARD_REL, (dp2, ref_losses)


@pytest.mark.parametrize("layout", ["fsdp2", "tp2", "hetero_tp"])
def test_reshard_single_to_sharded_and_back(tmp_path, reference, layout):
    # Sharded parameters (FSDP2 / DTensor TP) save their shards; DCP reshards on load.
    # hetero_tp: LLM tp2 next to encoders tp1 x 2 parts (DTensors on two meshes), micro-batches of 2.
    if layout == "fsdp2":
        ref_dir, ref_losses, _ = reference
        sharded_layout, model = ["parallel=dp2", "parallel.dp_mode=fsdp"], []
    else:
        # TP2 needs kv heads divisible by 2: its own single-process reference.
        model = ["model.config.text_config.num_key_value_heads=2"]
        ref_dir = tmp_path / "ref"
        ref_losses, _ = _run(ref_dir, ["parallel=single", "train.save_every=2", *model])
        sharded_layout = {
            "tp2": ["parallel=tp2"],
            "hetero_tp": ["parallel.tp={vision: 1, audio: 1, llm: 2}", "train.micro_batch_size=2"],
        }[layout]
    sharded, _ = _run(
        tmp_path / "sharded", [*sharded_layout, *model, "train.save_every=1", f"train.resume={ref_dir}/checkpoints/step_2"]
    )
    assert _rel(sharded[3], ref_losses[3]) < RESHARD_REL, (sharded, ref_losses)
    single, _ = _run(tmp_path / "single", ["parallel=single", *model, f"train.resume={tmp_path}/sharded/checkpoints/step_3"])
    assert _rel(single[4], sharded[4]) < RESHARD_REL, (single, sharded)


# ----------------------------------------------------------------------------- killed runs


def _train_child(out, overrides, kill_in_save_of=None):
    """Body of the training process that gets killed (one process, parallel=single)."""
    if kill_in_save_of is not None:
        real = checkpoint.dcp.save

        def save_then_die(state, checkpoint_id):
            real(state, checkpoint_id=checkpoint_id)
            if checkpoint_id.endswith(f"step_{kill_in_save_of}.tmp"):
                # Data and .metadata written, not yet renamed nor pointed to.
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.dcp.save = save_then_die
    cfg = _cfg(Path(out), overrides)
    launch.launch(worker, 1, cfg, _loader)


def _start(out, overrides, kill_in_save_of=None):
    # A fresh interpreter: a fork of this process (which already ran torch
    # thread pools and gloo groups) can hang in the child.
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_resume as t; "
        f"t._train_child({str(out)!r}, {list(overrides)!r}, {kill_in_save_of!r})"
    )
    # The same intra-op threads as the reference run in this process: another
    # count sums matmul blocks in another order, and the resumed steps would
    # differ from the reference in the last bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_between_saves_then_resume_is_exact(tmp_path, reference):
    _, ref_losses, _ = reference
    out = tmp_path / "run"
    p = _start(out, ["parallel=single", "train.save_every=1"])
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not pointer.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()  # SIGKILL
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, err.decode()[-3000:]
    saved = int(checkpoint.latest(out).name.split("_")[1])
    assert saved < STEPS, "the run finished before it could be killed"
    losses, _ = _run(out, ["parallel=single", "train.save_every=1", "train.resume=auto"])
    assert losses == {s: ref_losses[s] for s in range(saved + 1, STEPS + 1)}


def test_sigkill_inside_a_save_leaves_latest_on_the_previous_step(tmp_path, reference):
    _, ref_losses, _ = reference
    out = tmp_path / "run"
    p = _start(out, ["parallel=single", "train.save_every=2"], 4)
    _, err = p.communicate(timeout=180)
    assert p.returncode == -signal.SIGKILL, err.decode()[-3000:]
    root = out / "checkpoints"
    assert (root / "step_4.tmp" / ".metadata").is_file()  # its data was complete...
    assert not (root / "step_4").exists()  # ...but it was never published
    assert checkpoint.latest(out).name == "step_2"
    assert checkpoint.find_resume(out, "auto").name == "step_2"
    losses, _ = _run(out, ["parallel=single", "train.save_every=2", "train.resume=auto"])
    assert losses == {3: ref_losses[3], 4: ref_losses[4]}
    assert checkpoint.latest(out).name == "step_4"
    assert not (root / "step_4.tmp").exists()  # the next save cleaned it up
