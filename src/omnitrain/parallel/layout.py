"""Per-modality pipeline layout: check `parallel.pp.layers` and plan each stage.

Pure: a function from (pp size, per-module layer lists, module depths, schedule)
to one `StagePlan` per pipeline stage, or a `ConfigError` that names the key to
change. Nothing here imports a model; the modules and their depths come from
the model family (e.g. vision 32, audio 32, llm 28), the decoder last.

Order of the segments along the pipeline is fixed by the model's data flow:
encoders -> merge (embed tokens, scatter encoder features into their
placeholders, positions) -> LLM layers -> norm + head + loss.
So an encoder's layers must sit no later than the stage that holds LLM layer 0,
and the last stage must hold LLM layers.

With `virtual_stages` v > 1 the lists have pp.size x v entries, one per
virtual stage in pipeline order. Interleaved 1F1B runs virtual stage i on
rank i % pp.size; ZBV (v = 2) in a V: stage i < pp.size on rank i, stage
pp.size + j on rank pp.size - 1 - j (`pipeline.schedule.stage_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from omnitrain.config import ConfigError
from omnitrain.pipeline.schedule import SCHEDULES, placement_of, stage_rank

LLM = "llm"  # the decoder module's name in every family

_KEY = "parallel.pp.layers"


@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage builds and runs.

    `layers[module]` is the half-open range of that module's layers on this
    stage (empty when it holds none). A module's `pre` part (encoder: patch /
    conv embedding; decoder: the merge of embeddings and encoder features)
    runs on the first stage holding its layers, its `post` part (encoder:
    merger / projection; decoder: norm, head and loss) on the last.
    """

    index: int  # position in the pipeline (virtual stage when interleaved)
    rank: int  # pipeline rank that runs it
    num_stages: int
    layers: Mapping[str, range] = field(hash=False)
    pre: frozenset = frozenset()
    post: frozenset = frozenset()
    decoder: str = LLM

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def merge(self) -> bool:
        return self.decoder in self.pre

    @property
    def head(self) -> bool:
        return self.decoder in self.post

    def has(self, module: str) -> bool:
        """Whether this stage runs any segment of `module`."""
        return len(self.layers.get(module, range(0))) > 0 or module in self.pre or module in self.post


def whole_plan(depths: Mapping[str, int], decoder: str = LLM) -> StagePlan:
    """Everything on one stage."""
    present = frozenset(m for m, d in depths.items() if d)
    return StagePlan(0, 0, 1, {m: range(d) for m, d in depths.items()}, present, present, decoder)


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
    if schedule == "zbv" and v != 2:
        raise ConfigError(
            f"parallel.pp.schedule=zbv runs two stages per rank in a V: set parallel.pp.virtual_stages=2 (got {v}) "
            "and give parallel.pp.layers lists of 2 x parallel.pp.size entries"
        )
    if schedule not in ("interleaved_1f1b", "zbv") and v != 1:
        raise ConfigError(
            f"parallel.pp.virtual_stages={v} needs parallel.pp.schedule=interleaved_1f1b or zbv "
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


def _normalise(layers: Mapping[str, list[int]], depths: Mapping[str, int], n: int, what: str, model: str) -> dict[str, list[int]]:
    unknown = sorted(set(layers) - set(depths))
    if unknown:
        raise ConfigError(
            f"{_KEY}.{unknown[0]}: {model} has no {unknown[0]} module; its modules are {', '.join(depths)}: "
            f"remove {_KEY}.{unknown[0]}"
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
        try:
            counts = [int(c) for c in counts]
        except (TypeError, ValueError):
            raise ConfigError(f"{_KEY}.{mod}={counts!r}: give a list of layer counts, one per stage") from None
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
    model: str = "this model",
) -> list[StagePlan]:
    """Check a per-module layer split and return one StagePlan per (virtual) stage.

    `depths` maps module name -> layer count, encoders in data-flow order;
    it must contain "llm" (the decoder: merge, head and loss hang off it).
    A module with depth 0 needs no list and gets no segments. Raises ConfigError.
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
    counts = _normalise(layers, depths, n, what, model)

    llm = counts[LLM]
    if not llm[-1]:
        raise ConfigError(
            f"{_KEY}.{LLM}={llm}: the last stage must hold LLM layers (norm, head and loss follow the "
            "last LLM layer); move layers to the last entry"
        )
    merge_stage = next(s for s in range(n) if llm[s])
    for enc, c in counts.items():
        if enc == LLM or not any(c):
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
    holders = {mod: [i for i in range(n) if c[i]] for mod, c in counts.items()}
    for s in range(n):
        rngs = {}
        for mod, c in counts.items():
            rngs[mod] = range(start[mod], start[mod] + c[s])
            start[mod] += c[s]
        pre = frozenset(m for m, h in holders.items() if h and s == h[0])
        post = frozenset(m for m, h in holders.items() if h and s == h[-1])
        rank = stage_rank(s, pp_size, placement_of(schedule))
        plans.append(StagePlan(index=s, rank=rank, num_stages=n, layers=rngs, pre=pre, post=post, decoder=LLM))
    return plans
