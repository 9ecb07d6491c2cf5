"""HF import/export: a tiny HF thinker -> hf_to_mm -> train -> mm_to_hf ->
from_pretrained gives omnitrain's logits; model.init_from reads only a
stage's tensors; bad inputs fail clearly and write nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra.utils import instantiate

import _synth
from conftest import compose_cfg, stage_plan
from omnitrain import launch
from omnitrain.config import ConfigError
from omnitrain.convert import hf
from omnitrain.convert.__main__ import ConvertError, hf_to_mm, main, mm_to_hf, resplit
from omnitrain.parallel.layout import whole_plan
from omnitrain.train import checkpoint
from omnitrain.train.worker import worker
from test_resume import SMALL, _cfg, _loader

LOGITS_ABS = 1e-5


def _adapter(extra=()):
    return instantiate(compose_cfg([*SMALL, *extra]).model, _convert_="all")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random thinker written by transformers itself."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    torch.manual_seed(0)
    model = Thinker._from_config(_adapter().hf_config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("hf") / "thinker"
    model.save_pretrained(path)
    return path


def test_round_trip_hf_train_export_same_logits(tmp_path, hf_dir):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    mm = hf_to_mm(str(hf_dir), str(tmp_path / "mm"))
    run = tmp_path / "run"
    cfg = _cfg(run, ["parallel=single", "train.save_every=2", f"train.resume={mm}"], steps=2)
    trained = []
    rows = launch.launch(worker, 1, cfg, _loader, trained.append)
    assert [r["step"] for r in rows] == [1, 2]
    out = mm_to_hf(str(run), str(tmp_path / "export"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # readable by group and others

    exported, info = Thinker.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = trained[0].model.eval()
    exported.eval()
    mb = _synth.micro_batches(1, batch=2)[0]
    mb = {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
    with torch.no_grad():
        a = ours(**mb).logits
        b = exported(**mb).logits
    diff = float((a - b).abs().max())
    assert diff <= LOGITS_ABS, diff
    # and training changed the weights away from the imported ones
    start = Thinker.from_pretrained(hf_dir)
    assert not torch.equal(start.lm_head.weight, exported.lm_head.weight)


def test_init_from_equals_imported_checkpoint_and_reads_only_owned(tmp_path, hf_dir):
    whole = _adapter([f"model.init_from={hf_dir}"]).build(whole_plan(_adapter().depths), torch.device("cpu"), 1)
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    ref = Thinker.from_pretrained(hf_dir).state_dict()
    got = whole.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # A pipeline stage holding only the LLM tail: its tensors loaded, the rest stays on meta.
    seg = stage_plan(llm=(2, 4), head=True)
    stage = _adapter([f"model.init_from={hf_dir}"]).build(seg, torch.device("cpu"), 1)
    real = {k for k, v in stage.state_dict().items() if not v.is_meta}
    assert real and all(k.startswith(("model.language_model.layers.2", "model.language_model.layers.3", "model.language_model.norm", "lm_head")) for k in real)
    assert all(torch.equal(stage.state_dict()[k], ref[k]) for k in real)


def test_full_omni_folder_with_thinker_prefix(tmp_path, hf_dir):
    full = tmp_path / "full"
    full.mkdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    tensors = {f"thinker.{k}": v for k, v in tensors.items()} | {"talker.x": torch.zeros(1)}
    save_file(tensors, full / "model.safetensors")
    (full / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": json.loads((hf_dir / "config.json").read_text())}))
    model = _adapter([f"model.init_from={full}"]).build(stage_plan(llm=(0, 1), merge=True), torch.device("cpu"), 1)
    w = model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, tensors["thinker.model.layers.0.mlp.up_proj.weight"])


def test_wrong_architecture_and_wrong_depths_fail_clearly(tmp_path, hf_dir):
    bad = tmp_path / "llama"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(hf.HFFormatError, match="'llama' model .*LlamaForCausalLM.*: no omnitrain family reads it; the families are qwen25_omni .*qwen2_5_omni_thinker"):
        hf_to_mm(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    with pytest.raises(hf.HFFormatError, match="llama"):
        _adapter([f"model.init_from={bad}"]).build(stage_plan(head=True), torch.device("cpu"), 1)
    # A model with one LLM layer fewer than the folder: unexpected keys listed.
    with pytest.raises(hf.HFFormatError, match=r"unexpected: model\.layers\.3\."):
        _adapter([f"model.init_from={hf_dir}", "model.config.text_config.num_hidden_layers=3"]).build(
            stage_plan(head=True), torch.device("cpu"), 1
        )
    # ...and one more: missing keys listed.
    with pytest.raises(hf.HFFormatError, match=r"missing: model\.layers\.4\."):
        _adapter([f"model.init_from={hf_dir}", "model.config.text_config.num_hidden_layers=5"]).build(
            stage_plan(head=True), torch.device("cpu"), 1
        )


def test_bad_checkpoints_and_layouts_write_nothing(tmp_path, hf_dir):
    mm = hf_to_mm(str(hf_dir), str(tmp_path / "mm"))
    # an existing output is never overwritten
    keep = tmp_path / "taken"
    keep.mkdir()
    (keep / "x").write_text("mine")
    assert main(["mm_to_hf", str(mm), str(keep)]) == 2
    assert (keep / "x").read_text() == "mine" and len(list(keep.iterdir())) == 1
    # missing shard
    broken = tmp_path / "broken"
    shutil.copytree(mm, broken)
    next(broken.glob("*.distcp")).unlink()
    with pytest.raises(ConvertError, match=r"incomplete: __0_0\.distcp missing"):
        mm_to_hf(str(broken), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    # a layout whose layer split does not add up to the checkpoint's depths
    with pytest.raises(ConfigError):
        resplit(str(mm), str(tmp_path / "re"), [*SMALL, "parallel=pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.audio=[4,0]", "parallel.pp.layers.llm=[28,0]"])
    assert not (tmp_path / "re").exists() and not (tmp_path / "re.tmp").exists()
    # a model deeper than the checkpoint: resume refuses before touching anything
    from omnitrain.train.loop import Trainer

    cfg = _cfg(tmp_path / "deeper", ["parallel=single", "model.config.text_config.num_hidden_layers=5"])
    from omnitrain.models.family import build_family

    trainer = Trainer(cfg, build_family(cfg.model))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load(mm, model=trainer.model, optimizer=trainer.optimizer)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_resplit_writes_the_target_layouts_files(tmp_path, hf_dir):
    mm = hf_to_mm(str(hf_dir), str(tmp_path / "mm"))
    pp2 = ["parallel=pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.audio=[4,0]", "parallel.pp.layers.llm=[2,2]", "parallel.timeout_s=60"]
    out = resplit(str(mm), str(tmp_path / "pp2"), [*SMALL, *pp2])
    step = checkpoint.latest(out)
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # every tensor made it, unchanged
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    ref = Thinker.from_pretrained(hf_dir)
    model = _adapter().build(whole_plan(_adapter().depths), torch.device("cpu"), 7)
    checkpoint.load(step, model=model)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
