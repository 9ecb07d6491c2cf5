"""HF in/out for the vision-language families (Qwen2.5-VL, Qwen2-VL, and
Qwen2.5-VL with a tied lm_head as the 3B has): a tiny random HF model written
by `save_pretrained` loads through model.init_from with equal tensors, and
hf_to_mm -> 2 training steps -> mm_to_hf gives a folder that plain
transformers loads in a new process with no missing/unexpected/mismatched
keys and omnitrain's logits; resplit re-saves a VL checkpoint as vl7b_pp2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import _synth
from conftest import compose_cfg
from omnitrain import launch
from omnitrain.config import ConfigError
from omnitrain.convert.__main__ import ConvertError, hf_to_mm, mm_to_hf, resplit
from omnitrain.models.family import build_family, import_object
from omnitrain.parallel.context import check_layout, world_size_for
from omnitrain.parallel.layout import whole_plan
from omnitrain.train import checkpoint
from omnitrain.train.worker import worker

LOGITS_ABS = 1e-5
# The shipped tiny models at 4 vision blocks / 4 LLM layers (the real tiny
# depths are 32 / 28): the same code paths at a fraction of the time.
SMALL = {
    "qwen25_vl": ["model=qwen25_vl", "model.config.vision_config.depth=4", "model.config.vision_config.fullatt_block_indexes=[1,3]",
                  "model.config.text_config.num_hidden_layers=4"],
    "qwen2_vl": ["model=qwen2_vl", "model.config.vision_config.depth=4", "model.config.text_config.num_hidden_layers=4"],
}
SMALL["qwen25_vl_tied"] = [*SMALL["qwen25_vl"], "model.config.tie_word_embeddings=true"]
# vl7b_pp2 (vision + 12 LLM layers | 16 LLM layers) at the small depths.
PP2 = ["parallel=vl7b_pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.llm=[2,2]", "parallel.timeout_s=60"]
STEPS, GLOBAL = 2, 2


def _family(variant, extra=()):
    return build_family(compose_cfg([*SMALL[variant], *extra]).model)


def _loader(dp_rank, dp_size):
    return _synth.SynthLoader(global_batch_size=GLOBAL, micro_batch_size=1, dp_rank=dp_rank, dp_size=dp_size, kinds=_synth.KINDS_VL)


def _train(out, overrides, steps=STEPS, on_end=None):
    """The real launch and training loop on synthetic VL micro-batches; {step: loss}."""
    cfg = compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=1", "train.keep_last=0",
         "train.progress=false", "parallel.timeout_s=60", *overrides],
        output_dir=out,
    )
    check_layout(cfg)
    rows = launch.launch(worker, world_size_for(cfg), cfg, _loader, on_end, timeout_s=120)
    return {r["step"]: r["loss"] for r in rows}


def _ties_in_build(family) -> bool:
    """Whether family.build keeps a tied lm_head the embedding's tensor."""
    m = family.build(whole_plan(family.depths), torch.device("cpu"), 1)
    return m.lm_head.weight is m.get_input_embeddings().weight


def _check_tied_build(variant, family):
    if variant.endswith("_tied"):
        assert _ties_in_build(family), "family.build untied lm_head from embed_tokens"


@pytest.fixture(scope="module", params=sorted(SMALL))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def hf_dir(variant, tmp_path_factory):
    """A tiny random model of the family's HF config, written by transformers itself."""
    family = _family(variant)
    torch.manual_seed(0)
    model = import_object(family.hf_class)._from_config(family.hf_config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("hf") / variant
    model.save_pretrained(path)
    return path, model.state_dict()


def test_init_from_loads_the_folder(variant, hf_dir):
    path, ref = hf_dir
    family = _family(variant, [f"model.init_from={path}"])
    if variant.endswith("_tied"):
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()  # save_pretrained writes a tied head once, as embed_tokens
    _check_tied_build(variant, family)
    got = family.build(whole_plan(family.depths), torch.device("cpu"), 1).state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def trained(variant, hf_dir, tmp_path_factory):
    """hf_to_mm, then 2 steps of the real training loop from it (checkpoint at step 2)."""
    path, _ = hf_dir
    root = tmp_path_factory.mktemp("run")
    mm = hf_to_mm(str(path), str(root / "mm"))
    _check_tied_build(variant, _family(variant))
    run = root / "run"
    trainers = []
    losses = _train(run, [*SMALL[variant], "parallel=single", "train.save_every=2", f"train.resume={mm}"], on_end=trainers.append)
    assert sorted(losses) == [1, 2]
    return run, trainers[0]


# The reference check, in a fresh interpreter: nothing of omnitrain imported or patched.
_CHECK = r"""
import json, sys, torch, transformers
folder, ref_file, cls = sys.argv[1:4]
model, info = getattr(transformers, cls).from_pretrained(folder, output_loading_info=True)
proc = transformers.AutoProcessor.from_pretrained(folder)
ref = torch.load(ref_file)
with torch.no_grad():
    logits = model.eval()(**ref["inputs"], use_cache=False).logits
print(json.dumps({
    "info": {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
    "diff": float((logits - ref["logits"]).abs().max()),
    "processor": type(proc).__name__,
    "padding_side": proc.tokenizer.padding_side,
    "tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
}))
"""


def test_round_trip_hf_train_export_same_logits_in_new_process(variant, hf_dir, trained, tmp_path):
    run, trainer = trained
    family = trainer.adapter
    out = mm_to_hf(str(run), str(tmp_path / "export"))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files, files
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not variant.endswith("_tied"))
    # omnitrain's trained model on a padded micro-batch with images, videos
    # (two timings) and a text-only sample.
    ss = _synth.samples(5, kinds=_synth.KINDS_VL)
    mb = _synth.collate([ss[0], ss[1], ss[2], ss[4]])
    inputs = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    inputs["mm_token_type_ids"] = family.mm_token_types(mb)
    if "Qwen2_5" in family.hf_class:
        inputs["second_per_grid_ts"] = mb["video_second_per_grid"]
    ours = trainer.model.eval()
    with torch.no_grad():
        logits = ours(**inputs, use_cache=False).logits
    ref_file = tmp_path / "ref.pt"
    torch.save({"inputs": inputs, "logits": logits}, ref_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", _CHECK, str(out), str(ref_file), family.hf_architecture], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, got
    assert got["diff"] <= LOGITS_ABS, got
    want_proc = {"Qwen2VLForConditionalGeneration": ("Qwen2VLProcessor", "left")}.get(family.hf_architecture, ("Qwen2_5_VLProcessor", "right"))
    assert (got["processor"], got["padding_side"]) == want_proc  # the shipped processor, as upstream
    assert got["tied"] == variant.endswith("_tied")
    # training moved the weights away from the imported ones
    _, start = hf_dir
    assert not torch.equal(start["model.language_model.embed_tokens.weight"], ours.state_dict()["model.language_model.embed_tokens.weight"])


def test_resplit_to_vl7b_pp2(variant, hf_dir, trained, tmp_path):
    run, _ = trained
    src = checkpoint.latest(run)
    if variant.endswith("_tied"):
        # A tied head cannot sit on another stage than its embedding: refused, nothing written.
        with pytest.raises(ConfigError, match="tie_word_embeddings"):
            resplit(str(src), str(tmp_path / "pp2"), [*SMALL[variant], *PP2])
        assert not (tmp_path / "pp2").exists() and not (tmp_path / "pp2.tmp").exists()
        return
    out = resplit(str(src), str(tmp_path / "pp2"), [*SMALL[variant], *PP2])
    step = checkpoint.latest(out)
    assert step.name == src.name
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # every model tensor made it, unchanged
    family = _family(variant)
    a = family.build(whole_plan(family.depths), torch.device("cpu"), 7)
    b = family.build(whole_plan(family.depths), torch.device("cpu"), 8)
    assert checkpoint.load(src, model=a) == checkpoint.load(step, model=b) == STEPS
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and it resumes under vl7b_pp2 (optimizer and data position carried) as the source does under single
    single = _train(tmp_path / "single", [*SMALL[variant], "parallel=single", f"train.resume={src}"], steps=STEPS + 1)
    pp2 = _train(tmp_path / "pp2_run", [*SMALL[variant], *PP2, f"train.resume={step}"], steps=STEPS + 1)
    assert sorted(single) == sorted(pp2) == [STEPS + 1]
    assert abs(pp2[STEPS + 1] - single[STEPS + 1]) <= 1e-6 * abs(single[STEPS + 1]), (single, pp2)


def test_export_of_an_untied_trained_tied_checkpoint_is_refused(tmp_path):
    """A checkpoint whose lm_head differs from embed_tokens under a tied config
    must not be exported as if tied (the exported model would silently differ)."""
    import torch.distributed.checkpoint as dcp

    family = _family("qwen25_vl_tied")
    model = family.build_meta()
    model.to_empty(device="cpu")
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}  # lm_head != embed_tokens
    step = tmp_path / "ckpt" / "step_1"
    with checkpoint._single_process_ok():
        dcp.save({"model": state, "step": 1}, checkpoint_id=str(step))
    (step / "config.json").write_text(json.dumps(family.hf_config.to_dict()))
    (step / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    with pytest.raises(ConvertError, match="lm_head.weight differs from model.language_model.embed_tokens.weight"):
        mm_to_hf(str(step), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
