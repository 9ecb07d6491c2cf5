"""The shipped Qwen2.5-Omni processor (built by scripts/build_processor.py) loads offline
and tokenizes like the real one: upstream special-token ids, real vocabulary ids,
lossless round trips, and multimodal placeholders expanded by the processor.

Rebuilding it reproducibly is checked by `python scripts/build_processor.py --check`
(needs the dashscope rank file, so it is not part of the fast suite).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the asset must never need the hub

import numpy as np
import pytest

from omnitrain.paths import resolve

ASSET = resolve("builtin:qwen25_omni_tiny")

# Upstream Qwen2.5-Omni added tokens and their ids.
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def processor():
    # Built once per module: importing the processor stack costs ~10 s on 2 cores.
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(str(ASSET), local_files_only=True)


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def test_asset_files_present():
    names = {p.name for p in ASSET.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names


def test_special_token_ids(tok):
    for token, idx in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    assert len(tok) == 151665
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.bos_token is None


def test_named_multimodal_tokens(tok):
    assert tok.image_token == "<|IMAGE|>" and tok.image_token_id == 151655
    assert tok.video_token == "<|VIDEO|>" and tok.video_token_id == 151656
    assert tok.audio_token == "<|AUDIO|>" and tok.audio_token_id == 151646
    assert tok.vision_bos_token == "<|vision_bos|>"
    assert tok.vision_eos_token == "<|vision_eos|>"
    assert tok.audio_bos_token == "<|audio_bos|>"
    assert tok.audio_eos_token == "<|audio_eos|>"


def test_real_vocabulary_ids(tok):
    assert tok.encode("user", add_special_tokens=False) == [872]
    assert tok.encode("assistant", add_special_tokens=False) == [77091]
    # Placeholders are never split, and no BOS/EOS is added by encode.
    ids = tok.encode("<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|>", add_special_tokens=False)
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
    assert all(0 <= i < 151643 for i in ids)  # plain text never yields added tokens
    assert tok.decode(ids) == text


def test_chat_template(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


def test_image_placeholders_expand(processor):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    text = "<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|>Describe.<|im_end|>\n"
    out = processor(text=[text], images=[img], return_tensors="pt")
    # 56x84 px -> 4x6 patches of 14 px (t=1 after temporal padding) -> 24/4 = 6 merged tokens.
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == 151655).sum()) == 6


def test_audio_features_30s_chunk(processor):
    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.chunk_length) == (128, 16000, 30)
    text = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    out = processor(text=[text], audio=[np.zeros(16000, dtype=np.float32)], return_tensors="pt")
    assert tuple(out["input_features"].shape) == (1, 128, 3000)  # padded to 30 s, not 300 s
    assert int(out["feature_attention_mask"].sum()) == 100
    # 100 mel frames -> 50 after conv stride 2 -> 25 after pooling.
    assert int((out["input_ids"] == 151646).sum()) == 25
