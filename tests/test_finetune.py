"""Fine-tuning controls on the small thinker (single process, synthetic data):
freezing with patterns, per-module lr and weight decay, loss types, the
non-finite guard, TensorBoard; one pp2 run checks loss type and lr_mult
against the single process."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import _synth
from conftest import compose_cfg
from omnitrain.config import ConfigError, check_finetune
from omnitrain.models.family import LossNorm, build_family, import_object
from omnitrain.parallel.layout import whole_plan
from omnitrain.train.loop import NonFiniteError, Trainer
from test_resume import PP2, SMALL

LR = 1e-3


def _cfg(out, *overrides, steps=1, global_batch=2, micro=1):
    return compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
         "train.progress=false", "optim.scheduler.warmup_steps=0", f"optim.optimizer.lr={LR}", *SMALL, *overrides],
        output_dir=out,
    )


def _trainer(out, *overrides, **kw) -> Trainer:
    cfg = _cfg(out, *overrides, **kw)
    t = Trainer(cfg, build_family(cfg.model))
    t.loader = _synth.SynthLoader(global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size)
    return t


def _params(t: Trainer) -> dict:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def _step(t: Trainer):
    it = iter(t.loader)
    return t.train_step([next(it) for _ in range(t.num_microbatches)])


# ---- freezing and per-module lr ------------------------------------------------------


FROZEN = ["model.trainable.vision={train:false,except:[merger]}", "model.trainable.audio=false"]


def test_frozen_params_unchanged_no_state_and_lr_mult_sizes_the_first_update(tmp_path):
    t = _trainer(tmp_path, *FROZEN, "optim.lr_mult={vision:0.1,llm:2}", "+optim.module_weight_decay.llm=0.0")
    before = _params(t)
    fam = t.adapter
    merger = [n for n in before if n.startswith("model.visual.merger.")]
    frozen = [n for n in before if fam.module_of(n) == "audio" or (fam.module_of(n) == "vision" and n not in merger)]
    assert merger and frozen
    # param groups: one per module that trains, lr = lr x lr_mult
    groups = t.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * LR, 2 * LR])
    in_groups = {id(p) for g in groups for p in g["params"]}
    named = dict(t.model.named_parameters())
    assert not any(id(named[n]) in in_groups for n in frozen)

    res = _step(t)
    assert res.lr == pytest.approx(LR)  # the schedule's lr, not a module's
    after = _params(t)
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
        assert named[n].grad is None and named[n] not in t.optimizer.state, n
    # Adam's first step moves an element by lr * g / (|g| + eps) ~ lr: the
    # largest move in each module is its group's lr.
    def biggest(names):
        return max(float((after[n] - before[n]).abs().max()) for n in names)

    llm = [n for n in before if fam.module_of(n) == "llm"]
    assert biggest(merger) == pytest.approx(0.1 * LR, rel=1e-3)
    assert biggest(llm) == pytest.approx(2 * LR, rel=1e-3)
    assert len(t.optimizer.state) == len(merger) + len(llm)


def test_module_weight_decay_sets_the_group(tmp_path):
    t = _trainer(tmp_path, "+optim.module_weight_decay.vision=0.5")
    wd = {t._group_module(g): g["weight_decay"] for g in t.optimizer.param_groups}
    assert wd == {"vision": 0.5, "audio": 0.0, "llm": 0.0}


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr_mult={vison:0.5}", "optim.lr_mult.vison: unknown module; model qwen25_omni has vision, audio, llm"),
        ("+optim.module_weight_decay.text=0.1", "optim.module_weight_decay.text: unknown module"),
        ("model.trainable.vision={train:false,except:[mergr]}", "'mergr' matches no parameter of vision"),
    ],
)
def test_unknown_modules_and_patterns_are_config_errors(override, match):
    cfg = compose_cfg([*SMALL, override])
    with pytest.raises(ConfigError, match=match):
        check_finetune(cfg, build_family(cfg.model))


def test_trainable_patterns():
    cfg = compose_cfg([*SMALL, "model.trainable.llm={train:true,except:['layers.0.*','lm_head*']}"])
    fam = build_family(cfg.model)
    assert not fam.is_trainable("model.language_model.layers.0.mlp.up_proj.weight")
    assert not fam.is_trainable("lm_head.weight")  # the full name also matches
    assert fam.is_trainable("model.language_model.layers.1.mlp.up_proj.weight")
    assert fam.is_trainable("model.visual.blocks.0.mlp.up_proj.weight")


# ---- loss types ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    fam = build_family(compose_cfg(SMALL).model)
    model = fam.build(whole_plan(fam.depths), torch.device("cpu"), seed=3)
    return fam, model


def test_each_loss_type_matches_a_hand_computation(small):
    fam, model = small
    # two samples of different lengths (text, image+audio+text) in one micro-batch
    mb = _synth.collate([_synth.sample(4, text=20), _synth.sample(3, image=(1, 4, 8), audio=240, text=16)])
    ref = import_object(fam.hf_class)._from_config(fam.hf_config)
    ref.load_state_dict(model.state_dict())
    kw = {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
    with torch.no_grad():
        logits = ref(**kw, use_audio_in_video=False).logits.float()
    labels = mb["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=-100)  # (B, S-1)
    mask = labels != -100
    per_sample = [float(ce[b][mask[b]].sum()) for b in range(2)]
    counts = [int(mask[b].sum()) for b in range(2)]
    assert counts[0] != counts[1]
    # As if this micro-batch were part of a global batch of 7 samples / 100 label tokens:
    hand = {
        "token_mean": sum(per_sample) / 100,
        "sum": sum(per_sample),
        "sample_mean": sum(s / c for s, c in zip(per_sample, counts)) / 7,
    }
    seg = whole_plan(fam.depths)
    with torch.no_grad():
        as_int = fam.stage_forward(model, seg, mb, {}, 100)
        for kind, want in hand.items():
            got = fam.stage_forward(model, seg, mb, {}, LossNorm(kind, 100, 7))
            assert float(got) == pytest.approx(want, rel=1e-5), kind
            if kind == "token_mean":
                assert torch.equal(got, as_int)  # the default is today's loss, bitwise


def test_loss_type_is_global_not_per_micro_batch(tmp_path, kind="sample_mean"):
    # 2 samples as one micro-batch of 2, or two of 1 (gradient accumulation): same step loss
    a = _step(_trainer(tmp_path / "a", f"train.loss={kind}", micro=2)).loss
    b = _step(_trainer(tmp_path / "b", f"train.loss={kind}", micro=1)).loss
    assert a == pytest.approx(b, rel=1e-5)


def test_pp2_matches_single_with_sample_mean_and_lr_mult(tmp_path):
    from _layouts import check_parity, run_layout

    over = [*SMALL, "train.loss=sample_mean", "optim.lr_mult={vision:0.5,llm:2}", "optim.scheduler.warmup_steps=0"]
    ref = run_layout(tmp_path / "single", ["parallel=single", *over], steps=2, global_batch=2)
    pp2 = run_layout(tmp_path / "pp2", [*PP2, *over], steps=2, global_batch=2)
    check_parity(pp2, ref, 2, "pp2")


# ---- non-finite guard --------------------------------------------------------------------


def _poison(t: Trainer, at_step: int):
    """The loss of step `at_step` (1-based) becomes NaN."""
    forward = t.forward

    def bad(mb, inputs, n):
        out = forward(mb, inputs, n)
        return out * float("nan") if t.step + 1 == at_step else out

    t.forward = bad


def test_nonfinite_loss_is_skipped_and_logged(tmp_path, caplog):
    t = _trainer(tmp_path, "train.tensorboard=false", steps=1)
    before = _params(t)
    _poison(t, 1)
    with caplog.at_level("WARNING"):
        rows = t.fit(tmp_path)
    assert rows[0]["skipped"] is True and math.isnan(rows[0]["loss"])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["skipped"] is True
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())
    assert not t.optimizer.state and t.skipped_steps == 1
    assert t.scheduler.last_epoch == 1  # the schedule follows the step count
    assert "step 1: loss nan" in caplog.text and "micro-batch 0 of dp rank 0: samples 0..0" in caplog.text
    # the next step trains normally
    res = _step(t)
    assert math.isfinite(res.loss) and "skipped" not in res.extra
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_nonfinite_grad_norm_is_skipped(tmp_path):
    t = _trainer(tmp_path)
    before = _params(t)
    p = dict(t.model.named_parameters())["lm_head.weight"]
    p.register_hook(lambda g: g * float("inf"))
    res = _step(t)
    assert math.isfinite(res.loss) and not math.isfinite(res.grad_norm) and res.extra["skipped"]
    assert all(torch.equal(before[n], q) for n, q in t.model.named_parameters())


def test_nonfinite_stop_raises_a_user_error(tmp_path):
    from omnitrain.errors import user_error_kinds

    t = _trainer(tmp_path, "train.on_nonfinite=stop")
    before = _params(t)
    _poison(t, 1)
    with pytest.raises(NonFiniteError, match=r"^step 1: loss nan"):
        _step(t)
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())
    assert user_error_kinds()["NonFiniteError"] == "non-finite"


# ---- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = _trainer(tmp_path, "train.tensorboard=true", steps=2)
    rows = t.fit(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows])
    assert "train/grad_norm" in acc.Tags()["scalars"]
