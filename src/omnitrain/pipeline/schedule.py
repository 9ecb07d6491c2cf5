"""Pipeline schedules as pure per-rank action lists, and a simulator.

An action is (op, micro-batch, stage): op "F" runs a stage's forward on one
micro-batch, "B" its backward. Zero-bubble schedules split the backward: "B"
then computes only the grads of the stage's inputs (what the previous stage
waits for) and "W" later the grads of its weights (which nobody waits for, so
it can fill the idle slots). Communication is implied by the action and is
what `omnitrain.pipeline.executor` does:

- F on a stage other than the first first receives the activations of the
  previous stage; F on a stage other than the last then sends its outputs on.
- B on a stage other than the last first receives the output grads from the
  next stage; B on a stage other than the first then sends its input grads back.
- Sends never block (isend; the executor waits for them at the end of the
  step). Receives block until the producing action has finished on the peer.
  Messages that arrive before they are needed are kept, so the order of
  messages on one link does not matter.

Stage s runs on rank `stage_rank(s, num_ranks, placement)`: with one stage
per rank that is rank s; with v virtual stages per rank (interleaved 1F1B)
rank r holds stages r, r + p, ..., r + (v-1) p (the looping placement of
Megatron-LM); ZBV places two stages per rank in a V: rank r holds stages r
and 2p - 1 - r, so the last stage (the loss) sits on rank 0 next to the first
and the turn from stage p - 1 to stage p stays on rank p - 1.

`simulate` replays a schedule under exactly those rules, finds deadlocks, and
reports the timeline and the peak number of micro-batches whose activations a
rank holds (forwarded, not yet backwarded; with a split backward, not yet
weight-backwarded: W needs them) - the memory a schedule costs.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple, Sequence


class Action(NamedTuple):
    op: str  # "F" | "B" | "W" (B is the whole backward unless the schedule has W actions)
    mb: int
    stage: int

    def __str__(self) -> str:
        return f"{self.op}{self.mb}@{self.stage}"


PLACEMENTS = ("loop", "v")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
SPLIT_BACKWARD = ("zero_bubble", "zbv")  # those with separate weight-grad (W) actions: `Schedule.splits_backward`


def placement_of(schedule: str) -> str:
    """How a schedule puts its stages on ranks: "v" for ZBV, else "loop"."""
    return "v" if schedule == "zbv" else "loop"


def stage_rank(stage: int, num_ranks: int, placement: str = "loop") -> int:
    """The rank that runs `stage`."""
    if placement == "v":
        return stage if stage < num_ranks else 2 * num_ranks - 1 - stage
    return stage % num_ranks


@dataclass(frozen=True)
class Schedule:
    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # one list per rank, in execution order
    placement: str = "loop"

    def rank_of(self, stage: int) -> int:
        return stage_rank(stage, self.num_ranks, self.placement)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == rank]

    @property
    def splits_backward(self) -> bool:
        """Whether B is input-grads only, with a separate W (weight-grads) action."""
        return any(a.op == "W" for acts in self.actions for a in acts)


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"need num_ranks >= 1, num_microbatches >= 1, virtual_stages >= 1; got {p}, {m}, {v}")


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards: peak in-flight m on every rank."""
    _check_sizes(p, m)
    acts = tuple(
        tuple(Action("F", i, r) for i in range(m)) + tuple(Action("B", i, r) for i in range(m)) for r in range(p)
    )
    return Schedule("gpipe", p, p, m, acts)


def _one_f_one_b(fwd: list[Action], bwd: list[Action], warmup: int) -> tuple[Action, ...]:
    """Warm-up forwards, then alternate one forward / one backward, then drain."""
    warmup = min(warmup, len(fwd))
    out = fwd[:warmup]
    for i in range(len(fwd) - warmup):
        out += [fwd[warmup + i], bwd[i]]
    out += bwd[len(fwd) - warmup :]
    return tuple(out)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r holds at most min(m, p - r) micro-batches."""
    _check_sizes(p, m)
    acts = tuple(
        _one_f_one_b(
            [Action("F", i, r) for i in range(m)], [Action("B", i, r) for i in range(m)], warmup=p - r - 1
        )
        for r in range(p)
    )
    return Schedule("1f1b", p, p, m, acts)


def _groups(m: int, p: int) -> list[int]:
    """Split m micro-batches into rounds of at least p (when m >= p), larger rounds first.

    Megatron-LM walks rounds of exactly p and so needs m % p == 0; rounds of
    p with a short last round deadlock. Rounds of >= p with the warm-up sized
    by the first (largest) round are deadlock-free for every m (see tests).
    """
    k = max(1, m // p)
    q, rem = divmod(m, k)
    return [q + (1 if i < rem else 0) for i in range(k)]


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B with v virtual stages per rank (after Megatron-LM).

    Each rank walks the micro-batches in rounds: all its chunks for one round
    (chunk 0 for every mb of the round, then chunk 1, ...) before the next
    round; backwards walk the chunks in reverse. The bubble shrinks v-fold
    (in time, for the same total work) at the cost of v times more messages
    and a warm-up of (v-1) x round + 2 (p-1-r) chunk activations.
    """
    _check_sizes(p, m, v)
    sizes = _groups(m, p)
    order = []
    start = 0
    for size in sizes:
        for c in range(v):
            order += [(mb, c) for mb in range(start, start + size)]
        start += size
    acts = []
    for r in range(p):
        fwd = [Action("F", mb, c * p + r) for mb, c in order]
        bwd = [Action("B", mb, (v - 1 - c) * p + r) for mb, c in order]
        acts.append(_one_f_one_b(fwd, bwd, warmup=interleaved_warmup(p, m, v, r)))
    return Schedule("interleaved_1f1b", p, p * v, m, tuple(acts))


def interleaved_warmup(p: int, m: int, v: int, rank: int) -> int:
    """Forward chunks `rank` runs before its first backward; its peak in-flight is min(this + 1, m v)."""
    return min((v - 1) * _groups(m, p)[0] + 2 * (p - 1 - rank), m * v)


def zero_bubble(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B's peak memory, a third of its bubble.

    Every rank keeps 1F1B's order of F and B; only the weight-grad passes
    (W) move: a rank runs one whenever its next F or B could not start yet
    (input not arrived) or would put more than min(m, p) micro-batches in
    flight (counted until their W: it needs the activations), and the rest
    at the end. min(m, p) is 1F1B's worst rank (rank 0), so the peak over
    ranks stays 1F1B's; later ranks hold more than under 1F1B (that is
    where the delayed W's come from). Input grads now travel one B (not
    B + W) per stage, which shortens the drain.

    The order comes from replaying the ranks in time with F = B = W (the
    paper's assumption). Any order the simulator accepts is deadlock-free
    for every cost (messages are the only dependencies), so other costs only
    move the bubbles. With F = B = W the bubble is (p - 1) x (F + B - W) =
    (p - 1) F instead of 1F1B's 3 (p - 1) F.
    """
    _check_sizes(p, m)
    order = one_f_one_b(p, m).actions
    limit = min(m, p)
    pos, nf, nb, nw = [0] * p, [0] * p, [0] * p, [0] * p
    clock = [0] * p  # unit costs: every event is at an integer time
    done: dict[Action, int] = {}  # F/B action -> end time
    acts: list[list[Action]] = [[] for _ in range(p)]
    while any(nw[r] < m for r in range(p)):
        # Advance the rank furthest behind in time: whatever it still waits
        # for ends after its clock, so a decision taken now is final.
        r = min((k for k in range(p) if nw[k] < m), key=lambda k: clock[k])
        t = clock[r]
        nxt = order[r][pos[r]] if pos[r] < len(order[r]) else None
        ready = None  # when nxt could start; None: not known yet, or not allowed now
        if nxt is not None and not (nxt.op == "F" and nf[r] - nw[r] >= limit):
            dep = _needs(nxt, p)
            ready = t if dep is None else done.get(dep)
        if ready is not None and ready <= t:
            acts[r].append(nxt)
            done[nxt] = t + 1
            pos[r] += 1
            nf[r] += nxt.op == "F"
            nb[r] += nxt.op == "B"
            clock[r] = t + 1
        elif nw[r] < nb[r]:  # would wait: fill the slot with a weight-grad pass
            acts[r].append(Action("W", nw[r], r))
            nw[r] += 1
            clock[r] = t + 1
        else:  # idle until the awaited message, or until another rank has moved on
            later = [clock[k] for k in range(p) if k != r and nw[k] < m and clock[k] > t]
            if ready is not None and ready > t:
                later.append(ready)
            clock[r] = min(later) if later else t + 1
    return Schedule("zero_bubble", p, p, m, tuple(tuple(a) for a in acts))


@functools.lru_cache(maxsize=64)  # built every step; replaying the rules takes ms
def zbv(p: int, m: int) -> Schedule:
    """ZBV (ZB-V of Qi et al.'s zero-bubble pipeline work; torch's
    ScheduleZBVZeroBubble): two chunks per rank in a V, the backward split
    into B and W.

    Rank r holds stages r and 2p - 1 - r (`stage_rank`, placement "v"), each
    half of a rank's layers. The V's turn (stage p - 1 to p) stays on rank
    p - 1 and the loss sits on rank 0, which starts every micro-batch, so the
    warm-up costs (p - 1) chunk forwards: half ZB-H1's, whose last rank waits
    (p - 1) whole-stage forwards. The lower bound with unit chunk costs is
    6m + p - 1 (the last rank's work after its first input).

    The order is a list schedule: the ranks are replayed in time with unit
    chunk costs (F = B = W) and the executor's one asymmetry (the first stage
    has no input grads to send: its B is empty, its W the whole backward).
    A free rank runs a ready B or F by a priority rule, else a pending W. A
    new micro-batch enters a rank only while it holds at most p started ones
    (counted until their last W): the peak is 2p + 2 half-stage activations,
    one micro-batch more than 1F1B's first rank; with p the order waits for
    memory (2 chunk forwards more on the bench's p = 4, m = 8). No single rule
    is best for every (p, m), so the few rules below are each replayed and
    the shortest order kept (a pure function still); on those costs it meets
    the bound for most p <= 8, m <= 16 and is never slower than ZB-H1 (tests).
    """
    _check_sizes(p, m)
    best = None
    for rule in itertools.product((False, True), repeat=3):
        s = _zbv_order(p, m, *rule)
        r = simulate(s, fwd=1.0, bwd=2.0, weight_share=[1.0] + [0.5] * (2 * p - 1))
        key = (r.makespan, max(r.peak_in_flight))
        if best is None or key < best[0]:
            best = (key, s)
    return best[1]


def _zbv_order(p: int, m: int, f_second_first: bool, b_second_first: bool, first_w_later: bool) -> Schedule:
    """One ZBV list schedule (see `zbv`). Priority of a ready action: B before
    F, the second chunk's F before the first's (its micro-batch is already
    inside), older micro-batches first; `f_second_first` puts the second
    chunk's F before every B, `b_second_first` the second chunk's B before
    the first's; `first_w_later` defers the first stage's W like the others
    (else it runs right after its empty B, freeing the activations)."""
    n = 2 * p
    chunks = [(r, n - 1 - r) for r in range(p)]
    clock = [0] * p
    done: dict[Action, int] = {}  # F/B action -> end time
    acts: list[list[Action]] = [[] for _ in range(p)]
    nf = [[0, 0] for _ in range(p)]  # per rank and chunk: micro-batches forwarded
    nb = [[0, 0] for _ in range(p)]  # ... and backwarded
    freed = [0] * p  # W's run: each frees one chunk activation
    pending: list[list[Action]] = [[] for _ in range(p)]  # B's whose W has not run
    total = 6 * m  # actions per rank

    def cost(a: Action) -> int:
        if a.stage == 0 and a.op != "F":
            return 0 if a.op == "B" else 2
        return 1

    def priority(op: str, c: int, mb: int) -> tuple:
        if op == "B":
            return (f_second_first, -c if b_second_first else c, mb)
        return (0 if f_second_first and c else 1 if c else 2, 0, mb)

    while any(len(a) < total for a in acts):
        r = min((k for k in range(p) if len(acts[k]) < total), key=lambda k: clock[k])
        t = clock[r]
        ready, later = [], []
        for c, st in enumerate(chunks[r]):
            for op, k in (("B", nb[r][c]), ("F", nf[r][c])):
                if k >= m or (op == "B" and k >= nf[r][c]):
                    continue
                if op == "F" and c == 0 and 2 * nf[r][0] - freed[r] > 2 * p:  # p + 1 micro-batches started
                    continue
                a = Action(op, k, st)
                dep = _needs(a, n)
                at = t if dep is None else done.get(dep)
                if at is not None and at <= t:
                    ready.append((priority(op, c, k), a))
                elif at is not None:
                    later.append(at)
        if ready:
            a = min(ready)[1]
            c = int(a.stage != chunks[r][0])
            acts[r].append(a)
            clock[r] = done[a] = t + cost(a)
            if a.op == "F":
                nf[r][c] += 1
                continue
            nb[r][c] += 1
            pending[r].append(a)
            if a.stage != 0 or first_w_later:
                continue
        if pending[r]:  # nothing ready (or the first stage's empty B just ran): a weight-grad pass
            b = pending[r].pop() if ready else pending[r].pop(0)  # the first stage's just-run B, else the oldest
            w = Action("W", b.mb, b.stage)
            acts[r].append(w)
            clock[r] += cost(w)
            freed[r] += 1
        else:  # idle until an awaited message, or until another rank moves on
            later += [clock[k] for k in range(p) if k != r and len(acts[k]) < total and clock[k] > t]
            clock[r] = min(later) if later else t + 1
    return Schedule("zbv", p, n, m, tuple(tuple(a) for a in acts), placement="v")


def build(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    if name == "gpipe":
        return gpipe(num_ranks, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(num_ranks, num_microbatches)
    if name == "interleaved_1f1b":
        return interleaved_1f1b(num_ranks, num_microbatches, virtual_stages)
    if name == "zero_bubble":
        return zero_bubble(num_ranks, num_microbatches)
    if name == "zbv":
        if virtual_stages not in (1, 2):
            raise ValueError(f"zbv runs 2 stages per rank, got virtual_stages={virtual_stages}")
        return zbv(num_ranks, num_microbatches)
    raise ValueError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")


# --------------------------------------------------------------------------- simulator


class DeadlockError(RuntimeError):
    """No rank can make progress; the message says what each stuck rank waits for."""


@dataclass(frozen=True)
class SimResult:
    makespan: float
    peak_in_flight: tuple[int, ...]  # per rank: max (micro-batch, stage) pairs forwarded, not yet (weight-)backwarded
    timeline: tuple[tuple[tuple[float, float, Action], ...], ...]  # per rank: (start, end, action)
    busy: tuple[float, ...]  # per rank: compute time

    @property
    def bubble(self) -> tuple[float, ...]:
        return tuple(self.makespan - b for b in self.busy)


def check(schedule: Schedule) -> None:
    """Every (micro-batch, stage) has one F and one B (and one W if any), on the stage's rank, in that order."""
    s = schedule
    split = s.splits_backward
    if len(s.actions) != s.num_ranks:
        raise ValueError(f"{s.name}: {len(s.actions)} action lists for {s.num_ranks} ranks")
    seen = set()
    for r, acts in enumerate(s.actions):
        for a in acts:
            if a.op not in ("F", "B", "W") or not 0 <= a.mb < s.num_microbatches or not 0 <= a.stage < s.num_stages:
                raise ValueError(f"{s.name}: rank {r} has an invalid action {a}")
            if s.rank_of(a.stage) != r:
                raise ValueError(f"{s.name}: {a} is on rank {r}, but stage {a.stage} runs on rank {s.rank_of(a.stage)}")
            if a in seen:
                raise ValueError(f"{s.name}: {a} appears twice")
            if a.op == "B" and Action("F", a.mb, a.stage) not in seen:
                raise ValueError(f"{s.name}: rank {r} runs {a} before its forward")
            if a.op == "W" and Action("B", a.mb, a.stage) not in seen:
                raise ValueError(f"{s.name}: rank {r} runs {a} before its input-grad backward")
            seen.add(a)
    want = (3 if split else 2) * s.num_microbatches * s.num_stages
    if len(seen) != want:
        raise ValueError(f"{s.name}: {len(seen)} actions, expected {want}")


def _needs(a: Action, num_stages: int) -> Action | None:
    """The action on another stage whose message `a` waits for, if any."""
    if a.op == "F":
        return Action("F", a.mb, a.stage - 1) if a.stage > 0 else None
    if a.op == "W":  # local: the rank's own B came before it (check)
        return None
    return Action("B", a.mb, a.stage + 1) if a.stage < num_stages - 1 else None


def simulate(
    schedule: Schedule,
    *,
    fwd: float | Sequence[float] = 1.0,
    bwd: float | Sequence[float] = 2.0,
    latency: float = 0.0,
    weight_share: float | Sequence[float] = 0.5,
) -> SimResult:
    """Replay `schedule` with per-stage forward/backward costs; raise DeadlockError if it hangs.

    `bwd` is a stage's whole backward; a schedule that splits it spends
    `weight_share` of it in W and the rest in B, so split and unsplit
    schedules compare on the same work. `latency` is added to every message
    between different ranks.
    """
    check(schedule)
    n = schedule.num_stages
    f = [fwd] * n if isinstance(fwd, (int, float)) else list(fwd)
    b = [bwd] * n if isinstance(bwd, (int, float)) else list(bwd)
    split = schedule.splits_backward
    share = [weight_share] * n if isinstance(weight_share, (int, float)) else list(weight_share)
    w = [x * y for x, y in zip(b, share)] if split else [0.0] * n
    b = [x - y for x, y in zip(b, w)]
    cost = {"F": f, "B": b, "W": w}
    release = "W" if split else "B"  # the action after which a micro-batch's activations are freed
    p = schedule.num_ranks
    done: dict[Action, float] = {}
    pos = [0] * p
    clock = [0.0] * p
    in_flight = [0] * p
    peak = [0] * p
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            acts = schedule.actions[r]
            while pos[r] < len(acts):
                a = acts[pos[r]]
                dep = _needs(a, n)
                ready = clock[r]
                if dep is not None:
                    if dep not in done:
                        break
                    hop = latency if schedule.rank_of(dep.stage) != r else 0.0
                    ready = max(ready, done[dep] + hop)
                end = ready + cost[a.op][a.stage]
                done[a] = end
                clock[r] = end
                timeline[r].append((ready, end, a))
                in_flight[r] += 1 if a.op == "F" else -1 if a.op == release else 0
                peak[r] = max(peak[r], in_flight[r])
                pos[r] += 1
                progress = True
    stuck = [r for r in range(p) if pos[r] < len(schedule.actions[r])]
    if stuck:
        waits = "; ".join(
            f"rank {r} at {schedule.actions[r][pos[r]]} waits for {_needs(schedule.actions[r][pos[r]], n)}"
            for r in stuck
        )
        raise DeadlockError(f"{schedule.name} (p={p}, m={schedule.num_microbatches}) deadlocks: {waits}")
    busy = tuple(sum(e - s for s, e, _ in tl) for tl in timeline)
    return SimResult(
        makespan=max(clock),
        peak_in_flight=tuple(peak),
        timeline=tuple(tuple(tl) for tl in timeline),
        busy=busy,
    )
