"""Synthetic samples and micro-batches with the exact layout the data pipeline
produces, so model and parallel tests run without decoding media. Sequence
length, image/video grids and audio lengths vary per sample like real data,
and every sample is generated from its own index: any grouping of samples
into micro-batches (any layout) sees the same data.
"""

from __future__ import annotations

import itertools

import torch

IMAGE, VIDEO, AUDIO = 151655, 151656, 151646
V_START, V_END, A_START, A_END = 151652, 151653, 151647, 151648
IM_START, IM_END, PAD = 151644, 151645, 151643
PATCH_DIM, MEL = 1176, 128

KINDS = [
    dict(image=(1, 4, 4)),
    dict(audio=180),
    dict(video=(2, 4, 4), text=8),
    dict(image=(1, 4, 8), audio=240, text=16),
    dict(text=20),
    dict(image=(1, 8, 4), video=(2, 4, 8), audio=120),
]

# Vision-language families (no audio): images, videos, both, and text-only
# samples; two text-only kinds in a row, so that micro-batches of 2 include one
# without any media. spg = a video's seconds per temporal patch (Qwen2.5-VL
# spaces its rope positions by it). The (1, 12, 8) image is 6 x 4 merged
# tokens: two of Qwen2.5-VL's 4 x 4 attention windows, one of them partial.
KINDS_VL = [
    dict(image=(1, 4, 4)),
    dict(video=(2, 4, 8), text=8, spg=0.5),
    dict(text=20),
    dict(text=10),
    dict(image=(1, 12, 8), video=(2, 4, 4), text=16, spg=1.5),
    dict(image=(1, 8, 4), text=6),
    dict(video=(3, 4, 4), text=4),
]


def _audio_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _aut_tokens(frames: int) -> int:
    """Qwen3-Omni's AuT: 100-frame chunks, 13 tokens per whole chunk."""
    rest = (frames % 100 - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13


# Qwen3 families: patch 16 (3 x 2 x 16 x 16 values per patch); Qwen3-Omni's audio ids and AuT lengths;
# Qwen3-VL wraps each temporal patch of a video in vision start/end after a timestamp.
Q3_PATCH_DIM = 1536
Q3_OMNI = dict(patch_dim=Q3_PATCH_DIM, audio_ids=(151675, 151669, 151670), aut=True)
Q3_VL = dict(patch_dim=Q3_PATCH_DIM, frames=True)
KINDS_Q3_OMNI = [{**k, **Q3_OMNI} for k in KINDS]
KINDS_Q3_VL = [{**k, **Q3_VL} for k in KINDS_VL]


def sample(index: int, *, image=None, video=None, audio=None, text=12, spg=1.0, vocab=150000,
           patch_dim=PATCH_DIM, audio_ids=(AUDIO, A_START, A_END), aut=False, frames=False) -> dict:
    """One sample: image/video = (t,h,w) patch grid, audio = mel frames,
    spg = the video's seconds per grid."""
    g = torch.Generator().manual_seed(1000 + index)
    ids = [IM_START] + torch.randint(0, vocab, (3,), generator=g).tolist()
    s = {}
    if image is not None:
        ids += [V_START] + [IMAGE] * (image[0] * image[1] * image[2] // 4) + [V_END]
        s["image"] = (image, torch.randn(image[0] * image[1] * image[2], patch_dim, generator=g))
    if video is not None:
        per_t = video[1] * video[2] // 4
        if frames:  # "<t seconds>" as 3 text tokens before each frame
            for _ in range(video[0]):
                ids += torch.randint(0, vocab, (3,), generator=g).tolist() + [V_START] + [VIDEO] * per_t + [V_END]
        else:
            ids += [V_START] + [VIDEO] * (video[0] * per_t) + [V_END]
        s["video"] = (video, torch.randn(video[0] * video[1] * video[2], patch_dim, generator=g))
        s["spg"] = float(spg)
    if audio is not None:
        a_tok, a_start, a_end = audio_ids
        ids += [a_start] + [a_tok] * (_aut_tokens(audio) if aut else _audio_tokens(audio)) + [a_end]
        s["audio"] = torch.randn(MEL, audio, generator=g)
    prompt = len(ids) + 4
    ids += torch.randint(0, vocab, (2,), generator=g).tolist() + [IM_END, IM_START]
    ids += torch.randint(0, vocab, (text,), generator=g).tolist() + [IM_END]
    s["ids"], s["labels"] = ids, [-100] * prompt + ids[prompt:]
    return s


def collate(samples: list[dict]) -> dict:
    B, S = len(samples), max(len(s["ids"]) for s in samples)
    mb = {
        "input_ids": torch.full((B, S), PAD, dtype=torch.long),
        "attention_mask": torch.zeros((B, S), dtype=torch.long),
        "labels": torch.full((B, S), -100, dtype=torch.long),
    }
    for b, s in enumerate(samples):
        n = len(s["ids"])
        mb["input_ids"][b, :n] = torch.tensor(s["ids"])
        mb["labels"][b, :n] = torch.tensor(s["labels"])
        mb["attention_mask"][b, :n] = 1
    for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        items = [s[kind] for s in samples if kind in s]
        if items:
            mb[pix] = torch.cat([p for _, p in items])
            mb[grid] = torch.tensor([g for g, _ in items])
            if kind == "video":
                mb["video_second_per_grid"] = torch.tensor([s["spg"] for s in samples if kind in s])
    auds = [s["audio"] for s in samples if "audio" in s]
    if auds:
        T = max(a.shape[1] for a in auds)
        mb["input_features"] = torch.zeros(len(auds), MEL, T)
        mb["feature_attention_mask"] = torch.zeros(len(auds), T, dtype=torch.long)
        for i, a in enumerate(auds):
            mb["input_features"][i, :, : a.shape[1]] = a
            mb["feature_attention_mask"][i, : a.shape[1]] = 1
    mb["use_audio_in_video"] = torch.zeros(B, dtype=torch.bool)
    return mb


def samples(n: int, offset: int = 0, kinds=None) -> list[dict]:
    kinds = kinds or KINDS
    return [sample(i, **kinds[i % len(kinds)]) for i in range(offset, offset + n)]


def micro_batches(n: int, batch: int = 1, kinds=None) -> list[dict]:
    s = samples(n * batch, kinds=kinds)
    return [collate(s[i * batch : (i + 1) * batch]) for i in range(n)]


class SynthLoader:
    """Same contract as omnitrain.data.build_loader: global step k uses samples
    [k*G, (k+1)*G); dp rank r takes its slice, in micro-batches. Its state is
    the number of micro-batches handed out, so resume tests can use it."""

    def __init__(self, *, global_batch_size, micro_batch_size, dp_rank=0, dp_size=1, kinds=None):
        self.G, self.mbs, self.r, self.dp = global_batch_size, micro_batch_size, dp_rank, dp_size
        self.kinds = kinds or KINDS
        self.micro_step = 0

    @property
    def per_step(self) -> int:
        return self.G // (self.mbs * self.dp)

    def __iter__(self):
        per_rank = self.G // self.dp
        k, j0 = divmod(self.micro_step, self.per_step)
        while True:
            start = k * self.G + self.r * per_rank
            ss = [sample(i, **self.kinds[i % len(self.kinds)]) for i in range(start, start + per_rank)]
            for j in range(j0 * self.mbs, per_rank, self.mbs):
                self.micro_step += 1
                yield collate(ss[j : j + self.mbs])
            k, j0 = k + 1, 0

    def iterate(self, limit=None):
        """The loader protocol's bounded iteration (the trainer's evaluation uses it)."""
        return itertools.islice(iter(self), limit)

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "global_batch_size": self.G, "per_step": self.per_step}

    def load_state_dict(self, state: dict) -> None:
        # Another dp/micro layout maps by global step, as the real loader does.
        assert state["global_batch_size"] == self.G, state
        step, rest = divmod(state["micro_step"], state["per_step"])
        assert rest == 0 or state["per_step"] == self.per_step, state
        self.micro_step = step * self.per_step + rest
