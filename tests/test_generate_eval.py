"""generate and eval end to end on a tiny Qwen2.5-VL folder written by
transformers' save_pretrained:

- the prompt equals the HF processor's chat template with
  add_generation_prompt, and the tokens equal transformers' own greedy
  `generate` on the folder (image and text-only prompts), also when the model
  comes from a DCP checkpoint of the folder;
- `--data` on a LLaMA-Factory json writes one prediction per sample, batched
  (left-padded) the same as one at a time;
- eval on the fixture TSVs gives the scores computed by hand from its
  per-item predictions, and a dp2 run gives the single run's files;
- bad input is one line and exit code 2.

The model's lm_head keeps only a few rows (letters, digits, '%', space,
<|im_end|>): predictions are short strings that depend on the image and the
prompt, so some items score and the scores are not all 0.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg

FIX = Path(__file__).resolve().parent / "data_fixtures" / "vlmeval"
DEMO = Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "assets" / "demo_data"
IMAGE = str(DEMO / "mllm_demo_data" / "1.jpg")
KEEP = [0, 4, 15, 20, 32, 33, 34, 35, 220, 151645]  # ! % 0 5 A B C D space <|im_end|>
SMALL = ["model=qwen25_vl", "model.config.vision_config.depth=2", "model.config.vision_config.fullatt_block_indexes=[1]",
         "model.config.text_config.num_hidden_layers=2"]
BENCHES = [f"--bench={b}={FIX / b}.tsv" for b in ("ai2d", "mmmu", "chartqa", "docvqa")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from omnitrain.data import load_processor
    from omnitrain.models.family import build_family, import_object

    family = build_family(compose_cfg(SMALL).model)
    torch.manual_seed(0)
    model = import_object(family.hf_class)._from_config(family.hf_config, dtype=torch.float32)
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[KEEP] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= 50  # clear winners among the kept tokens
    out = tmp_path_factory.mktemp("gen") / "vl"
    model.save_pretrained(out)
    load_processor("builtin:qwen25_vl_tiny").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    from omnitrain.generate import load

    return load(str(folder))


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _reference(reference, text, images=(), n=6):
    """transformers alone: its processor's chat template, its greedy generate."""
    from PIL import Image

    model, proc = reference
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    chat = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    kw = {"images": [Image.open(p).convert("RGB") for p in images]} if images else {}
    # the data pipeline's default pixel bounds (data.image_min_pixels / image_max_pixels)
    inputs = proc(text=[chat], return_tensors="pt", images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 12544}}, **kw)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=n, eos_token_id=[151645, 151643], pad_token_id=151643)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1] :].tolist()


def test_generate_equals_transformers_greedy(folder, loaded, reference, tmp_path, capsys):
    from omnitrain.convert.__main__ import hf_to_mm
    from omnitrain.generate import GenOptions, generate_batch, load, prompt_example
    from omnitrain.generate.__main__ import main

    want_image = None
    for text, images in (("What is in the picture?", [IMAGE]), ("Say something.", [])):
        want_prompt, want = _reference(reference, text, images)
        want_image = want_image or want
        ex = prompt_example(text, images)
        assert loaded.builder.prompt(ex)["input_ids"].tolist() == want_prompt
        got = generate_batch(loaded, [ex], GenOptions(max_new_tokens=6))[0]
        assert got["tokens"] == want and len(want) >= 2
    # the CLI prints the same text; a DCP checkpoint of the folder gives the same tokens
    assert main([str(folder), "--prompt", "What is in the picture?", "--image", IMAGE, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    ckpt = hf_to_mm(str(folder), str(tmp_path / "ckpt"))
    from_ckpt = load(str(ckpt), processor=str(folder))
    ex = prompt_example("What is in the picture?", [IMAGE])
    again = generate_batch(from_ckpt, [ex], GenOptions(max_new_tokens=6))[0]
    assert again["tokens"] == want_image
    assert printed == again["text"]
    # ... and so does that checkpoint re-saved by a 2-stage pipeline (2 ranks, each its own tensors)
    from omnitrain.convert.__main__ import resplit

    pp2 = ["parallel=vl7b_pp2", "parallel.pp.layers.vision=[2,0]", "parallel.pp.layers.llm=[1,1]", "parallel.timeout_s=60"]
    run = resplit(str(ckpt), str(tmp_path / "pp2"), [*SMALL, *pp2])
    assert len(list(run.glob("checkpoints/step_0/*.distcp"))) == 2
    from_pp2 = load(str(run))  # the run's config.yaml names the model and its processor
    assert generate_batch(from_pp2, [ex], GenOptions(max_new_tokens=6))[0]["tokens"] == want_image
    # sampling: reproducible from the seed, and not the greedy answer for every seed
    opts = [GenOptions(max_new_tokens=6, do_sample=True, temperature=5.0, seed=s) for s in (1, 1, 2, 3)]
    draws = [generate_batch(loaded, [ex], o)[0]["tokens"] for o in opts]
    assert draws[0] == draws[1] and any(d != again["tokens"] for d in draws)


def test_generate_data_file_batched_equals_one_by_one(folder, loaded, tmp_path):
    from omnitrain.generate import GenOptions, generate_batch
    from omnitrain.generate.__main__ import data_examples, main

    out = tmp_path / "pred.jsonl"
    argv = [str(folder), "--data", str(DEMO / "mllm_demo.json"), "--max-samples", "3", "--batch-size", "3", "--max-new-tokens", "5", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    examples, labels = data_examples(str(DEMO / "mllm_demo.json"), 3)
    assert [r["label"] for r in rows] == labels and labels[0] == "They are celebrating on the soccer field."
    assert rows[0]["prompt"] == "What are they doing?<image>"
    alone = [generate_batch(loaded, [ex], GenOptions(max_new_tokens=5))[0] for ex in examples]
    assert [r["tokens"] for r in rows] == [a["tokens"] for a in alone]
    assert len({len(loaded.builder.prompt(ex)["input_ids"]) for ex in examples}) == 3  # the batch was padded


def _levenshtein(a, b):
    # the textbook recursion, independent of metrics.levenshtein
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if not i or not j:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def _by_hand(row, options):
    pred = row["prediction"]
    if row["bench"] == "docvqa":
        sims = []
        for ans in row["answers"]:
            p, a = " ".join(pred.lower().split()), " ".join(ans.lower().split())
            sims.append(1 - _levenshtein(p, a) / max(len(p), len(a), 1))
        return max(sims) if max(sims) >= 0.5 else 0.0
    if row["bench"] == "chartqa":
        def num(s):
            s = s.strip()
            try:
                return float(s[:-1]) / 100 if s.endswith("%") else float(s)
            except ValueError:
                return None

        a, p = num(row["answers"][0]), num(pred)
        if a and p is not None:
            return float(abs(p - a) <= 0.05 * abs(a))
        return float(pred.strip().lower() == row["answers"][0].lower())
    if options:
        return float(row["choice"] == row["answers"][0])
    return float(pred.strip().lower() == row["answers"][0].lower())


def _read(out):
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    with (out / "scores.csv").open() as f:
        scores = list(csv.DictReader(f))
    return preds, scores


def test_eval_scores_by_hand_and_dp2_equals_single(folder, tmp_path, capsys):
    from omnitrain.eval.__main__ import main
    from omnitrain.eval.bench import BENCHMARKS, read_tsv
    from omnitrain.eval.metrics import extract_choice

    common = [str(folder), *BENCHES, "--max-new-tokens", "4", "--batch-size", "2"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert "ai2d     accuracy" in capsys.readouterr().out
    preds, scores = _read(tmp_path / "one")
    items = [it for b in ("ai2d", "mmmu", "chartqa", "docvqa") for it in read_tsv(FIX / f"{b}.tsv", BENCHMARKS[b])]
    assert [(p["bench"], p["index"]) for p in preds] == [(it.bench, it.index) for it in items]
    for p, it in zip(preds, items):
        if it.options:
            assert p["choice"] == extract_choice(p["prediction"], it.options)  # letters: see test_eval_metrics
        assert p["score"] == pytest.approx(_by_hand(p, it.options)), p
    by_hand = {}
    for p, it in zip(preds, items):
        for cat in ("all", *([it.category] if it.category else [])):
            by_hand.setdefault((it.bench, cat), []).append(_by_hand(p, it.options))
    assert {(r["bench"], r["category"]): (int(r["n"]), float(r["score"])) for r in scores} == {
        k: (len(v), pytest.approx(sum(v) / len(v))) for k, v in by_hand.items()
    }
    assert any(p["score"] > 0 for p in preds) and len({p["prediction"] for p in preds}) > 2, preds
    # data parallel over 2 ranks: the same predictions and scores, in the same order
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    for name in ("predictions.jsonl", "scores.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_bad_input_is_one_line(folder, tmp_path, capsys):
    from omnitrain.eval.__main__ import main as eval_main
    from omnitrain.generate.__main__ import main as gen_main

    def line(code):
        assert code == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("omnitrain:")]
        assert len(err) == 1, err
        return err[0]

    assert "eval error: unknown benchmark 'textvqa'" in line(eval_main([str(folder), "--bench", "textvqa=x.tsv"]))
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\tanswer\n0\tq\t1\n")
    assert "no column image" in line(eval_main([str(folder), f"--bench=docvqa={bad}"]))
    assert "model error: " in line(gen_main([str(tmp_path / "nope"), "--prompt", "hi"]))
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint" in line(gen_main([str(tmp_path / "empty"), "--prompt", "hi"]))
    assert "image file not found" in line(gen_main([str(folder), "--prompt", "hi", "--image", str(tmp_path / "x.png")]))
    assert "data option" in line(gen_main([str(folder), "--prompt", "hi", "-o", "image_max_pixel=5"]))
    assert not list(tmp_path.glob("eval_out*"))
