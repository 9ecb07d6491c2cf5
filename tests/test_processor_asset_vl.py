"""The shipped Qwen2-VL and Qwen2.5-VL processors (built by scripts/build_processor.py)
load offline and tokenize like the real ones: upstream added tokens and ids, the same
real vocabulary as the Omni asset, lossless round trips, the upstream chat template,
and image/video placeholders expanded to the grid the image processor reports.

qwen25_vl_tiny/tokenizer.json is a link to qwen2_vl_tiny's (Qwen2.5-VL's extra 8
added tokens come from its tokenizer_config.json). Rebuilding both reproducibly is
checked by `python scripts/build_processor.py --check` (not part of the fast suite).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the assets must never need the hub

import numpy as np
import pytest

from omnitrain.paths import resolve

QWEN2_VL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# Qwen2.5 added these, not special (decode(skip_special_tokens=True) keeps them).
QWEN25_EXTRA = {
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
# family -> (asset, processor class, added tokens, model_max_length, padding_side), as upstream.
FAMILIES = {
    "qwen2_vl": ("qwen2_vl_tiny", "Qwen2VLProcessor", QWEN2_VL_TOKENS, 32768, "left"),
    "qwen25_vl": ("qwen25_vl_tiny", "Qwen2_5_VLProcessor", {**QWEN2_VL_TOKENS, **QWEN25_EXTRA}, 131072, "right"),
}
N_RANKS = 151643

IMAGE_TURN = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def processor(family):
    # Loaded once per family (pytest groups the tests by this module-scoped param):
    # the processor stack costs ~10 s to import. Loading through AutoProcessor also
    # checks that the asset names its processor class.
    import transformers

    asset, cls, *_ = FAMILIES[family]
    proc = transformers.AutoProcessor.from_pretrained(str(resolve(f"builtin:{asset}")), local_files_only=True)
    assert type(proc) is getattr(transformers, cls)
    return proc


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


@pytest.fixture(scope="module")
def omni_tok():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(resolve("builtin:qwen25_omni_tiny")), local_files_only=True)


def test_assets_resolve_and_share_one_tokenizer_json():
    vl2, vl25 = resolve("builtin:qwen2_vl_tiny"), resolve("builtin:qwen25_vl_tiny")
    for asset in (vl2, vl25):
        names = {p.name for p in asset.iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
    assert not (vl2 / "tokenizer.json").is_symlink()
    # A relative link, so it survives copies of the assets folder (and the wheel copies the target).
    assert os.readlink(vl25 / "tokenizer.json") == "../qwen2_vl_tiny/tokenizer.json"
    assert (vl25 / "tokenizer.json").resolve() == (vl2 / "tokenizer.json").resolve()


def test_added_token_ids(family, tok):
    _, _, tokens, max_len, padding_side = FAMILIES[family]
    assert {i: str(t) for i, t in tok.added_tokens_decoder.items()} == {i: t for t, i in tokens.items()}
    for token, idx in tokens.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
        assert tok.added_tokens_decoder[idx].special == (token not in QWEN25_EXTRA), token
    assert len(tok) == N_RANKS + len(tokens)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.bos_token is None
    assert (tok.model_max_length, tok.padding_side) == (max_len, padding_side)


def test_processor_token_ids(processor):
    assert (processor.image_token, processor.image_token_id) == ("<|image_pad|>", 151655)
    assert (processor.video_token, processor.video_token_id) == ("<|video_pad|>", 151656)


def test_tool_call_tokens(family, tok):
    ids = tok.encode("<tool_call>\n{}\n</tool_call>", add_special_tokens=False)
    if family == "qwen25_vl":
        assert ids[0] == 151657 and ids[-1] == 151658
        assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"
    else:  # Qwen2-VL has no such added tokens: plain BPE pieces
        assert all(i < N_RANKS for i in ids)


def test_real_vocabulary_same_as_omni(tok, omni_tok):
    base = {t: i for t, i in tok.get_vocab().items() if i < N_RANKS}
    assert len(base) == N_RANKS
    assert base == {t: i for t, i in omni_tok.get_vocab().items() if i < N_RANKS}
    assert tok.encode("user", add_special_tokens=False) == [872]
    assert tok.encode("assistant", add_special_tokens=False) == [77091]
    for text in ("Hello world", "system", " image", "描述这张图片", "1234567890"):
        assert tok.encode(text, add_special_tokens=False) == omni_tok.encode(text, add_special_tokens=False), text
    # Placeholders are never split, and no BOS/EOS is added by encode.
    ids = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)
    assert ids == [151644, 872, 198, 151652, 151655, 151653]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 2025.\n\tTabs  and   spaces\r\n",
        "中文测试：你好，世界！日本語のテキスト。한국어 문장. Привет, мир! مرحبا بالعالم",
        "emoji 😀🚀👍🏽 café naïve — “quotes” ½ ∑ x² \u3000end",
        "def f(x):\n    return {'k': [1, 2.5e-3, None]}  # code",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < N_RANKS for i in ids)  # plain text never yields added tokens
    assert tok.decode(ids) == text


def test_chat_template(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # An explicit system turn replaces the default; add_vision_id numbers the images.
    text = processor.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Diff?"}]},
        ],
        tokenize=False,
        add_vision_id=True,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Diff?<|im_end|>\n"
    )


def test_image_front_end_settings(processor):
    for proc in (processor.image_processor, processor.video_processor):
        assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)
        assert list(proc.image_mean) == [0.48145466, 0.4578275, 0.40821073]
        assert list(proc.image_std) == [0.26862954, 0.26130258, 0.27577711]
        assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (56 * 56, 28 * 28 * 16384)


def test_image_placeholders_expand(processor):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    out = processor(text=[IMAGE_TURN], images=[img], return_tensors="pt")
    # 56x84 px -> 4x6 patches of 14 px (t=1 after temporal padding) -> 24/4 = 6 merged tokens.
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    ids = out["input_ids"][0].tolist()
    n = int(out["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    assert ids.count(151655) == n == 6
    start = ids.index(151652)
    assert ids[start + 1 : start + 2 + n] == [151655] * n + [151653]  # contiguous, inside vision start/end
    assert out["mm_token_type_ids"][0].tolist() == [int(i == 151655) for i in ids]


def test_video_placeholders_expand(processor):
    frames = np.random.default_rng(1).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    text = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    out = processor(text=[text], videos=[frames], return_tensors="pt")
    # 4 frames -> 2 temporal patches; 56x56 px -> 4x4 patches -> 2*16/4 = 8 tokens.
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert int((out["input_ids"] == 151656).sum()) == 8
