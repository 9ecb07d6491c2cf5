"""Layout rules for TP/DP are checked before any process starts, each with a
message that names the key, the module and the sizes."""

from __future__ import annotations

import pytest

from conftest import compose_cfg
from omnitrain.config import ConfigError
from omnitrain.parallel.context import check_encoder_dp, check_layout, world_size_for
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
        Sizes.from_cfg(compose_cfg(["parallel.tp={vision: 2, audio: 1, llm: 3}"]))


def test_encoder_dp_rule():
    # vision tp1 next to llm tp2 on 8 ranks/stage: vision dp 8, llm dp 4
    sizes = Sizes(pp=1, dp=4, tp={"vision": 1, "audio": 2, "llm": 2})
    assert sizes.dp_of("vision") == 8 and sizes.dp_of("llm") == 4
    with pytest.raises(
        ConfigError,
        match=r"the LLM's dp x train.micro_batch_size = 4 x 1 = 4 is not divisible by the vision encoder's dp = 8 "
        r"\(parallel.tp.vision=1 vs parallel.tp.llm=2\): raise train.micro_batch_size to a multiple of 2",
    ):
        check_encoder_dp(sizes, 1)
    check_encoder_dp(sizes, 2)  # 4 x 2 samples over 8 vision replicas: one each


def test_encoder_dp_rule_runs_in_check_layout():
    with pytest.raises(ConfigError, match=r"not divisible by the vision encoder's dp = 4"):
        _check("parallel.tp={vision: 1, audio: 2, llm: 2}", "parallel.dp=2", "train.micro_batch_size=1")


def test_dp_mode_and_world():
    with pytest.raises(ConfigError, match=r"parallel.dp_mode='zero3': use one of replicate, fsdp"):
        _check("parallel.dp_mode=zero3")
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
    # each sets the micro-batch (and global batch) its rules need
    for name in ("hetero_tp", "pp4_tp2_hetero"):
        _check(f"parallel={name}")
    with pytest.raises(ConfigError, match=r"raise train.micro_batch_size to a multiple of 2"):
        _check("parallel=pp4_tp2_hetero", "train.micro_batch_size=1", "train.global_batch_size=4")
