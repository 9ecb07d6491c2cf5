"""Chat template -> token ids and labels (pure; the tokenizer is passed in).

ChatML (every family here): `<|im_start|>role\\n...<|im_end|>\\n`. Labels mark the
assistant's answer and its `<|im_end|>`; media tokens never carry labels.
Each media placeholder is replaced by the ids the caller computed for it, so
token counts come from the processed features, never from a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from omnitrain.data.formats import PLACEHOLDER_RE

IGNORE = -100


@dataclass
class MediaRef:
    """One placeholder occurrence, in order of appearance."""

    kind: str  # image | video | audio
    index: int  # position in the sample's list of that kind
    paired_audio: Optional[int] = None  # video: index of the <audio> it absorbs
    absorbed: bool = False  # audio: consumed by the preceding <video>
    own_track: bool = False  # video: interleave its own soundtrack


def plan_media(turns: Sequence[Tuple[str, str]], use_audio_in_video: bool) -> List[MediaRef]:
    """Placeholder occurrences in order, with video/audio pairing resolved.

    With use_audio_in_video, `<video>` followed (only whitespace between) by
    `<audio>` pairs the video with that audio file (LLaMA-Factory's
    convention); a lone `<video>` uses the video's own soundtrack.
    """
    refs: List[MediaRef] = []
    count = {"image": 0, "video": 0, "audio": 0}
    for _, text in turns:
        parts = PLACEHOLDER_RE.split(text)
        skip_next_audio = False
        for k in range(1, len(parts), 2):
            kind = parts[k][1:-1]
            ref = MediaRef(kind, count[kind])
            count[kind] += 1
            if kind == "audio" and skip_next_audio:
                ref.absorbed = True
                skip_next_audio = False
            elif kind == "video" and use_audio_in_video:
                nxt = parts[k + 2] if k + 2 < len(parts) else None
                if nxt == "<audio>" and parts[k + 1].strip() == "":
                    ref.paired_audio = count["audio"]
                    skip_next_audio = True
                else:
                    ref.own_track = True
            refs.append(ref)
    return refs


def render(
    turns: Sequence[Tuple[str, str]],
    system: Optional[str],
    placeholder_ids: Sequence[List[int]],
    encode: Callable[[str], List[int]],
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    add_generation_prompt: bool = False,
) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
    """Conversation -> (input_ids, labels, media spans [start, end)).

    `placeholder_ids[i]` replaces the i-th placeholder occurrence. With
    `add_generation_prompt` the conversation ends with a user turn and an
    open assistant turn (`<|im_start|>assistant\\n`) follows, as HF chat
    templates do for generation; nothing is labelled then.
    """
    pieces: List[Tuple[str, object, bool]] = []  # ("text", str, labelled) | ("media", ids, False)

    def text(s: str, labelled: bool) -> None:
        if pieces and pieces[-1][0] == "text" and pieces[-1][2] == labelled:
            pieces[-1] = ("text", pieces[-1][1] + s, labelled)
        elif s:
            pieces.append(("text", s, labelled))

    occurrence = iter(placeholder_ids)
    last_answer = max((j for j, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if system:
        text(f"<|im_start|>system\n{system}<|im_end|>\n", train_on_prompt)
    for j, (role, content) in enumerate(turns):
        answer = role == "assistant" and (not mask_history or j == last_answer)
        labelled = answer or train_on_prompt
        text(f"<|im_start|>{role}\n", train_on_prompt)
        parts = PLACEHOLDER_RE.split(content)
        for k, part in enumerate(parts):
            if k % 2 == 0:
                text(part, labelled)
            else:
                ids = next(occurrence)
                if ids:
                    pieces.append(("media", ids, False))
        text("<|im_end|>", labelled)
        text("\n", train_on_prompt)
    if add_generation_prompt:
        text("<|im_start|>assistant\n", False)

    input_ids: List[int] = []
    labels: List[int] = []
    spans: List[Tuple[int, int]] = []
    for kind, value, labelled in pieces:
        ids = encode(value) if kind == "text" else list(value)
        if kind == "media":
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids += ids
        labels += ids if labelled else [IGNORE] * len(ids)
    return input_ids, labels, spans
