"""Per-modality pipeline layout: check `parallel.pp.layers` and plan each stage.

Pure: a function from (pp size, per-module layer lists, module depths, schedule)
to one `StagePlan` per pipeline stage, or a `ConfigError` that names the key to
change. Nothing here imports a model; depths come from the model adapter
(Qwen2.5-Omni's thinker: vision 32, audio 32, llm 28).

Order of the segments along the pipeline is fixed by the model's data flow:
encoders (vision, audio) -> merge (embed tokens, scatter encoder features into
their placeholders, 3-D rope positions) -> LLM layers -> norm + head + loss.
So an encoder's layers must sit no later than the stage that holds LLM layer 0,
and the last stage must hold LLM layers.

With `virtual_stages` v > 1 (interleaved 1F1B) the lists have pp.size x v
entries, one per virtual stage in pipeline order; virtual stage i runs on rank
i % pp.size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from omnitrain.config import ConfigError

ENCODERS = ("vision", "audio")
LLM = "llm"
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

_KEY = "parallel.pp.layers"


@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage builds and runs.

    `layers[module]` is the half-open range of that module's layers on this
    stage (empty when it holds none). The flags place the non-layer segments.
    """

    index: int  # position in the pipeline (virtual stage when interleaved)
    rank: int  # pipeline rank that runs it
    num_stages: int
    layers: Mapping[str, range] = field(hash=False)
    vision_pre: bool = False  # patch_embed + rotary: first stage with vision layers
    vision_post: bool = False  # merger: last stage with vision layers
    audio_pre: bool = False  # conv1/conv2 + positional embedding: first stage with audio layers
    audio_post: bool = False  # ln_post + avg_pooler + proj: last stage with audio layers
    merge: bool = False  # embed tokens + scatter features + 3-D rope: stage with LLM layer 0
    head: bool = False  # norm + lm_head + loss: the last stage

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def has(self, module: str) -> bool:
        return len(self.layers.get(module, range(0))) > 0


def even_split(depth: int, pp: int) -> list[int]:
    """`depth` layers over `pp` stages as evenly as possible.

    The remainder goes to the first stages: the last stage also carries the
    norm, the (vocab-sized) head and the loss.
    """
    if pp < 1 or depth < 0:
        raise ValueError(f"even_split(depth={depth}, pp={pp}): need depth >= 0 and pp >= 1")
    q, r = divmod(depth, pp)
    return [q + (1 if i < r else 0) for i in range(pp)]


def _check_schedule(pp_size: int, m: int, schedule: str, v: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if v < 1:
        raise ConfigError(f"parallel.pp.virtual_stages={v}: must be >= 1")
    if schedule == "interleaved_1f1b" and v < 2:
        raise ConfigError(
            "parallel.pp.schedule=interleaved_1f1b needs parallel.pp.virtual_stages >= 2 "
            "(with 1 it is plain 1f1b: use parallel.pp.schedule=1f1b)"
        )
    if schedule != "interleaved_1f1b" and v != 1:
        raise ConfigError(
            f"parallel.pp.virtual_stages={v} needs parallel.pp.schedule=interleaved_1f1b "
            f"(got {schedule}): set virtual_stages=1 or change the schedule"
        )
    if m < 1:
        raise ConfigError(
            f"{m} micro-batches per step: need >= 1 (train.global_batch_size / (train.micro_batch_size x dp))"
        )
    # 1F1B and interleaved are correct for any m (the simulator proves it), but
    # with m < pp.size the warm-up never ends: the run is GPipe with a bubble
    # over half the step, so asking for 1F1B then is a configuration mistake.
    if schedule != "gpipe" and m < pp_size:
        raise ConfigError(
            f"parallel.pp.schedule={schedule} needs at least parallel.pp.size={pp_size} micro-batches "
            f"per step, got {m} (= train.global_batch_size / (train.micro_batch_size x dp)): raise "
            "train.global_batch_size, lower train.micro_batch_size, or use parallel.pp.schedule=gpipe"
        )


def _normalise(layers: Mapping[str, list[int]], depths: Mapping[str, int], n: int, what: str) -> dict[str, list[int]]:
    unknown = sorted(set(layers) - set(depths))
    if unknown:
        raise ConfigError(
            f"{_KEY}.{unknown[0]}: unknown module; this model has {', '.join(depths)}"
        )
    out = {}
    for mod, depth in depths.items():
        counts = layers.get(mod)
        if counts is None:
            if depth:
                raise ConfigError(
                    f"{_KEY}.{mod} is missing: the model has {depth} {mod} layers; "
                    f"give a list of {what} entries summing to {depth}"
                )
            counts = [0] * n
        counts = [int(c) for c in counts]
        if len(counts) != n:
            raise ConfigError(
                f"{_KEY}.{mod} has {len(counts)} entries, need {what}: one per stage"
            )
        neg = [i for i, c in enumerate(counts) if c < 0]
        if neg:
            raise ConfigError(f"{_KEY}.{mod}[{neg[0]}]={counts[neg[0]]}: layer counts must be >= 0")
        if sum(counts) != depth:
            raise ConfigError(
                f"{_KEY}.{mod}={counts} sums to {sum(counts)}, but the model has {depth} {mod} layers: "
                f"make the entries sum to {depth}"
            )
        out[mod] = counts
    return out


def validate_layout(
    pp_size: int,
    layers: Mapping[str, list[int]] | None,
    depths: Mapping[str, int],
    *,
    num_microbatches: int,
    schedule: str,
    virtual_stages: int = 1,
) -> list[StagePlan]:
    """Check a per-module layer split and return one StagePlan per (virtual) stage.

    `depths` maps module name -> layer count; it must contain "llm" (the
    decoder: merge, head and loss hang off it). A module with depth 0 (a model
    without audio) needs no list and gets no segments. Raises ConfigError.
    """
    if pp_size < 1:
        raise ConfigError(f"parallel.pp.size={pp_size}: must be >= 1")
    if depths.get(LLM, 0) < 1:
        raise ConfigError(f"the model reports {depths.get(LLM, 0)} {LLM} layers: the pipeline needs an LLM")
    v = virtual_stages
    n = pp_size * v
    what = f"parallel.pp.size={pp_size}" if v == 1 else f"parallel.pp.size x parallel.pp.virtual_stages = {n}"
    _check_schedule(pp_size, num_microbatches, schedule, v)

    if layers is None:
        if n != 1:
            raise ConfigError(
                f"{_KEY} is null (everything on one stage) but {what}: give "
                f"{', '.join(f'{_KEY}.{m}' for m in depths)} lists with {n} entries each"
            )
        layers = {mod: [d] for mod, d in depths.items()}
    counts = _normalise(layers, depths, n, what)

    llm = counts[LLM]
    if not llm[-1]:
        raise ConfigError(
            f"{_KEY}.{LLM}={llm}: the last stage must hold LLM layers (norm, head and loss follow the "
            "last LLM layer); move layers to the last entry"
        )
    merge_stage = next(s for s in range(n) if llm[s])
    for enc in ENCODERS:
        c = counts.get(enc)
        if not c:
            continue
        late = [s for s in range(merge_stage + 1, n) if c[s]]
        if late:
            raise ConfigError(
                f"{_KEY}.{enc}={c}: {enc} layers on stage {late[0]}, after stage {merge_stage} which holds "
                f"LLM layer 0 (the merge); encoder output must flow forward, so move them to stage "
                f"{merge_stage} or earlier"
            )
    empty = [s for s in range(n) if not any(c[s] for c in counts.values())]
    if empty:
        raise ConfigError(
            f"{_KEY}: stage {empty[0]} holds no layers of any module; every stage needs at least one "
            f"(move layers there or lower parallel.pp.size)"
        )

    plans = []
    start = {mod: 0 for mod in counts}
    for s in range(n):
        rngs = {}
        for mod, c in counts.items():
            rngs[mod] = range(start[mod], start[mod] + c[s])
            start[mod] += c[s]
        flags = {}
        for enc in ENCODERS:
            c = counts.get(enc, [0] * n)
            holders = [i for i in range(n) if c[i]]
            flags[f"{enc}_pre"] = bool(holders) and s == holders[0]
            flags[f"{enc}_post"] = bool(holders) and s == holders[-1]
        plans.append(
            StagePlan(
                index=s,
                rank=s % pp_size,
                num_stages=n,
                layers=rngs,
                merge=s == merge_stage,
                head=s == n - 1,
                **flags,
            )
        )
    return plans
