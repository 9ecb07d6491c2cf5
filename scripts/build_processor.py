#!/usr/bin/env python
"""Build the shipped Qwen processors (tokenizer + image/video, and for Omni audio, front ends).

Output, one folder per family under src/omnitrain/assets/ (committed), each loadable
offline with `<processor class>.from_pretrained(dir)` or `AutoProcessor.from_pretrained(dir)`:

    qwen25_omni  -> qwen25_omni_tiny/  Qwen2_5OmniProcessor
    qwen2_vl     -> qwen2_vl_tiny/     Qwen2VLProcessor
    qwen25_vl    -> qwen25_vl_tiny/    Qwen2_5_VLProcessor
    qwen3_omni   -> qwen3_omni_tiny/   Qwen3OmniMoeProcessor
    qwen3_vl     -> qwen3_vl_tiny/     Qwen3VLProcessor

Nothing comes from a model hub. The real Qwen vocabulary ships inside the PyPI
package `dashscope` as a tiktoken rank file; we fetch the wheel with
`pip download --no-deps` (never installed or imported) and read that one file.
Pass `--tiktoken PATH` to skip the download; from then on the build is offline.

The 11 MB tokenizer.json is stored once per distinct content: Qwen2.5-VL's tokenizer
is Qwen2-VL's plus 8 added tokens, so qwen25_vl_tiny/tokenizer.json is a relative
symlink to qwen2_vl_tiny's and the 8 extra tokens are listed in its
tokenizer_config.json `added_tokens_decoder` (the format upstream checkpoints use).
Building a family also builds the family it links to.

Deterministic: the same rank file gives byte-identical output files (checked by
`--check`, which builds into a temp dir and compares with the committed assets,
symlinks by their target).

    python scripts/build_processor.py                    # download + build all families
    python scripts/build_processor.py --family qwen2_vl --tiktoken qwen.tiktoken --out /tmp/assets
    python scripts/build_processor.py --check            # rebuild and diff against the assets
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "omnitrain" / "assets"

# Pinned so a rebuild reads the same bytes; the hash guards against a republished wheel.
DASHSCOPE_REQ = "dashscope==2.0.2"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151643

# ----------------------------------------------------------------------------- families

# Added tokens of the real tokenizers, in id order from 151643: (content, special).
# All three share the first three; the next 11 slots (151646-151656) are named for
# vision grounding in Qwen2-VL / Qwen2.5-VL and partly renamed for audio in Omni.
# Qwen2.5 added 8 more (tool calls, FIM, repo markers, 151657-151664) that are added
# but not "special", so decode(skip_special_tokens=True) keeps them, as upstream does;
# Qwen2-VL predates them and stops at <|video_pad|> (len(tokenizer) 151657).
CHAT_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)]
VL_SLOTS = [
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
]
OMNI_SLOTS = [
    ("<|AUDIO|>", True),  # 151646
    ("<|audio_bos|>", True),  # 151647
    ("<|audio_eos|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_bos|>", True),  # 151652
    ("<|vision_eos|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|IMAGE|>", True),  # 151655
    ("<|VIDEO|>", True),  # 151656
]
QWEN25_TOKENS = [
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
]

# Qwen3 added four after Qwen2.5's (tool responses, thinking), 151665-151668;
# Qwen3-Omni's tokenizer continues with the audio and TTS tokens, 151669-151675.
QWEN3_TOKENS = [
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
]
QWEN3_OMNI_TOKENS = [
    ("<|audio_start|>", True),  # 151669
    ("<|audio_end|>", True),  # 151670
    ("<tts_pad>", True),  # 151671
    ("<tts_text_bos>", True),  # 151672
    ("<tts_text_eod>", True),  # 151673
    ("<tts_text_bos_single>", True),  # 151674
    ("<|audio_pad|>", True),  # 151675
]

# The published chat templates, verbatim (the processors').
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct publish the same one.
VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-Omni's placement of media in a user turn (its published template adds
# thinking and tool sections around this; the trainer lays out samples itself
# from the family's ChatSpec, the template serves apply_chat_template).
QWEN3_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3 ViT front end: 16-px patches, mean/std 0.5.
QWEN3_MEAN = QWEN3_STD = [0.5, 0.5, 0.5]

# Published image/video settings, the same for all three families (CLIP
# normalisation, 14px patches, 2x2 merge, 2-frame temporal patches).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384


@dataclasses.dataclass(frozen=True)
class Family:
    asset: str  # folder under the assets root
    processor_class: str  # transformers class, also what AutoProcessor must return
    added_tokens: list[tuple[str, bool]]  # ids from N_RANKS on
    chat_template: str
    model_max_length: int
    title: str  # first line of the asset's README
    notes: str = ""  # README lines on where the asset differs from upstream
    padding_side: str | None = None  # None: the library default (right)
    named_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # tokenizer attributes
    audio: bool = False  # with a Whisper feature extractor
    tokenizer_from: str | None = None  # family whose tokenizer.json this one links to
    patch_size: int = 14
    video_processor: str = "Qwen2VLVideoProcessor"
    image_mean: tuple = tuple(IMAGE_MEAN)
    image_std: tuple = tuple(IMAGE_STD)


FAMILIES = {
    "qwen25_omni": Family(
        asset="qwen25_omni_tiny",
        processor_class="Qwen2_5OmniProcessor",
        added_tokens=CHAT_TOKENS + OMNI_SLOTS + QWEN25_TOKENS,
        chat_template=OMNI_CHAT_TEMPLATE,
        model_max_length=32768,
        title="Qwen2.5-Omni processor (tokenizer, image/video processors, Whisper features).",
        notes="Differs from upstream only in feature_extractor chunk_length (30 s instead of 300 s).\n",
        # The Omni processor reads these from the tokenizer (it has no defaults).
        named_tokens={
            "image_token": "<|IMAGE|>",
            "video_token": "<|VIDEO|>",
            "audio_token": "<|AUDIO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
        audio=True,
    ),
    "qwen2_vl": Family(
        asset="qwen2_vl_tiny",
        processor_class="Qwen2VLProcessor",
        added_tokens=CHAT_TOKENS + VL_SLOTS,
        chat_template=VL_CHAT_TEMPLATE,
        model_max_length=32768,
        title="Qwen2-VL processor (tokenizer, image/video processors), as Qwen/Qwen2-VL-*-Instruct.",
        padding_side="left",  # as upstream's tokenizer_config
    ),
    "qwen25_vl": Family(
        asset="qwen25_vl_tiny",
        processor_class="Qwen2_5_VLProcessor",
        added_tokens=CHAT_TOKENS + VL_SLOTS + QWEN25_TOKENS,
        chat_template=VL_CHAT_TEMPLATE,
        model_max_length=131072,
        title="Qwen2.5-VL processor (tokenizer, image/video processors), as Qwen/Qwen2.5-VL-*-Instruct.",
        tokenizer_from="qwen2_vl",
    ),
    "qwen3_omni": Family(
        asset="qwen3_omni_tiny",
        processor_class="Qwen3OmniMoeProcessor",
        added_tokens=CHAT_TOKENS + VL_SLOTS + QWEN25_TOKENS + QWEN3_TOKENS + QWEN3_OMNI_TOKENS,
        chat_template=QWEN3_OMNI_CHAT_TEMPLATE,
        model_max_length=65536,
        title="Qwen3-Omni processor (tokenizer, 16-px image/video processors, Whisper features).",
        notes=(
            "Differs from upstream in feature_extractor chunk_length (30 s) and in the chat template (media\n"
            "placement only, without the published template's thinking / tool sections).\n"
        ),
        named_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "audio_token": "<|audio_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
        },
        audio=True,
        tokenizer_from="qwen2_vl",
        patch_size=16,
        image_mean=tuple(QWEN3_MEAN),
        image_std=tuple(QWEN3_STD),
    ),
    "qwen3_vl": Family(
        asset="qwen3_vl_tiny",
        processor_class="Qwen3VLProcessor",
        added_tokens=CHAT_TOKENS + VL_SLOTS + QWEN25_TOKENS + QWEN3_TOKENS,
        chat_template=VL_CHAT_TEMPLATE,
        model_max_length=262144,
        title="Qwen3-VL processor (tokenizer, 16-px image/video processors).",
        notes="Differs from upstream in the chat template (Qwen2.5-VL's media placement, without the thinking / tool sections).\n",
        tokenizer_from="qwen2_vl",
        patch_size=16,
        image_mean=tuple(QWEN3_MEAN),
        image_std=tuple(QWEN3_STD),
        video_processor="Qwen3VLVideoProcessor",
    ),
}
GENERATED_NOTE = (
    "Generated by scripts/build_processor.py from the Qwen tiktoken ranks shipped in the\n"
    "`dashscope` PyPI wheel; do not edit by hand, re-run the script.\n"
)

# Mixed-script text for the build-time self-check against a reference tiktoken BPE.
SELF_CHECK_TEXT = (
    "Hello, world! It's 2025 -- we'll see.\n\tIndented  text   with spaces\r\n"
    "中文分词测试：你好，世界！ 日本語のテキスト。한국어 문장입니다. Привет, мир! "
    "مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก 😀🚀👍🏽 café naïve "
    "def f(x):\n    return x**2  # comment\n{\"json\": [1, 2.5e-3, null]} <html></html> "
    "1234567890 3.14159 ... !!! ??? \u00a0nbsp\u3000ideographic-space"
)


# ----------------------------------------------------------------------------- vocabulary


def fetch_tiktoken(workdir: Path) -> Path:
    """Download the dashscope wheel (no deps, not installed) and extract the rank file."""
    dl = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DASHSCOPE_REQ, "-d", str(dl)]
    subprocess.run(cmd, check=True)
    wheels = sorted(dl.glob("dashscope-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no dashscope wheel in {dl}")
    out = workdir / "qwen.tiktoken"
    with zipfile.ZipFile(wheels[0]) as z:
        out.write_bytes(z.read(TIKTOKEN_MEMBER))
    return out


def load_ranks(path: Path, verify: bool = True) -> dict[bytes, int]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if verify and digest != TIKTOKEN_SHA256:
        raise SystemExit(
            f"{path}: sha256 {digest} is not the expected {TIKTOKEN_SHA256}; "
            "the output would differ from the committed asset (pass --no-verify to build anyway)"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise SystemExit(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_parts(ranks: dict[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken's merge rule: repeatedly merge the adjacent pair whose join has the lowest rank.

    With max_rank, only joins ranked below it are allowed; for a token of rank r this
    stops one step short and leaves the two parts whose merge creates the token.
    """
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None or (max_rank is not None and best >= max_rank):
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def build_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF BPE vocab + merges equivalent to the tiktoken ranks.

    Merges are ordered by the rank of the token they create, which is exactly the
    priority tiktoken uses, so HF's lowest-merge-index rule picks the same pairs.
    """
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = bpe_parts(ranks, tok, max_rank=rank)
        if len(parts) != 2:
            raise SystemExit(f"token rank {rank} ({tok!r}) is not reachable by one merge: {parts}")
        merges.append((enc(parts[0]), enc(parts[1])))
    return vocab, merges


def reference_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """Plain tiktoken-style encoding (no special tokens), to check the HF tokenizer against."""
    import unicodedata

    import regex

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ids = []
    for piece in regex.findall(PRETOKENIZE_REGEX, unicodedata.normalize("NFC", text)):
        ids += [ranks[p] for p in bpe_parts(ranks, piece.encode("utf-8"))]
    return ids


# ----------------------------------------------------------------------------- processor


def build_tokenizer(fam: Family, vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    # Put the added tokens in the vocab at their fixed ids, so their ids never
    # depend on the order in which the tokenizer registers special tokens.
    vocab = dict(vocab)
    for i, (tok, _) in enumerate(fam.added_tokens):
        vocab[tok] = N_RANKS + i
    optional = {"padding_side": fam.padding_side} if fam.padding_side else {}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # upstream's additional_special_tokens: everything special except endoftext
        extra_special_tokens=[t for t, special in fam.added_tokens if special and t != "<|endoftext|>"],
        **fam.named_tokens,  # become tokenizer.image_token etc.
        **optional,
        model_max_length=fam.model_max_length,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False) for t, s in fam.added_tokens]
    )
    tokenizer.chat_template = fam.chat_template
    return tokenizer


def build_processor(fam: Family, tokenizer):
    import transformers
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

    # torchvision-backed image/video processors: torchvision is a declared dependency
    # and transformers 5 offers no PIL video processor for Qwen2-VL.
    common = dict(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=fam.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(fam.image_mean),
        image_std=list(fam.image_std),
    )
    parts = dict(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=getattr(transformers, fam.video_processor)(**common),
        tokenizer=tokenizer,
    )
    if fam.audio:
        # chunk_length=30, not upstream's 300: the processor pads every clip to
        # chunk_length seconds; 300 s means 30,000 frames (~15 MB, ~150 ms) per clip
        # though the encoder only uses the valid frames. 30 s gives 3,000 frames (~9 ms).
        # Clips longer than 30 s are cut by the processor; the data pipeline must check.
        parts["feature_extractor"] = WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16000,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            padding_value=0.0,
            return_attention_mask=True,
            dither=0.0,
        )
    return getattr(transformers, fam.processor_class)(**parts, chat_template=fam.chat_template)


def link_tokenizer(fam: Family, out: Path) -> None:
    """Replace out/tokenizer.json by a relative link to the tokenizer_from family's.

    That file holds a prefix of this family's added tokens; the rest go into
    tokenizer_config.json's added_tokens_decoder, which transformers adds in id
    order on load, so they land on the ids that follow the linked file's.
    """
    base = FAMILIES[fam.tokenizer_from]
    n = len(base.added_tokens)
    if fam.added_tokens[:n] != base.added_tokens:
        raise SystemExit(f"{fam.asset}: {base.asset}'s added tokens are not a prefix of its own")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(N_RANKS + i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=s)
        for i, (t, s) in enumerate(fam.added_tokens)
        if i >= n
    }
    config_path.write_text(json.dumps(config), encoding="utf-8")  # normalize_json_files formats it
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(Path("..") / base.asset / "tokenizer.json")


def normalize_json_files(out: Path) -> None:
    """Rewrite every json file with sorted keys and a trailing newline.

    save_pretrained's key order follows dict insertion order, which depends on
    library internals; sorting makes the files stable and diffs readable.
    tokenizer.json is left as written (its key order is the tokenizers format).
    """
    for path in sorted(out.glob("*.json")):
        if path.name == "tokenizer.json":
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("transformers_version", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def self_check(fam: Family, out: Path, ranks: dict[bytes, int]) -> None:
    """Reload from disk offline and compare with the reference BPE and the fixed ids."""
    import transformers

    proc = getattr(transformers, fam.processor_class).from_pretrained(str(out), local_files_only=True)
    auto = type(transformers.AutoProcessor.from_pretrained(str(out), local_files_only=True)).__name__
    if auto != fam.processor_class:
        raise SystemExit(f"self-check {fam.asset}: AutoProcessor gives {auto}, expected {fam.processor_class}")
    tok = proc.tokenizer
    got = {i: (str(t), t.special) for i, t in tok.added_tokens_decoder.items()}
    want = {N_RANKS + i: (t, s) for i, (t, s) in enumerate(fam.added_tokens)}
    if got != want or len(tok) != N_RANKS + len(want):
        wrong = sorted(i for i in got.keys() | want.keys() if got.get(i) != want.get(i))
        raise SystemExit(f"self-check {fam.asset}: added tokens differ at ids {wrong}; len {len(tok)}")
    ours = tok.encode(SELF_CHECK_TEXT, add_special_tokens=False)
    ref = reference_encode(ranks, SELF_CHECK_TEXT)
    if ours != ref:
        first = next(i for i, (a, b) in enumerate(zip(ours + [-1], ref + [-1])) if a != b)
        raise SystemExit(f"self-check {fam.asset}: HF tokenizer differs from reference BPE at token {first}")
    if tok.decode(ours) != SELF_CHECK_TEXT:
        raise SystemExit(f"self-check {fam.asset}: decode(encode(text)) != text")
    if tok.encode("user", add_special_tokens=False) != [872]:
        raise SystemExit(f"self-check {fam.asset}: 'user' is not [872]")
    print(f"self-check ok: {fam.asset}: {len(ours)} tokens match the reference BPE; added-token ids as upstream")


def build(fam: Family, out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    processor = build_processor(fam, build_tokenizer(fam, vocab, merges))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    processor.save_pretrained(str(out))
    if fam.tokenizer_from:
        link_tokenizer(fam, out)
    normalize_json_files(out)
    (out / "README.md").write_text(f"{fam.title}\n{GENERATED_NOTE}{fam.notes}{sharing_note(fam)}", encoding="utf-8")


def sharing_note(fam: Family) -> str:
    """README lines saying which tokenizer.json is shared with which folder."""
    lines = ""
    if fam.tokenizer_from:
        base = FAMILIES[fam.tokenizer_from]
        lines += (
            f"tokenizer.json is a link to ../{base.asset}/tokenizer.json (same vocabulary, merges and\n"
            f"first {len(base.added_tokens)} added tokens); the {len(fam.added_tokens) - len(base.added_tokens)} "
            "further added tokens are in tokenizer_config.json's added_tokens_decoder.\n"
        )
    users = [f.asset for f in FAMILIES.values() if f.tokenizer_from and FAMILIES[f.tokenizer_from] is fam]
    if users:
        lines += f"tokenizer.json is also used, through a link, by {', '.join(users)}.\n"
    return lines


def with_dependencies(names: list[str]) -> list[str]:
    """The families to build, each after the one its tokenizer.json links to."""
    order: list[str] = []
    for name in names:
        chain = []
        while name and name not in order and name not in chain:
            chain.append(name)
            name = FAMILIES[name].tokenizer_from
        order += reversed(chain)
    return order


def compare_dirs(committed: Path, built: Path) -> list[str]:
    """What differs between two asset folders: names, bytes, or a link's target."""
    names = sorted(p.name for p in committed.iterdir()) if committed.exists() else []
    built_names = sorted(p.name for p in built.iterdir())
    if names != built_names:
        return [f"files {names} vs {built_names}"]
    diffs = []
    for name in built_names:
        a, b = committed / name, built / name
        if a.is_symlink() or b.is_symlink():
            if not (a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)):
                diffs.append(f"{name} (link)")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(name)
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all", help="which processor to build")
    ap.add_argument("--tiktoken", type=Path, help="qwen.tiktoken rank file (skips the dashscope download)")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"assets root, one folder per family (default {DEFAULT_OUT})"
    )
    ap.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out")
    ap.add_argument("--no-verify", action="store_true", help="accept a rank file with another sha256")
    args = ap.parse_args(argv)
    names = with_dependencies(list(FAMILIES) if args.family == "all" else [args.family])

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    with tempfile.TemporaryDirectory(prefix="omnitrain-proc-") as tmp:
        tmp = Path(tmp)
        path = args.tiktoken or fetch_tiktoken(tmp)
        ranks = load_ranks(path, verify=not args.no_verify)
        if len(ranks) != N_RANKS:
            raise SystemExit(f"{path}: {len(ranks)} ranks, expected {N_RANKS}")
        vocab, merges = build_vocab_and_merges(ranks)
        root = tmp / "built" if args.check else args.out
        for name in names:
            fam = FAMILIES[name]
            build(fam, root / fam.asset, vocab, merges)
            self_check(fam, root / fam.asset, ranks)
        failed = False
        for name in names:
            asset = FAMILIES[name].asset
            if args.check:
                diffs = compare_dirs(args.out / asset, root / asset)
                failed |= bool(diffs)
                print(f"DIFFERENT: {asset}: {', '.join(diffs)}" if diffs else f"identical: {asset}")
            else:
                files = [p for p in (root / asset).iterdir() if not p.is_symlink()]
                print(f"wrote {root / asset} ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
