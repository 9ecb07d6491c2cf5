#!/usr/bin/env python
"""Build the shipped Qwen2.5-Omni processor (tokenizer + image/video/audio front ends).

Output: src/omnitrain/assets/qwen25_omni_tiny/ (committed), loadable offline with
`Qwen2_5OmniProcessor.from_pretrained(dir)`.

Nothing comes from a model hub. The real Qwen vocabulary ships inside the PyPI
package `dashscope` as a tiktoken rank file; we fetch the wheel with
`pip download --no-deps` (never installed or imported) and read that one file.
Pass `--tiktoken PATH` to skip the download; from then on the build is offline.

Deterministic: the same rank file gives byte-identical output files (checked by
`--check`, which builds into a temp dir and compares with the committed asset).

    python scripts/build_processor.py                  # download + build into the asset dir
    python scripts/build_processor.py --tiktoken qwen.tiktoken --out /tmp/proc
    python scripts/build_processor.py --check          # rebuild and diff against the asset
"""

from __future__ import annotations

import argparse
import base64
import filecmp
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
DEFAULT_OUT = REPO / "src" / "omnitrain" / "assets" / "qwen25_omni_tiny"

# Pinned so a rebuild reads the same bytes; the hash guards against a republished wheel.
DASHSCOPE_REQ = "dashscope==2.0.2"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151643

# Added tokens of the real Qwen2.5-Omni tokenizer, id order from 151643. Qwen2.5-VL's
# object_ref/box_start/vision_start/image_pad/video_pad slots are renamed in Omni.
# The last 8 (tool calls, FIM, repo markers) are added but not "special" there,
# so decode(skip_special_tokens=True) keeps them, as upstream does.
ADDED_TOKENS = [
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
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
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
]
# Upstream's additional_special_tokens list (everything special except endoftext).
EXTRA_SPECIAL = [t for t, special in ADDED_TOKENS if special and t != "<|endoftext|>"]
# Named attributes the Omni processor reads from the tokenizer.
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}

# The published Qwen2.5-Omni chat template, verbatim (the processor's).
CHAT_TEMPLATE = (
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

# Published Qwen2.5-Omni image settings (CLIP normalisation, 14px patches, 2x2 merge).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384

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


def build_tokenizer(ranks: dict[bytes, int]):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = build_vocab_and_merges(ranks)
    # Put the added tokens in the vocab at their fixed ids, so their ids never
    # depend on the order in which the tokenizer registers special tokens.
    for i, (tok, _) in enumerate(ADDED_TOKENS):
        vocab[tok] = len(ranks) + i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(EXTRA_SPECIAL),
        **NAMED_TOKENS,  # become tokenizer.image_token etc., which the Omni processor reads
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False) for t, s in ADDED_TOKENS]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer):
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    # torchvision-backed image/video processors: torchvision is a declared dependency
    # and transformers 5 offers no PIL video processor for Qwen2-VL.
    common = dict(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common)
    # chunk_length=30, not upstream's 300: the processor pads every clip to
    # chunk_length seconds; 300 s means 30,000 frames (~15 MB, ~150 ms) per clip
    # though the encoder only uses the valid frames. 30 s gives 3,000 frames (~9 ms).
    # Clips longer than 30 s are cut by the processor; the data pipeline must check.
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
        dither=0.0,
    )
    return Qwen2_5OmniProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


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


def self_check(out: Path, ranks: dict[bytes, int]) -> None:
    """Reload from disk offline and compare with the reference BPE and the fixed ids."""
    from transformers import Qwen2_5OmniProcessor

    proc = Qwen2_5OmniProcessor.from_pretrained(str(out), local_files_only=True)
    tok = proc.tokenizer
    for i, (t, _) in enumerate(ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != N_RANKS + i:
            raise SystemExit(f"self-check: {t} has id {got}, expected {N_RANKS + i}")
    ours = tok.encode(SELF_CHECK_TEXT, add_special_tokens=False)
    ref = reference_encode(ranks, SELF_CHECK_TEXT)
    if ours != ref:
        first = next(i for i, (a, b) in enumerate(zip(ours + [-1], ref + [-1])) if a != b)
        raise SystemExit(f"self-check: HF tokenizer differs from reference BPE at token {first}")
    if tok.decode(ours) != SELF_CHECK_TEXT:
        raise SystemExit("self-check: decode(encode(text)) != text")
    if tok.encode("user", add_special_tokens=False) != [872]:
        raise SystemExit("self-check: 'user' is not [872]")
    print(f"self-check ok: {len(ours)} tokens match the reference BPE; added-token ids as upstream")


def build(out: Path, ranks: dict[bytes, int]) -> None:
    tokenizer = build_tokenizer(ranks)
    processor = build_processor(tokenizer)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    processor.save_pretrained(str(out))
    normalize_json_files(out)
    (out / "README.md").write_text(
        "Qwen2.5-Omni processor (tokenizer, image/video processors, Whisper features).\n"
        "Generated by scripts/build_processor.py from the Qwen tiktoken ranks shipped in the\n"
        "`dashscope` PyPI wheel; do not edit by hand, re-run the script.\n"
        "Differs from upstream only in feature_extractor chunk_length (30 s instead of 300 s).\n",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiktoken", type=Path, help="qwen.tiktoken rank file (skips the dashscope download)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out")
    ap.add_argument("--no-verify", action="store_true", help="accept a rank file with another sha256")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    with tempfile.TemporaryDirectory(prefix="omnitrain-proc-") as tmp:
        tmp = Path(tmp)
        path = args.tiktoken or fetch_tiktoken(tmp)
        ranks = load_ranks(path, verify=not args.no_verify)
        if len(ranks) != N_RANKS:
            raise SystemExit(f"{path}: {len(ranks)} ranks, expected {N_RANKS}")
        target = tmp / "built" if args.check else args.out
        build(target, ranks)
        self_check(target, ranks)
        if args.check:
            names = sorted(p.name for p in args.out.iterdir()) if args.out.exists() else []
            built = sorted(p.name for p in target.iterdir())
            _, mismatch, errors = filecmp.cmpfiles(args.out, target, built, shallow=False)
            if names != built or mismatch or errors:
                print(f"DIFFERENT: files {names} vs {built}; content differs: {mismatch + errors}")
                return 1
            print(f"identical: {len(built)} files in {args.out}")
        else:
            total = sum(p.stat().st_size for p in target.iterdir())
            print(f"wrote {target} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
