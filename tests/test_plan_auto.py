"""The planner's cost model and `auto` layouts: pure, on the meta device, with
explicit token counts (no data scan) and the roofline time model."""

import copy
import math

import pytest
from omegaconf import open_dict

from omnitrain import plan
from omnitrain.models.family import build_family
from omnitrain.parallel.context import check_layout
from omnitrain.parallel.layout import validate_layout
from omnitrain.parallel.mesh import Sizes
from omnitrain.plan import cost, layout, search

# One model per shipped family package (the tiny ones keep the real depths).
FAMILIES = {
    "qwen25_omni_7b": ["plan.tokens.image=256", "plan.tokens.audio=300", "plan.tokens.video=0", "plan.tokens.text=200"],
    "qwen25_omni": ["plan.tokens.image=256", "plan.tokens.audio=300", "plan.tokens.video=0", "plan.tokens.text=200"],
    "qwen25_vl": ["plan.tokens.image=900", "plan.tokens.video=500", "plan.tokens.text=200"],
    "qwen2_vl": ["plan.tokens.image=900", "plan.tokens.text=200"],
    "qwen3_omni": ["plan.tokens.image=256", "plan.tokens.audio=300", "plan.tokens.video=0", "plan.tokens.text=200"],
    "qwen3_vl": ["plan.tokens.image=900", "plan.tokens.video=500", "plan.tokens.text=200"],
}


@pytest.mark.parametrize("model", ["qwen25_omni", "qwen25_vl", "qwen2_vl", "qwen3_omni", "qwen3_vl"])
def test_auto_is_deterministic_and_valid_for_pp_1_to_8(model):
    family = build_family(plan.compose([f"model={model}"]).model)
    for pp in range(1, 9):
        first = plan.compose([f"model={model}", f"parallel.pp.size={pp}", "parallel.pp.layers=auto",
                              "train.global_batch_size=16", *FAMILIES[model]])
        splits = []
        for cfg in (copy.deepcopy(first), first):
            plans = check_layout(cfg, family)  # resolves auto, then every layout rule
            assert len(plans) == pp
            splits.append({k: list(v) for k, v in cfg.parallel.pp.layers.items()})
        assert splits[0] == splits[1], (model, pp)
        assert {m: sum(c) for m, c in splits[0].items()} == family.depths


def _model(model, pp, extra=()):
    cfg = plan.compose([f"model={model}", f"parallel.pp.size={pp}", "train.global_batch_size=16", *FAMILIES[model], *extra])
    family = build_family(cfg.model)
    sizes = Sizes.from_cfg(cfg, family.module_names)
    load = layout.load_for(cfg, family)
    return cfg, family, layout.cost_model(cfg, family, sizes, load, layout.time_model(cfg, family, load))


def _worst(cm, family, pp, split):
    plans = validate_layout(pp, split, family.depths, num_microbatches=pp, schedule="1f1b")
    return max(s.fwd + s.bwd for s in (cm.stage(p) for p in plans))


def test_best_split_is_the_exhaustive_optimum():
    # an independent branch-and-bound over every valid split agrees with the DP
    for pp in (2, 3, 4):
        _, family, cm = _model("qwen2_vl", pp)
        split = search.best_split(cm, pp, schedule="1f1b", m=16)
        value, found = search.exhaustive(cm, pp)
        assert math.isclose(_worst(cm, family, pp, split), value, rel_tol=1e-9)
        assert math.isclose(_worst(cm, family, pp, found), value, rel_tol=1e-9)


def test_auto_beats_the_hand_splits_on_its_own_model():
    _, family, cm = _model("qwen25_omni", 4)
    auto = search.auto_split(cm, 4, schedule="1f1b", m=16)
    hetero = {"vision": [32, 0, 0, 0], "audio": [0, 32, 0, 0], "llm": [0, 7, 12, 9]}
    uniform = {"vision": [23, 9, 0, 0], "audio": [0, 14, 18, 0], "llm": [0, 0, 5, 23]}
    assert _worst(cm, family, 4, auto) <= min(_worst(cm, family, 4, hetero), _worst(cm, family, 4, uniform))


def test_memory_cap_is_respected_or_refused():
    cfg, family, cm = _model("qwen25_omni", 4)
    free = search.best_split(cm, 4, schedule="1f1b", m=16)
    plans = validate_layout(4, free, family.depths, num_microbatches=16, schedule="1f1b")
    peak = max(cost.predict(cm, plans, schedule="1f1b", pp=4, m=16).memory)
    capped = search.best_split(cm, 4, schedule="1f1b", m=16, memory_cap=peak * 0.9)
    if capped is not None:
        plans = validate_layout(4, capped, family.depths, num_microbatches=16, schedule="1f1b")
        assert max(cost.predict(cm, plans, schedule="1f1b", pp=4, m=16).memory) <= peak * 0.9
    assert search.best_split(cm, 4, schedule="1f1b", m=16, memory_cap=1.0) is None
    with open_dict(cfg):
        cfg.parallel.pp.layers = "auto"
        cfg.plan.memory_gib = 1e-9
    with pytest.raises(plan.layout.ConfigError, match="plan.memory_gib"):
        check_layout(cfg, family)


def test_cost_model_follows_the_family():
    _, family, cm = _model("qwen25_omni", 1)
    by_type = {s.type for s in cm.segs}
    assert {"vision_window", "vision_full", "audio", "llm", "merge", "head", "vision_pre", "audio_post"} <= by_type
    # a full-attention vision block scores whole images; a window block only its windows
    assert cm.flops[("vision", "layer", 7)] > cm.flops[("vision", "layer", 6)]
    # TP shares a layer's time and its sharded parameters over the ranks
    _, _, cm2 = _model("qwen25_omni_7b", 1, ["parallel.tp=2"])
    _, _, cm1 = _model("qwen25_omni_7b", 1)
    k = ("llm", "layer", 3)
    assert cm2.fwd[k] < 0.75 * cm1.fwd[k] and cm2.state[k] < 0.6 * cm1.state[k]


def test_parallel_auto_picks_sizes_for_the_world():
    cfg = plan.compose(["model=qwen25_omni_7b", "parallel=auto", "plan.world_size=4", "plan.memory_gib=80",
                        "train.global_batch_size=16", *FAMILIES["qwen25_omni"]])
    family = build_family(cfg.model)
    plans = check_layout(cfg, family)
    sizes = Sizes.from_cfg(cfg, family.module_names)
    assert sizes.world == 4 and len(plans) == sizes.pp
    again = plan.compose(["model=qwen25_omni_7b", "parallel=auto", "plan.world_size=4", "plan.memory_gib=80",
                          "train.global_batch_size=16", *FAMILIES["qwen25_omni"]])
    check_layout(again, family)
    assert again.parallel == cfg.parallel and again.train.micro_batch_size == cfg.train.micro_batch_size


@pytest.mark.parametrize("args", [
    ["model=qwen25_omni_7b", "parallel=pp4_hetero", "plan.tokens.image=1024", "plan.tokens.audio=750", "plan.tokens.text=300"],
    ["model=qwen25_vl_72b", "parallel=vl72b_pp8_tp2", "train.global_batch_size=16", "plan.tokens.image=1024", "plan.tokens.text=300"],
])
def test_plan_prints_stages_of_the_big_models(args, capsys):
    assert plan.main(args) == 0
    out = capsys.readouterr().out
    assert "TFLOP/mb" in out and "state GiB/rank" in out and "bottleneck" in out and "bubble" in out
    assert "tokens per sample (plan.tokens)" in out and "roofline" in out
