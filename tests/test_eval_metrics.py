"""Benchmark metrics against hand-computed scores, the VLMEvalKit TSV reader
on the fixtures and on broken files, the generation prompt's layout, and the
batch plan of data-parallel generation (pure, no model)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from omnitrain.eval import metrics
from omnitrain.eval.bench import BENCHMARKS, EvalError, prompt_text, read_tsv, score, summarize
from omnitrain.generate import plan_batches

FIX = Path(__file__).resolve().parent / "data_fixtures" / "vlmeval"


# ----------------------------------------------------------------------------- ANLS


def test_anls_by_hand():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    # "invoce" vs "invoice": 1 edit over 7 characters
    assert metrics.anls("Invoce", ["invoice"]) == pytest.approx(1 - 1 / 7)
    # case and surrounding / repeated whitespace do not count
    assert metrics.anls("  1   MAY ", ["1 may"]) == 1.0
    # the best of several answers
    assert metrics.anls("invoice no. 1", ["Invoice", "invoice no. 1"]) == 1.0
    # similarity exactly 0.5 is kept (VLMEvalKit), just below it scores 0
    assert metrics.anls("abcd", ["abxy"]) == 0.5
    assert metrics.anls("abcde", ["abxyz"]) == 0.0  # 1 - 3/5 = 0.4
    assert metrics.anls("ab", ["abcde"]) == 0.0  # 1 - 3/5
    assert metrics.anls("abc", ["abcde"]) == pytest.approx(0.6)  # 1 - 2/5
    # empty prediction vs a non-empty answer: 0; both empty: 1
    assert metrics.anls("", ["x"]) == 0.0
    assert metrics.anls("", [""]) == 1.0


# ----------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "pred, answer, ok",
    [
        ("50", "50", True),
        ("52.4", "50", True),  # 4.8 % off
        ("52.6", "50", False),  # 5.2 % off
        ("47.5", "50", True),  # exactly 5 %
        ("20%", "0.2", True),  # a percentage is read as a fraction
        ("0.205", "20%", True),
        ("20", "20%", False),  # 20 vs 0.2
        ("19.5%", "20%", True),
        ("0", "0", True),  # a zero answer needs an exact match
        ("0.01", "0", False),
        ("blue", "Blue", True),  # text: exact, case-insensitive
        (" Blue ", "blue", True),
        ("light blue", "blue", False),
        ("1,000", "1000", False),  # not a number: exact match, which fails
        ("-10", "-10.4", True),
    ],
)
def test_relaxed_correctness_by_hand(pred, answer, ok):
    assert metrics.relaxed_correct(pred, answer) is ok


def test_relaxed_accuracy_takes_the_best_answer():
    assert metrics.relaxed_accuracy("31", ["thirty", "30"]) == 1.0
    assert metrics.relaxed_accuracy("32", ["thirty", "30"]) == 0.0


# ----------------------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    "pred, want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) green", "C"),
        ("The answer is D.", "D"),
        ("I think B", "B"),  # "I" is no option here
        ("A and B", None),  # two letters: none
        ("green", "C"),  # the only option whose text it names
        ("blue or green", None),
        ("E", None),  # not an option
        ("", None),
        ("AB5", None),
    ],
)
def test_extract_choice(pred, want):
    options = {"A": "red", "B": "blue", "C": "green", "D": "black"}
    assert metrics.extract_choice(pred, options) == want


def test_choice_accuracy_and_exact_match():
    options = {"A": "red", "B": "blue"}
    assert metrics.choice_accuracy("b", "B", options) == 0.0  # a lower-case b is no letter answer
    assert metrics.choice_accuracy("B) blue", "B", options) == 1.0
    assert metrics.exact_match(" Three ", ["3", "three"]) == 1.0


# ----------------------------------------------------------------------------- TSV files


def test_fixtures_read_as_the_benchmarks_ship():
    ai2d = read_tsv(FIX / "ai2d.tsv", BENCHMARKS["ai2d"])
    assert [it.index for it in ai2d] == ["0", "1", "2"]
    assert ai2d[1].options == {"A": "egg", "B": "larva", "C": "adult"}  # empty D dropped
    assert ai2d[1].hint == "A life cycle." and ai2d[0].hint is None
    assert ai2d[2].images == ai2d[0].images  # an image stored as another row's index
    mmmu = read_tsv(FIX / "mmmu.tsv", BENCHMARKS["mmmu"])
    assert len(mmmu[0].images) == 2 and mmmu[1].options == {}
    docvqa = read_tsv(FIX / "docvqa.tsv", BENCHMARKS["docvqa"])
    assert docvqa[0].answers == ["Invoice", "invoice no. 1"]
    chart = read_tsv(FIX / "chartqa.tsv", BENCHMARKS["chartqa"], limit=2)
    assert [it.answers for it in chart] == [["50"], ["20%"]]
    from PIL import Image

    assert Image.open(io.BytesIO(chart[0].images[0])).size == (56, 56)
    text = prompt_text(ai2d[1], BENCHMARKS["ai2d"])
    assert text == (
        "Hint: A life cycle.\nQuestion: Which stage comes first?\nOptions:\nA. egg\nB. larva\nC. adult\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert prompt_text(chart[0], BENCHMARKS["chartqa"]).endswith("\nAnswer the question using a single word or phrase.")
    # scores per item and the summary (mean; per category where the file has one)
    s = [score(ai2d[0], "C"), score(ai2d[1], "B"), score(ai2d[2], "The answer is B")]
    assert s == [{"score": 1.0, "choice": "C"}, {"score": 0.0, "choice": "B"}, {"score": 1.0, "choice": "B"}]
    rows = summarize(ai2d, [x["score"] for x in s])
    assert rows[0] == {"bench": "ai2d", "category": "all", "metric": "accuracy", "n": 3, "score": pytest.approx(2 / 3)}
    assert {r["category"]: r["score"] for r in rows[1:]} == {"colours": 1.0, "life cycles": 0.0}
    assert score(mmmu[1], "3") == {"score": 1.0}  # an open question: exact match


def _tsv(tmp_path, header, *rows):
    f = tmp_path / "b.tsv"
    f.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return f


def test_bad_files_are_one_clear_line(tmp_path):
    good = (FIX / "chartqa.tsv").read_text().splitlines()[1].split("\t")[-1]
    with pytest.raises(EvalError, match=r"no column question .*has index, answer, image"):
        read_tsv(_tsv(tmp_path, ["index", "answer", "image"], ["0", "1", good]), BENCHMARKS["chartqa"])
    with pytest.raises(EvalError, match=r"no column A, B"):
        read_tsv(_tsv(tmp_path, ["index", "question", "answer", "image"], ["0", "q", "A", good]), BENCHMARKS["ai2d"])
    with pytest.raises(EvalError, match=r"row 1 \(index 7\): column image is not valid base64"):
        read_tsv(_tsv(tmp_path, ["index", "question", "answer", "image"], ["7", "q", "1", "not base64!"]), BENCHMARKS["chartqa"])
    junk = base64.b64encode(b"plain text, no image").decode()
    with pytest.raises(EvalError, match=r"decodes to no image"):
        read_tsv(_tsv(tmp_path, ["index", "question", "answer", "image"], ["7", "q", "1", junk]), BENCHMARKS["chartqa"])
    with pytest.raises(EvalError, match=r"answer 'E' is none of its options A, B"):
        read_tsv(_tsv(tmp_path, ["index", "question", "A", "B", "answer", "image"], ["0", "q", "x", "y", "E", good]), BENCHMARKS["ai2d"])
    with pytest.raises(EvalError, match="empty answer"):
        read_tsv(_tsv(tmp_path, ["index", "question", "answer", "image"], ["0", "q", "", good]), BENCHMARKS["chartqa"])
    with pytest.raises(EvalError, match="no such file"):
        read_tsv(tmp_path / "nope.tsv", BENCHMARKS["docvqa"])
    from omnitrain.eval.__main__ import parse_benches

    with pytest.raises(EvalError, match=r"unknown benchmark 'mmbench'; known: ai2d, mmmu, chartqa, docvqa"):
        parse_benches(["mmbench=x.tsv"])
    with pytest.raises(EvalError, match="use NAME=FILE.tsv"):
        parse_benches(["ai2d"])


# ----------------------------------------------------------------------------- prompts and batches


def test_generation_prompt_is_the_training_template_with_an_open_assistant_turn():
    from omnitrain.data.template import render

    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    ids, labels, spans = render([("user", "hi <image>")], "sys", [[7, 7]], enc, add_generation_prompt=True)
    text = "".join(chr(i) if i != 7 else "#" for i in ids)
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi ##<|im_end|>\n<|im_start|>assistant\n"
    head = len("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi ")
    assert set(labels) == {-100} and spans == [(head, head + 2)]


def test_batches_are_cut_first_then_dealt_to_ranks():
    assert plan_batches(7, 2) == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5]), (3, [6])]
    r0, r1 = plan_batches(7, 2, 0, 2), plan_batches(7, 2, 1, 2)
    assert r0 == [(0, [0, 1]), (2, [4, 5])] and r1 == [(1, [2, 3]), (3, [6])]
    assert plan_batches(1, 4, 1, 2) == []  # a rank with nothing to do still joins the gather


def test_hf_inputs_name_the_batch_as_each_hf_class_does():
    import torch

    import _synth
    from conftest import compose_cfg
    from omnitrain.generate import left_pad
    from omnitrain.models.family import build_family

    vl = build_family(compose_cfg(["model=qwen25_vl"]).model)
    mb = _synth.collate(_synth.samples(3, kinds=_synth.KINDS_VL))
    kw = vl.hf_inputs(mb)
    assert "labels" not in kw and "video_second_per_grid" not in kw and "use_audio_in_video" not in kw
    assert torch.equal(kw["mm_token_type_ids"], vl.mm_token_types(mb)) and "pixel_values" in kw
    omni = build_family(compose_cfg([]).model)
    mb = _synth.collate(_synth.samples(2))
    assert omni.hf_inputs(mb)["use_audio_in_video"] is False and "mm_token_type_ids" not in omni.hf_inputs(mb)
    mixed = {**mb, "use_audio_in_video": torch.tensor([True, False])}
    with pytest.raises(ValueError, match="one flag per batch"):
        omni.hf_inputs(mixed)
    # left padding moves each row's tokens to the right end, media untouched
    padded = left_pad(mb, 0)
    n = mb["attention_mask"].sum(1)
    for b in range(2):
        assert padded["input_ids"][b, -int(n[b]):].tolist() == mb["input_ids"][b, : int(n[b])].tolist()
        assert padded["attention_mask"][b].sum() == n[b] and padded["attention_mask"][b, -1] == 1
    assert "labels" not in padded and torch.equal(padded["input_features"], mb["input_features"])
