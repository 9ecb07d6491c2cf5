"""Layout rules for TP/DP are checked before any process starts, each with a
message that names the key, the module and the sizes."""

from __future__ import annotations

import pytest

from conftest import compose_cfg
from omnitrain.config import ConfigError
from omnitrain.parallel.context import check_layout, encoder_micro_multiple, fit_micro_batch, world_size_for
from omnitrain.parallel.mesh import Sizes


def _check(*overrides):
    check_layout(compose_cfg(list(overrides)))


@pytest.mark.parametrize(
    "override,match",
    [
        # 4 heads, 2 kv heads: tp 4 divides the heads but not the kv heads
        ("parallel.tp={vision: 2, audio: 2, llm: 4}", r"parallel.tp.llm=4: the llm module's num_key_value_heads=2 is not divisible by 4"),
        ("parallel.tp={vision: 4, audio: 2, llm: 4}", r"parallel.tp.vision=4: the vision module's num_heads=2 is not divisible by 4"),
        ("parallel.tp={vision: 2, audio: 4, llm: 4}", r"parallel.tp.audio=4: the audio module's encoder_attention_heads=2"),
        ("parallel.tp={vision: 1, audio: 1, llm: 3}", r"parallel.tp.llm=3: the llm module's num_attention_heads=4 is not divisible by 3"),
    ],
)
def test_tp_must_divide_heads(override, match):
    with pytest.raises(ConfigError, match=match):
        _check(override)


def test_tp_must_divide_intermediate():
    with pytest.raises(ConfigError, match=r"parallel.tp.llm=2: the llm module's intermediate_size=129 is not divisible by 2"):
        _check("parallel=tp2", "model.config.text_config.intermediate_size=129")


def test_tp_must_divide_vocab():
    # embeddings and lm_head are sharded over the vocabulary
    with pytest.raises(ConfigError, match=r"parallel.tp.llm=2: the llm module's vocab_size=152065 is not divisible by 2"):
        _check("parallel=tp2", "model.config.text_config.vocab_size=152065")


def test_tp_sizes_must_nest():
    with pytest.raises(ConfigError, match=r"parallel.tp.vision=2 does not divide the largest TP size 3"):
        Sizes.from_cfg(compose_cfg(["parallel.tp={vision: 2, audio: 1, llm: 3}"]), ("vision", "audio", "llm"))


def test_encoder_dp_rule():
    # vision tp1 next to llm tp2 on 8 ranks/stage: vision dp 8, llm dp 4:
    # 4 x micro samples over 8 vision replicas needs micro a multiple of 2
    sizes = Sizes(pp=1, dp=4, tp={"vision": 1, "audio": 2, "llm": 2})
    assert sizes.dp_of("vision") == 8 and sizes.dp_of("llm") == 4
    assert encoder_micro_multiple(sizes) == 2
    assert encoder_micro_multiple(Sizes(pp=1, dp=1, tp={"vision": 1, "audio": 2, "llm": 4})) == 4


def test_layout_derives_the_micro_batch_within_the_global_batch():
    # hetero_tp: LLM dp2, vision dp4: micro 1 -> 2; the global batch (what a step trains on) stays
    cfg = compose_cfg(["parallel=hetero_tp", "train.global_batch_size=8"])
    check_layout(cfg)
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (2, 8)
    cfg = compose_cfg(["parallel=hetero_tp", "train.global_batch_size=8", "train.micro_batch_size=4"])
    check_layout(cfg)
    assert cfg.train.micro_batch_size == 4  # already a multiple: kept
    # no micro-batch size fits: one line naming values that work
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be a multiple of 2 .* set train.global_batch_size to a multiple of 4"):
        _check("parallel=hetero_tp", "train.global_batch_size=2")


def test_presets_do_not_change_the_batch():
    from omegaconf import OmegaConf

    base = compose_cfg([]).train
    for name in ("single", "hetero_tp", "pp4_tp2_hetero", "pp4_hetero", "fsdp4"):
        assert OmegaConf.to_container(compose_cfg([f"parallel={name}"]).train) == OmegaConf.to_container(base), name


def test_dp_mode_and_world():
    with pytest.raises(ConfigError, match=r"parallel.dp_mode='zero3': use one of replicate, fsdp"):
        _check("parallel.dp_mode=zero3")
    with pytest.raises(ConfigError, match=r"schedule=zero_bubble with parallel.dp_mode=fsdp: .* use parallel.dp_mode=replicate"):
        _check("parallel=pp2", "parallel.dp=2", "parallel.dp_mode=fsdp", "parallel.pp.schedule=zero_bubble", "train.global_batch_size=8")
    with pytest.raises(ConfigError, match=r"schedule=zbv with parallel.dp_mode=fsdp: .* use parallel.dp_mode=replicate"):
        _check("parallel=pp4_zbv", "parallel.dp=2", "parallel.dp_mode=fsdp", "train.global_batch_size=8")
    assert world_size_for(compose_cfg(["parallel=pp2_tp2"])) == 4
    assert world_size_for(compose_cfg(["parallel=fsdp4"])) == 4
    assert world_size_for(compose_cfg(["parallel=tp2", "parallel.dp=2"])) == 4
    assert world_size_for(compose_cfg(["parallel=hetero_tp"])) == 4
    assert world_size_for(compose_cfg(["parallel=pp4_tp2_hetero"])) == 8


def test_sequence_parallel_needs_llm_tp():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=true .* but parallel.tp.llm=1: raise parallel.tp.llm"):
        _check("parallel=pp2", "parallel.sequence_parallel=true")


def test_encoder_tp_at_most_llm_tp():
    with pytest.raises(ConfigError, match=r"parallel.tp.vision=2 is larger than parallel.tp.llm=1: an encoder's TP size must be at most the LLM's"):
        _check("parallel.tp={vision: 2, audio: 1, llm: 1}")


def test_hetero_layouts_pass_their_rules():
    _check("parallel=hetero_tp")
    _check("parallel=pp4_tp2_hetero", "train.global_batch_size=8")
    # micro 2 (derived) leaves 2 micro-batches for 4 stages: 1F1B says what to change
    with pytest.raises(ConfigError, match=r"needs at least parallel.pp.size=4 micro-batches per step, got 2 .* use parallel.pp.schedule=gpipe"):
        _check("parallel=pp4_tp2_hetero")


def test_modules_the_model_lacks_are_refused():
    with pytest.raises(ConfigError, match=r"parallel.tp.speech: model=qwen25_omni has no speech module; its modules are vision, audio, llm"):
        _check("parallel.tp={speech: 2}")
    with pytest.raises(ConfigError, match=r"parallel.pp.layers.speech: model=qwen25_omni has no speech module; its modules are vision, audio, llm"):
        _check("parallel=pp2", "+parallel.pp.layers.speech=[1,1]")


def test_fsdp_over_a_fused_qkv_tp_shard_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.dp_mode=fsdp with parallel.tp.vision=2: model=qwen25_vl's vision module fuses q\|k\|v"):
        _check("model=qwen25_vl", "parallel=tp2", "parallel.dp=2", "parallel.dp_mode=fsdp")
    _check("model=qwen25_vl", "parallel=tp2", "parallel.tp={vision: 1, llm: 2}", "parallel.dp=2", "parallel.dp_mode=fsdp")


@pytest.mark.parametrize(
    "overrides,match",
    [
        # the default model (Qwen2.5-Omni) has dense MLPs only
        (["parallel=dp2", "parallel.ep.llm=2"], r"parallel.ep.llm=2: model=\S+ has no mixture-of-experts layers"),
        (["model=qwen3_omni", "parallel=dp2", "parallel.ep.llm=3", "parallel.dp=3"], r"parallel.ep.llm=3 does not divide model=qwen3_omni's 8 experts"),
        (["model=qwen3_omni", "parallel=dp2", "parallel.ep.llm=4"], r"parallel.ep.llm=4: expert parallelism uses the LLM's data-parallel ranks, and 4 does not divide its 2"),
        (["model=qwen3_omni", "parallel.ep.llm=0"], r"parallel.ep.llm=0: must be >= 1"),
    ],
)
def test_ep_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _check("train.global_batch_size=12", *overrides)


def test_ep_with_fsdp_is_accepted():
    # the experts are FSDP-sharded over their edp replicas (tests/test_qwen3_parity.py)
    _check("model=qwen3_omni", "parallel=dp2", "parallel.dp=4", "parallel.ep.llm=2", "parallel.dp_mode=fsdp", "train.global_batch_size=8")


def test_planner_counts_experts_once_under_fsdp_and_ep():
    # experts per rank: 1/ep replicated, 1/(edp x ep) = 1/dp under FSDP (as dense weights)
    from omnitrain.models.family import build_family
    from omnitrain.plan import rank_params

    cfg = compose_cfg(["model=qwen3_omni", "parallel=dp2", "parallel.dp=4", "train.global_batch_size=8"])
    family = build_family(cfg.model)
    plans, model = check_layout(cfg), family.build_meta()
    tp, fsdp = {m: 1 for m in family.module_names}, {m: 4 for m in family.module_names}
    assert rank_params(family, model, plans, tp, fsdp, ep=2) == rank_params(family, model, plans, tp, fsdp, ep=1)
    assert rank_params(family, model, plans, tp, None, ep=2)[0] < rank_params(family, model, plans, tp, None, ep=1)[0]
