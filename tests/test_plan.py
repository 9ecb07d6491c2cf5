"""The published 7B/3B thinker configs build on the meta device with the
published parameter counts, and the planner's counting is right."""

import pytest
import torch
from torch import nn

from omnitrain import plan


def close(actual, expected, rel=0.01):
    return abs(actual - expected) <= rel * expected


@pytest.fixture(scope="module")
def omni7b():
    cfg = plan.compose(["model=qwen25_omni_7b"])
    return plan.build_meta(cfg.model)  # (family, model)


def test_7b_counts(omni7b):
    assert all(p.is_meta for p in omni7b[1].parameters())  # shapes only, no memory
    c = plan.count_params(*omni7b)
    llm = c["llm_embed"] + c["llm_layers"] + c["llm_norm"]
    assert close(c["total"], 8.93e9)
    assert close(llm, 7.07e9)
    assert close(c["lm_head"], 0.545e9)
    assert close(c["vision"], 0.677e9)
    assert close(c["audio"], 0.640e9)
    assert c["other"] == 0
    # The thinker's total_parameters in the published safetensors index.
    assert c["total"] == 8_931_813_888


def test_7b_layers(omni7b):
    layers = plan.layer_params(*omni7b)
    assert [len(layers[m]) for m in ("vision", "audio", "llm")] == [32, 32, 28]
    assert len(set(layers["llm"])) == 1  # identical decoder layers
    assert sum(layers["llm"]) == plan.count_params(*omni7b)["llm_layers"]


@pytest.mark.parametrize("tied,expected", [(False, 4.70e9), (True, 4.39e9)])
def test_3b_counts(tied, expected):
    cfg = plan.compose(["model=qwen25_omni_3b", f"model.config.tie_word_embeddings={str(tied).lower()}"])
    adapter, model = plan.build_meta(cfg.model)
    assert adapter.depths == {"vision": 32, "audio": 32, "llm": 36}
    c = plan.count_params(adapter, model)
    assert close(c["total"], expected)
    assert (c["lm_head"] == 0) == tied  # a tied head is counted once, under llm_embed
    assert close(c["vision"], 0.669e9) and close(c["audio"], 0.638e9)


def test_stage_params_hetero_layout(omni7b):
    from omnitrain.parallel.layout import validate_layout

    plans = validate_layout(
        4,
        {"vision": [32, 0, 0, 0], "audio": [0, 32, 0, 0], "llm": [0, 7, 12, 9]},
        {"vision": 32, "audio": 32, "llm": 28},
        num_microbatches=8,
        schedule="1f1b",
    )
    sizes = plan.stage_params(*omni7b, plans)
    c = plan.count_params(*omni7b)
    per_llm = plan.layer_params(*omni7b)["llm"][0]
    assert sum(sizes) == c["total"]  # untied: every parameter on exactly one stage
    assert sizes[0] == c["vision"]
    assert sizes[1] == c["audio"] + c["llm_embed"] + 7 * per_llm
    assert sizes[2] == 12 * per_llm
    assert sizes[3] == 9 * per_llm + c["llm_norm"] + c["lm_head"]


def test_count_params_groups_by_prefix():
    # A stand-in with the thinker's module paths, to test the grouping alone.
    m = nn.Module()
    m.model = nn.Module()
    m.model.visual = nn.Linear(2, 3)  # 9
    m.model.audio_tower = nn.Linear(3, 3)  # 12
    m.model.language_model = nn.Module()
    m.model.language_model.embed_tokens = nn.Embedding(10, 4)  # 40
    m.model.language_model.layers = nn.ModuleList([nn.Linear(4, 4, bias=False)])  # 16
    m.model.language_model.norm = nn.LayerNorm(4, bias=False)  # 4
    m.lm_head = nn.Linear(4, 10, bias=False)
    m.lm_head.weight = m.model.language_model.embed_tokens.weight  # tied: counted once
    m.extra = nn.Parameter(torch.zeros(5))
    c = plan.count_params(plan.build_meta(plan.compose([]).model)[0], m)
    assert c == {
        "vision": 9,
        "audio": 12,
        "llm_embed": 40,
        "llm_layers": 16,
        "llm_norm": 4,
        "lm_head": 0,
        "other": 5,
        "total": 86,
    }


def test_cli_prints_table(capsys):
    assert plan.main(["model=qwen25_omni_7b"]) == 0
    out = capsys.readouterr().out
    assert "8,931,813,888" in out
    for word in ("vision", "audio", "llm_embed", "llm_layers", "lm_head", "total", "stage"):
        assert word in out


def test_calibrate_fits_every_layer_type_and_the_plan_says_so(monkeypatch):
    """plan.calibrate=true runs real micro-batches of the data config through the
    built model (reduced depths: the fit is per layer type) and the plan prints
    per-stage times from that fit, not from the roofline."""
    over = ["model=qwen25_vl", "model.config.vision_config.depth=4", "model.config.vision_config.fullatt_block_indexes=[1,3]",
            "model.config.text_config.num_hidden_layers=3", "parallel=single", "train.global_batch_size=1",
            "data.max_samples=4", "plan.calibrate=true"]
    cfg = plan.compose(over)
    from omnitrain.models.family import build_family
    from omnitrain.plan.calibrate import calibrate
    from omnitrain.plan.layout import segments_for

    fit = calibrate(cfg, build_family(cfg.model))
    types = {s.type for s in segments_for(cfg)}
    assert set(fit.fwd) == set(fit.bwd) == types and len(types) >= 3  # window and full ViT blocks, LLM layer, ...
    assert all(c >= 0 and a >= 0 for d in (fit.fwd, fit.bwd) for c, a in d.values())
    assert set(fit.call_fwd) == {"vision", "llm"}
    assert "fit error" in fit.where
    monkeypatch.setattr("omnitrain.plan.calibrate.calibrate", lambda cfg, family: fit)  # the plan's own call: not twice
    text = plan.report(cfg)
    assert fit.describe() in text and "roofline" not in text
