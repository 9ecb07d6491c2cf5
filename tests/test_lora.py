"""LoRA through PEFT (models/lora.py): only adapters (and what model.trainable
names) train, the adapters' init does not depend on the layout, a fused-qkv
target under TP is refused (layouts: tests/test_finetune_smoke.py), and a LoRA checkpoint exports
merged (from_pretrained) or as a PEFT adapter folder (PeftModel.from_pretrained),
both with the trained model's logits."""

from __future__ import annotations

import pytest
import torch

import _synth
from conftest import compose_cfg, stage_plan
from omnitrain import launch
from omnitrain.config import ConfigError, check_finetune
from omnitrain.models.family import build_family
from omnitrain.parallel.context import check_layout
from omnitrain.parallel.layout import whole_plan
from omnitrain.train.worker import worker
from test_resume import SMALL, _cfg, _loader, _run

LORA = ["model.lora.llm.enabled=true", "model.lora.llm.target_modules=[q_proj,v_proj]", "model.lora.llm.r=4",
        "model.lora.vision.enabled=true", "model.lora.vision.alpha=8",
        # the vision merger trains next to the adapters; audio is frozen whole
        "model.trainable.vision={train:false,except:[merger]}", "model.trainable.audio=false"]


def _family(*extra):
    return build_family(compose_cfg([*SMALL, *LORA, *extra]).model)


def test_lora_trains_only_adapters_and_named_params(tmp_path):
    from omnitrain.train.loop import Trainer

    cfg = _cfg(tmp_path, [*LORA, "optim.scheduler.warmup_steps=0"], steps=1)
    t = Trainer(cfg, build_family(cfg.model))
    t.loader = _synth.SynthLoader(global_batch_size=2, micro_batch_size=1)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    lora = {n for n in before if ".lora_" in n}
    assert lora and {n for n in lora if n.startswith("model.language_model.")} and {n for n in lora if n.startswith("model.visual.")}
    assert all(".q_proj." in n or ".v_proj." in n for n in lora if n.startswith("model.language_model."))
    assert trained == lora | {n for n in before if n.startswith("model.visual.merger.")}
    assert all(float(before[n].abs().max()) == 0 for n in lora if ".lora_B." in n)  # B = 0 as PEFT does
    it = iter(t.loader)
    t.train_step([next(it) for _ in range(t.num_microbatches)])
    after = dict(t.model.named_parameters())
    for n, p in after.items():
        assert (p in t.optimizer.state) == (n in trained), n
        if n not in trained:
            assert torch.equal(before[n], p.detach()) and p.grad is None, n
        elif ".lora_A." not in n:  # A's first gradient is 0 (B = 0)
            assert not torch.equal(before[n], p.detach()), n
    # r and alpha per module: the LLM's r=4, vision's scale alpha / r = 8 / 8
    q = t.model.model.language_model.layers[0].self_attn.q_proj
    assert q.r["default"] == 4 and q.scaling["default"] == 16 / 4
    assert t.model.model.visual.blocks[0].attn.q.scaling["default"] == 1.0


def test_lora_init_is_the_same_on_any_stage():
    fam = _family()
    whole = {n: p for n, p in fam.build(whole_plan(fam.depths), torch.device("cpu"), 7).named_parameters() if ".lora_A." in n}
    stage = fam.build(stage_plan(llm=(2, 4), head=True), torch.device("cpu"), 7)
    local = {n: p for n, p in stage.named_parameters() if ".lora_A." in n and not p.is_meta}
    assert local and all(n.startswith("model.language_model.layers.") for n in local)
    assert all(torch.equal(p, whole[n]) for n, p in local.items())


def test_lora_config_errors():
    bad = compose_cfg([*SMALL, *LORA, "model.lora.llm.target_modules=[qproj]"])
    with pytest.raises(ConfigError, match=r"model.lora.llm.target_modules=\['qproj'\]: no Linear of that name"):
        check_finetune(bad, build_family(bad.model))  # before any process starts, on meta
    with pytest.raises(Exception, match=r"model.lora.audio: unknown module; model qwen2_vl has vision, llm"):  # (through Hydra's instantiate)
        build_family(compose_cfg(["model=qwen2_vl", "model.lora.audio.enabled=true"]).model)
    check_layout(compose_cfg([*LORA, "parallel=tp2"]))  # LoRA splits over colwise / rowwise shards (parallel/tp.py)
    with pytest.raises(ConfigError, match=r"model.lora.llm.enabled=true with parallel.sequence_parallel=true: LoRA is not composed"):
        check_layout(compose_cfg([*LORA, "parallel=tp2", "parallel.sequence_parallel=true"]))
    cfg = compose_cfg(["model=qwen2_vl", "model.lora.vision.enabled=true", "model.lora.vision.target_modules=[qkv,proj]", "parallel=tp2"])
    with pytest.raises(ConfigError, match=r"model.lora.vision.target_modules=\['qkv', 'proj'\] adapts model.visual.blocks.\*.attn.qkv, a fused q\|k\|v layer, under parallel.tp.vision=2"):
        check_layout(cfg)


def test_lora_resume_equals_a_straight_run(tmp_path):
    """A LoRA checkpoint (adapters, the trained merger, their optimizer state;
    the frozen base from the seed) resumes bit for bit: 2 steps + resume to 3
    equals 3 steps straight."""
    over = ["parallel=single", "optim.scheduler.warmup_steps=0", *LORA]
    ref_losses, ref_params = _run(tmp_path / "straight", [*over, "train.save_every=2"], steps=3)
    assert (tmp_path / "straight" / "checkpoints" / "step_2").is_dir()
    losses, params = _run(tmp_path / "resumed", [*over, f"train.resume={tmp_path}/straight/checkpoints/step_2"], steps=3)
    assert losses == {3: ref_losses[3]} and ref_losses[3] != ref_losses[2]
    assert params.keys() == ref_params.keys() and any(".lora_B." in k for k in params)
    assert all(torch.equal(params[k], ref_params[k]) for k in params)


# Parity with LoRA on (pp4_hetero and fsdp4 vs single, every family, adapters
# and trained parameters at 1e-5) is in tests/test_finetune_smoke.py.


# ---- export ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    torch.manual_seed(0)
    model = Thinker._from_config(_family().hf_config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("hf") / "base"
    model.save_pretrained(path)
    return path


def test_lora_export_merged_and_adapter_folder_give_the_trained_logits(tmp_path, hf_base):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    from omnitrain.convert.__main__ import ConvertError, mm_to_hf

    # vision merger trained too: only the merged export can carry it
    only_lora = [o for o in LORA if not o.startswith("model.trainable.vision")] + ["model.trainable.vision=false"]
    run = tmp_path / "run"
    cfg = _cfg(run, ["parallel=single", "train.save_every=2", f"model.init_from={hf_base}", "optim.scheduler.warmup_steps=0", *only_lora], steps=2)
    trained = []
    launch.launch(worker, 1, cfg, _loader, trained.append)
    ours = trained[0].model.eval()
    assert any(float(p.detach().abs().max()) > 0 for n, p in ours.named_parameters() if ".lora_B." in n)  # the adapters moved

    from omnitrain.convert.__main__ import _saved_model_tensors
    from omnitrain.train import checkpoint

    saved = _saved_model_tensors(checkpoint.latest(run))
    assert saved and all(".lora_" in k for k in saved)  # the checkpoint holds what trains, not the frozen base

    mb = _synth.micro_batches(1, batch=2)[0]
    mb = {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
    with torch.no_grad():
        want = ours(**mb).logits

    merged = mm_to_hf(str(run), str(tmp_path / "merged"), merge_lora=True)
    model, info = Thinker.from_pretrained(merged, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        got = model.eval()(**mb).logits
    assert float((got - want).abs().max()) <= 1e-5

    folder = mm_to_hf(str(run), str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    peft_model = PeftModel.from_pretrained(Thinker.from_pretrained(hf_base), str(folder)).eval()
    with torch.no_grad():
        got = peft_model(**mb).logits
    assert float((got - want).abs().max()) <= 1e-5
    from omnitrain.convert.__main__ import hf_to_mm

    plain = hf_to_mm(str(hf_base), str(tmp_path / "mm"))
    with pytest.raises(ConvertError, match="holds no LoRA adapters"):
        mm_to_hf(str(plain), str(tmp_path / "x"), merge_lora=True)
