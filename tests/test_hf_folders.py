"""HF folders as they ship, end to end: `model=hf model.path=<folder>` trains
from a whole Qwen2.5-Omni folder (thinker + talker + token2wav, written by
save_pretrained) and from a Qwen2.5-VL folder; `mm_to_hf --base` writes a
folder of the base's kind that plain transformers loads in a new process
with no missing/unexpected keys, the talker and token2wav byte-equal to the
base's, the thinker equal to the checkpoint and omnitrain's logits, and the
Omni export still speaks. Bad folders and bases: one line, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import _synth
from conftest import compose_cfg, stage_plan
from omnitrain.config import ConfigError
from omnitrain.convert.__main__ import ConvertError, mm_to_hf
from omnitrain.convert.hf import HFFormatError
from omnitrain.models.family import build_family
from omnitrain.parallel.layout import whole_plan
from omnitrain.train import checkpoint
from test_resume import SMALL as OMNI_SMALL

ASSETS = Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "assets"
VL_SMALL = ["model=qwen25_vl", "model.config.vision_config.depth=4", "model.config.vision_config.fullatt_block_indexes=[1,3]",
            "model.config.text_config.num_hidden_layers=4"]
QWEN2_VL_SMALL = ["model=qwen2_vl", "model.config.vision_config.depth=4", "model.config.text_config.num_hidden_layers=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _ship_processor(folder: Path, asset: str) -> None:
    """The processor files as a downloaded folder has them (the shipped tiny processor's)."""
    for f in (ASSETS / asset).iterdir():
        if f.name != "README.md":
            shutil.copy(f, folder / f.name)


def _tiny_omni(path: Path) -> Path:
    """A whole Qwen2.5-Omni folder: the tiny thinker plus a tiny talker and token2wav
    (their 7B-sized defaults made small: enc_channels[-1] = 3 x enc_channels[1],
    BigVGAN's 6 upsamplings halve 64 channels down to 1), and a speaker file."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    thinker = build_family(compose_cfg(OMNI_SMALL).model).hf_config
    h = thinker.text_config.hidden_size
    talker = dict(embedding_size=h, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    dit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=32, enc_emb_dim=16, enc_dim=16,
               enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16, num_embeds=8448,
               look_ahead_layers=[1], look_backward_layers=[0])
    cfg = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=talker,
                            token2wav_config=dict(dit_config=dit, bigvgan_config=dict(upsample_initial_channel=64)))
    torch.manual_seed(0)
    Qwen2_5OmniForConditionalGeneration(cfg).save_pretrained(path)
    torch.save({"Chelsie": {"bos_token": 151643, "cond": torch.randn(1, 16), "ref_mel": torch.randn(1, 30, 80)}}, path / "spk_dict.pt")
    _ship_processor(path, "qwen25_omni_tiny")
    return path


def _tiny_vl(path: Path, small=VL_SMALL, asset="qwen25_vl_tiny") -> Path:
    from omnitrain.models.family import import_object

    family = build_family(compose_cfg(small).model)
    torch.manual_seed(0)
    import_object(family.hf_class)._from_config(family.hf_config, dtype=torch.float32).save_pretrained(path)
    _ship_processor(path, asset)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"omni": _tiny_omni(root / "omni"), "vl": _tiny_vl(root / "vl")}


def _hf_cfg(folder, out, extra=()):
    return compose_cfg(["model=hf", f"model.path={folder}", *extra], output_dir=out)


TRAIN = ["data.dataset=mllm_demo", "data.max_samples=2", "train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=1",
         "train.save_every=2", "train.keep_last=0", "train.save_optimizer=false", "train.progress=false"]


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """kind -> (run dir, its config) after 2 steps of `python -m omnitrain model=hf
    model.path=<folder>`'s body (pre-launch checks, launch, worker) on demo images; once per kind."""
    from omnitrain.__main__ import run

    done = {}

    def get(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp("run") / kind
            cfg = _hf_cfg(folders[kind], out, TRAIN)
            loss = run(cfg)
            assert loss == loss and (out / "checkpoints" / "step_2").is_dir()
            done[kind] = out, cfg
        return done[kind]

    return get


def test_family_data_and_layout_come_from_the_folder(folders, tmp_path):
    omni = _hf_cfg(folders["omni"], tmp_path)
    vl = _hf_cfg(folders["vl"], tmp_path)
    assert omni.data.dataset == compose_cfg(["data=demo_omni"]).data.dataset
    assert vl.data.dataset == compose_cfg(["data=demo_vl"]).data.dataset  # no audio encoder: the VL demo sets
    assert _hf_cfg(folders["vl"], tmp_path, ["data=demo_omni"]).data.dataset == omni.data.dataset  # data= still wins
    fo, fv = build_family(omni.model), build_family(vl.model)
    assert (type(fo).__name__, fo.depths) == ("Qwen25OmniThinker", {"vision": 4, "audio": 4, "llm": 4})
    assert (type(fv).__name__, fv.depths) == ("Qwen25VL", {"vision": 4, "llm": 4})
    assert fo.hf_config.text_config.hidden_size == 32 and fo.processor == str(folders["omni"])
    # The layout is checked against the folder's depths before any process starts.
    from omnitrain.__main__ import run

    with pytest.raises(ConfigError, match="the model has 4 vision layers"):
        run(_hf_cfg(folders["vl"], tmp_path / "run", ["parallel=vl7b_pp2"]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.path"):
        build_family(compose_cfg(["model=hf"]).model)


def test_thinker_only_and_qwen2_vl_folders_load_from_their_files(folders, tmp_path):
    """A thinker-only folder is read as the whole folder's thinker; a Qwen2-VL folder
    by its family; a pipeline stage reads only its own tensors, no init first."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    thinker = tmp_path / "thinker"
    Qwen2_5OmniForConditionalGeneration.from_pretrained(folders["omni"]).thinker.save_pretrained(thinker)
    with pytest.raises(HFFormatError, match="holds no processor .*model.processor="):
        build_family(_hf_cfg(thinker, tmp_path).model)
    _ship_processor(thinker, "qwen25_omni_tiny")
    whole = build_family(_hf_cfg(folders["omni"], tmp_path).model)
    only = build_family(_hf_cfg(thinker, tmp_path).model)
    a = whole.build(whole_plan(whole.depths), torch.device("cpu"), 1).state_dict()
    b = only.build(whole_plan(only.depths), torch.device("cpu"), 2).state_dict()
    ref = {k[len("thinker."):]: v for k, v in load_file(folders["omni"] / "model.safetensors").items() if k.startswith("thinker.")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model.language_model.layers.3.mlp.up_proj.weight"], ref["model.layers.3.mlp.up_proj.weight"])
    assert whole.last_load["tensors"] == len(ref)  # every tensor of the thinker, read once
    # the last of 2 pipeline stages: only its tensors read, the rest still on meta
    stage = whole.build(stage_plan(llm=(2, 4), head=True), torch.device("cpu"), 1)
    real = {k: v for k, v in stage.state_dict().items() if not v.is_meta}
    assert real and all(k.startswith(("model.language_model.layers.2", "model.language_model.layers.3", "model.language_model.norm", "lm_head")) for k in real)
    assert whole.last_load == {"tensors": len(real), "bytes": sum(v.numel() * v.element_size() for v in real.values())}
    q2 = _tiny_vl(tmp_path / "q2", QWEN2_VL_SMALL, "qwen2_vl_tiny")
    fam = build_family(_hf_cfg(q2, tmp_path).model)
    got = fam.build(whole_plan(fam.depths), torch.device("cpu"), 1).state_dict()
    assert type(fam).__name__ == "Qwen2VL" and torch.equal(got["model.visual.blocks.3.mlp.fc1.weight"], load_file(q2 / "model.safetensors")["visual.blocks.3.mlp.fc1.weight"])


# In a fresh interpreter, nothing of omnitrain imported: plain transformers loads the export.
_CHECK = r"""
import json, sys, torch, transformers
from transformers.modeling_utils import PreTrainedModel
folder, ref_file, arch = sys.argv[1:4]
cls = getattr(transformers, arch)
# Qwen2_5OmniForConditionalGeneration.from_pretrained cannot return loading info (it
# loads speakers into the tuple): ask the base class for it, then load the usual way.
_, info = PreTrainedModel.from_pretrained.__func__(cls, folder, output_loading_info=True)
model = cls.from_pretrained(folder).eval()
ref = torch.load(ref_file)
out = {"info": {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}}
with torch.no_grad():
    trained = model.thinker if hasattr(model, "thinker") else model
    out["diff"] = float((trained(**ref["inputs"], use_cache=False).logits - ref["logits"]).abs().max())
    if hasattr(model, "talker"):
        ids = torch.tensor([[151644, 872, 198, 100, 101, 151645, 198, 151644, 77091, 198]])
        torch.manual_seed(0)
        text, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=3,
                                   talker_max_new_tokens=6, thinker_do_sample=False)
        out["speech"] = [int(text.shape[1]), int(wav.numel()), bool(torch.isfinite(wav).all())]
print(json.dumps(out))
"""


def _inputs(kind, family, mb):
    if kind == "omni":
        return {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
    inputs = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    inputs["mm_token_type_ids"] = family.mm_token_types(mb)
    inputs["second_per_grid_ts"] = mb["video_second_per_grid"]
    return inputs


def _tensors(folder: Path) -> dict:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("kind", ["omni", "vl"])
def test_train_from_folder_and_export_merged_into_it(kind, folders, trained, tmp_path):
    base = folders[kind]
    run, cfg = trained(kind)
    out = mm_to_hf(str(run), str(tmp_path / "export"), base=str(base))
    # Every file but the weights as the base has it (config, processor, speakers).
    others = sorted(p.name for p in base.iterdir() if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json")
    assert others and all((out / n).read_bytes() == (base / n).read_bytes() for n in others), others
    # Thinker tensors are the checkpoint's; the talker's and token2wav's the base's, byte for byte.
    family = build_family(cfg.model)
    model = family.build(whole_plan(family.depths), torch.device("cpu"), 3)
    assert checkpoint.load(checkpoint.latest(run), model=model) == 2
    prefix = "thinker." if kind == "omni" else ""
    got, was = _tensors(out), _tensors(base)
    assert got.keys() == was.keys()
    trained = {prefix + family.to_hf_name(k): v for k, v in model.state_dict().items()}
    rest = [k for k in was if not k.startswith(prefix)]
    assert (len(rest) > 100) == (kind == "omni") and any(k.startswith("token2wav.") for k in rest) == (kind == "omni")
    for k in rest:
        assert got[k].dtype == was[k].dtype and torch.equal(got[k].view(torch.uint8), was[k].view(torch.uint8)), k
    for k, v in got.items():
        if k.startswith(prefix):
            assert torch.equal(v, trained[k]), k
    assert not torch.equal(got[prefix + "lm_head.weight"], was[prefix + "lm_head.weight"])  # it trained
    # omnitrain's logits vs plain transformers on the export, in a new process
    mb = (_synth.micro_batches(1, batch=2)[0] if kind == "omni"
          else _synth.collate([_synth.samples(5, kinds=_synth.KINDS_VL)[i] for i in (0, 1, 4)]))
    inputs = _inputs(kind, family, mb)
    with torch.no_grad():
        logits = model.eval()(**inputs, use_cache=False).logits
    torch.save({"inputs": inputs, "logits": logits}, tmp_path / "ref.pt")
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    p = subprocess.run([sys.executable, "-c", _CHECK, str(out), str(tmp_path / "ref.pt"), arch], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, res
    assert res["diff"] <= 1e-5, res
    if kind == "omni":
        n_text, n_wav, finite = res["speech"]
        assert n_text > 10 and n_wav > 0 and finite, res


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _load_stats(out):
    def on_end(trainer):
        rank = trainer.ctx.rank if trainer.ctx else 0
        (Path(out) / f"load_{rank}.json").write_text(json.dumps(trainer.adapter.last_load))

    return on_end


def test_pipeline_stages_read_their_own_tensors_and_match_single(folders, tmp_path):
    """pp2 from the folder: each rank reads only its stage's tensors (together each
    tensor once), and the run's losses equal the single-process run's."""
    from omnitrain import launch
    from omnitrain.parallel.context import check_layout, world_size_for
    from omnitrain.train.worker import worker

    def train(out, layout):
        cfg = _hf_cfg(folders["vl"], out, ["train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=1", "train.progress=false",
                                           "parallel.timeout_s=60", *layout])
        check_layout(cfg, build_family(cfg.model))
        loader = lambda r, n: _synth.SynthLoader(global_batch_size=2, micro_batch_size=1, dp_rank=r, dp_size=n, kinds=_synth.KINDS_VL)  # noqa: E731
        out.mkdir(parents=True)
        rows = launch.launch(worker, world_size_for(cfg), cfg, loader, _load_stats(out), timeout_s=120)
        return [r["loss"] for r in rows], [json.loads((out / f"load_{i}.json").read_text()) for i in range(world_size_for(cfg))]

    single, (whole,) = train(tmp_path / "single", ["parallel=single"])
    pp2, stages = train(tmp_path / "pp2", ["parallel=vl7b_pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.llm=[2,2]"])
    assert len(single) == len(pp2) == 2 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(single, pp2)), (single, pp2)
    assert sum(s["tensors"] for s in stages) == whole["tensors"] and sum(s["bytes"] for s in stages) == whole["bytes"], (stages, whole)
    assert all(0 < s["bytes"] < whole["bytes"] for s in stages)


def test_bad_folders_and_bases_are_one_line_and_write_nothing(folders, trained, tmp_path, capsys, monkeypatch):
    from omnitrain import launch
    from omnitrain.__main__ import run
    from omnitrain.errors import run_cli

    vl = folders["vl"]
    # An architecture no family reads: the CLI body prints one line naming it and the families.
    llama = tmp_path / "llama"
    shutil.copytree(vl, llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    capsys.readouterr()
    assert run_cli(lambda: run(_hf_cfg(llama, tmp_path / "r0"))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omnitrain: HF folder error: "), lines
    assert "LlamaForCausalLM" in lines[0] and all(f in lines[0] for f in ("qwen25_omni", "qwen25_vl", "qwen2_vl")), lines
    assert not (tmp_path / "r0").exists()
    # A tensor missing, or of another shape than the folder's own config: refused before launch.
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("launched a bad folder"))
    gone = _rewrite(vl, tmp_path / "gone", lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(HFFormatError, match=r"1 missing: model\.layers\.3\.mlp\.up_proj\.weight"):
        run(_hf_cfg(gone, tmp_path / "r1", TRAIN))
    wide = _rewrite(vl, tmp_path / "wide", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(130, 64)}))
    with pytest.raises(HFFormatError, match=r"1 shape mismatches: model\.layers\.0\.mlp\.up_proj\.weight \(130, 64\) vs config \(128, 64\)"):
        run(_hf_cfg(wide, tmp_path / "r2", TRAIN))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    monkeypatch.undo()
    # A base that is not what the checkpoint was trained from: one line, nothing written.
    run_dir, _ = trained("vl")
    with pytest.raises(ConvertError, match=r"--base .*omni holds a 'qwen2_5_omni' model \(Qwen2_5OmniForConditionalGeneration\)"):
        mm_to_hf(str(run_dir), str(tmp_path / "o1"), base=str(folders["omni"]))
    with pytest.raises(ConvertError, match=r"shapes model\.layers\.0\.mlp\.up_proj\.weight \(130, 64\) in the base"):
        mm_to_hf(str(run_dir), str(tmp_path / "o2"), base=str(wide))
    with pytest.raises(ConvertError, match=r"missing in the base model\.layers\.3\.mlp\.up_proj\.weight"):
        mm_to_hf(str(run_dir), str(tmp_path / "o3"), base=str(gone))
    assert not any((tmp_path / n).exists() for n in ("o1", "o1.tmp", "o2", "o2.tmp", "o3", "o3.tmp"))
