import pytest

from omnitrain.config import ConfigError
from omnitrain.parallel.layout import even_split, validate_layout

OMNI = {"vision": 32, "audio": 32, "llm": 28}
HETERO = {"vision": [32, 0, 0, 0], "audio": [0, 32, 0, 0], "llm": [0, 7, 12, 9]}


def plan(layers, pp=4, depths=OMNI, m=8, schedule="1f1b", v=1):
    return validate_layout(pp, layers, depths, num_microbatches=m, schedule=schedule, virtual_stages=v)


def bad(match, *args, **kw):
    with pytest.raises(ConfigError, match=match):
        plan(*args, **kw)


def test_pp4_hetero_plan():
    s0, s1, s2, s3 = plan(HETERO)
    assert s0.layers == {"vision": range(0, 32), "audio": range(0, 0), "llm": range(0, 0)}
    assert (("vision" in s0.pre), ("vision" in s0.post), ("audio" in s0.pre), s0.merge, s0.head) == (True, True, False, False, False)
    assert s1.layers["audio"] == range(0, 32) and s1.layers["llm"] == range(0, 7)
    assert (("audio" in s1.pre), ("audio" in s1.post), s1.merge, ("vision" in s1.post)) == (True, True, True, False)
    assert s2.layers["llm"] == range(7, 19) and not (s2.merge or s2.head)
    assert s3.layers["llm"] == range(19, 28) and s3.head and s3.is_last
    assert [s.rank for s in (s0, s1, s2, s3)] == [0, 1, 2, 3]


def test_single_stage_and_split_encoder():
    (only,) = plan(None, pp=1)
    assert only.layers["vision"] == range(32) and only.merge and only.head and ("vision" in only.pre) and ("audio" in only.post)
    s = plan({"vision": [16, 16], "audio": [32, 0], "llm": [0, 28]}, pp=2)
    assert (("vision" in s[0].pre), ("vision" in s[0].post), ("vision" in s[1].pre), ("vision" in s[1].post)) == (True, False, False, True)
    assert s[1].merge and s[1].layers["vision"] == range(16, 32)


def test_model_without_audio():
    s = plan({"vision": [32, 0], "llm": [10, 18]}, pp=2, depths={"vision": 32, "audio": 0, "llm": 28})
    assert not any(("audio" in x.pre) or ("audio" in x.post) for x in s)
    assert s[0].layers["audio"] == range(0, 0) and not s[0].has("audio") and s[0].merge


def test_even_split():
    assert even_split(28, 4) == [7, 7, 7, 7]
    assert even_split(28, 3) == [10, 9, 9]
    assert even_split(2, 4) == [1, 1, 0, 0]
    pp4 = {"vision": [32, 0, 0, 0], "audio": [32, 0, 0, 0], "llm": even_split(28, 4)}
    assert len(plan(pp4)) == 4


def test_interleaved_virtual_stages():
    layers = {"vision": [32] + [0] * 7, "audio": [32] + [0] * 7, "llm": [0] + even_split(28, 7)}
    s = plan(layers, schedule="interleaved_1f1b", v=2)
    assert [x.rank for x in s] == [0, 1, 2, 3, 0, 1, 2, 3] and s[7].head and s[1].merge


def test_zbv_places_stages_in_a_v():
    layers = {"vision": [32] + [0] * 7, "audio": [32] + [0] * 7, "llm": [0] + even_split(28, 7)}
    s = plan(layers, schedule="zbv", v=2)
    # rank r holds stages r and 7 - r: the loss (stage 7) on rank 0, the turn (3 -> 4) on rank 3
    assert [x.rank for x in s] == [0, 1, 2, 3, 3, 2, 1, 0] and s[7].head and s[1].merge


# One test per rule, asserting the message names the key and the fix.


def test_rule_list_length():
    bad(r"parallel\.pp\.layers\.llm has 3 entries, need parallel\.pp\.size=4", {**HETERO, "llm": [7, 12, 9]})
    bad(r"need parallel\.pp\.size x parallel\.pp\.virtual_stages = 8", HETERO, schedule="interleaved_1f1b", v=2)


def test_rule_sum_equals_depth():
    bad(
        r"parallel\.pp\.layers\.llm=\[0, 7, 12, 8\] sums to 27, but the model has 28 llm layers: "
        r"make the entries sum to 28",
        {**HETERO, "llm": [0, 7, 12, 8]},
    )


def test_rule_no_negative_counts():
    bad(r"parallel\.pp\.layers\.llm\[1\]=-1: layer counts must be >= 0", {**HETERO, "llm": [0, -1, 20, 9]})


def test_rule_encoders_before_merge():
    bad(
        r"parallel\.pp\.layers\.vision=\[0, 0, 32, 0\]: vision layers on stage 2, after stage 1 which holds "
        r"LLM layer 0 .* move them to stage 1 or earlier",
        {**HETERO, "vision": [0, 0, 32, 0], "audio": [32, 0, 0, 0]},
    )


def test_rule_every_stage_has_a_layer():
    bad(
        r"parallel\.pp\.layers: stage 1 holds no layers of any module",
        {"vision": [32, 0, 0, 0], "audio": [32, 0, 0, 0], "llm": [10, 0, 9, 9]},
    )


def test_rule_last_stage_holds_llm():
    bad(
        r"parallel\.pp\.layers\.llm=\[0, 14, 14, 0\]: the last stage must hold LLM layers",
        {"vision": [32, 0, 0, 0], "audio": [0, 32, 0, 0], "llm": [0, 14, 14, 0]},
    )


def test_rule_enough_microbatches():
    bad(
        r"parallel\.pp\.schedule=1f1b needs at least parallel\.pp\.size=4 micro-batches per step, got 2 .*"
        r"parallel\.pp\.schedule=gpipe",
        HETERO,
        m=2,
    )
    assert len(plan(HETERO, m=1, schedule="gpipe")) == 4  # GPipe: any number


def test_rule_null_layers_needs_one_stage():
    bad(r"parallel\.pp\.layers is null .* but parallel\.pp\.size=4: give parallel\.pp\.layers\.vision", None)


def test_rule_missing_and_unknown_modules():
    no_audio = {"vision": [32, 0], "llm": [0, 28]}
    bad(r"parallel\.pp\.layers\.audio is missing: the model has 32 audio layers", no_audio, pp=2)
    talker = {**HETERO, "talker": [1, 0, 0, 0]}
    bad(r"parallel\.pp\.layers\.talker: this model has no talker module; its modules are vision, audio, llm", talker)


def test_rule_schedule_and_virtual_stages():
    bad(r"parallel\.pp\.schedule='zb': use one of gpipe, 1f1b, interleaved_1f1b", HETERO, schedule="zb")
    bad(r"parallel\.pp\.virtual_stages=2 needs parallel\.pp\.schedule=interleaved_1f1b or zbv", HETERO, v=2)
    bad(r"parallel\.pp\.schedule=zbv runs two stages per rank in a V: set parallel\.pp\.virtual_stages=2", HETERO, schedule="zbv")
    bad(r"parallel\.pp\.schedule=zbv needs at least parallel\.pp\.size=4 micro-batches", {k: v + v for k, v in HETERO.items()} | {"llm": [0, 4, 3, 3, 3, 3, 3, 9]}, schedule="zbv", v=2, m=3)
    bad(r"interleaved_1f1b needs parallel\.pp\.virtual_stages >= 2", HETERO, schedule="interleaved_1f1b")
    bad(r"parallel\.pp\.size=0: must be >= 1", HETERO, pp=0)
