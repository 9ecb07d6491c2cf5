"""Choosing a layout: the per-module split that minimises the slowest stage
(`parallel.pp.layers=auto`), and pp / TP / micro-batch sizes for a world
size (`parallel=auto`).

With additive per-layer costs the sum of the stage times does not depend on
the split, so a pipeline step (fill + (m - 1) x slowest stage + drain) is
shortest when the slowest stage is: `best_split` minimises that exactly, by
dynamic programming over the stages, under the layout rules of
parallel/layout.py (each stage holds layers, encoders end no later than the
stage holding LLM layer 0, the last stage holds LLM layers) and a memory cap
per rank. States are the encoder layers placed so far (at most 33 x 33 for
two 32-layer encoders), then the LLM layers placed; numpy does one stage's
transitions at once. Ties go to the first minimum (deterministic).

`exhaustive` is an independent branch-and-bound over every valid split,
used by scripts/bench_balance.py to check that `best_split` is optimal.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from omnitrain.plan.cost import CostModel, in_flight

INF = math.inf


@dataclass(frozen=True)
class ModuleCosts:
    """A module's per-layer stage costs (fwd + bwd seconds), state and activation bytes."""

    t: np.ndarray  # per layer
    s: np.ndarray
    a: np.ndarray
    pre: tuple[float, float, float]  # (t, s, a) of the pre part, on the stage of its first layer
    post: tuple[float, float, float]
    call: float  # per stage that runs the module

    @property
    def depth(self) -> int:
        return len(self.t)

    def range_cost(self, lo: int, hi: int) -> tuple[float, float, float]:
        """(time, state, act) of layers [lo, hi) on one stage (0 when empty)."""
        if hi <= lo:
            return 0.0, 0.0, 0.0
        t = float(self.t[lo:hi].sum()) + self.call
        s = float(self.s[lo:hi].sum())
        a = float(self.a[lo:hi].sum())
        for (pt, ps, pa), on in ((self.pre, lo == 0), (self.post, hi == self.depth)):
            if on:
                t, s, a = t + pt, s + ps, a + pa
        return t, s, a

    def matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[lo, hi] -> range_cost (inf where hi < lo)."""
        n = self.depth + 1
        out = [np.full((n, n), INF), np.full((n, n), INF), np.full((n, n), INF)]
        for lo in range(n):
            for hi in range(lo, n):
                for x, v in zip(out, self.range_cost(lo, hi)):
                    x[lo, hi] = v
        return tuple(out)


def module_costs(cm: CostModel) -> dict[str, ModuleCosts]:
    out = {}
    for m in cm.family.module_names:
        d = cm.family.depths[m]

        def trio(key):
            if key not in cm.fwd:
                return 0.0, 0.0, 0.0
            return cm.fwd[key] + cm.bwd[key], cm.state[key], cm.act[key]

        rows = [trio((m, "layer", i)) for i in range(d)]
        t, s, a = (np.array([r[j] for r in rows], dtype=float) for j in range(3))
        out[m] = ModuleCosts(t, s, a, trio((m, "pre", -1)), trio((m, "post", -1)), cm.call_fwd[m] + cm.call_bwd[m])
    return out


def best_split(cm: CostModel, pp: int, *, schedule: str, m: int, memory_cap: float | None = None) -> dict[str, list[int]] | None:
    """The split (module -> layers per stage) with the smallest slowest stage,
    or None when no split fits `memory_cap` bytes per rank."""
    fam = cm.family
    mc = module_costs(cm)
    encs = [e for e in fam.encoders if fam.depths[e]]
    dec = fam.decoder
    L = fam.depths[dec]
    cap = INF if memory_cap is None else memory_cap
    fl = [in_flight(schedule, pp, m, r) for r in range(pp)]
    shape = tuple(fam.depths[e] + 1 for e in encs)
    nstate = int(np.prod(shape)) if encs else 1
    states = list(itertools.product(*(range(n) for n in shape))) if encs else [()]
    full = nstate - 1

    # Per encoder state pair (from, to): summed time, state and activation bytes of one stage,
    # from-state axes first, then to-state axes.
    T = S = A = np.zeros((1, 1))
    if encs:
        T = np.zeros(shape + shape)
        S = np.zeros(shape + shape)
        A = np.zeros(shape + shape)
        k = len(encs)
        for i, e in enumerate(encs):
            mt, ms, ma = mc[e].matrices()
            view = [1] * (2 * k)
            view[i], view[k + i] = shape[i], shape[i]
            T = T + mt.reshape(view)
            S = S + ms.reshape(view)
            A = A + ma.reshape(view)
        T, S, A = (x.reshape(nstate, nstate) for x in (T, S, A))
        np.fill_diagonal(T, INF)  # a stage with no layers

    # LLM ranges: time, state, act of layers [lo, hi) with the merge on lo == 0 and the head on hi == L.
    lt, ls, la = mc[dec].matrices()

    # f[s][state]: best bottleneck over the first s stages, encoders only, ending in `state`.
    f = np.full(nstate, INF)
    f[0] = 0.0
    f_hist, f_back = [f], []
    # g[l]: best bottleneck with encoders complete and l >= 1 LLM layers placed.
    g = np.full(L + 1, INF)
    g_hist, g_back = [], []
    for s in range(pp):
        mem_ok = lambda st, ac: st + fl[s] * ac <= cap  # noqa: E731
        # merge stage s: encoders from `frm` to full, LLM 0..l
        g_new = np.full(L + 1, INF)
        back = [None] * (L + 1)
        enc_t = T[:, full] if encs else np.zeros(1)
        enc_s = S[:, full] if encs else np.zeros(1)
        enc_a = A[:, full] if encs else np.zeros(1)
        if encs:
            enc_t = np.where(np.arange(nstate) == full, 0.0, enc_t)  # encoders already done: nothing of theirs here
            enc_s = np.where(np.arange(nstate) == full, 0.0, enc_s)
            enc_a = np.where(np.arange(nstate) == full, 0.0, enc_a)
        for l in range(1, L + 1):
            if l == L and s != pp - 1:
                continue  # the head stage must be the last
            t = enc_t + lt[0, l]
            ok = mem_ok(enc_s + ls[0, l], enc_a + la[0, l])
            cand = np.where(ok, np.maximum(f, t), INF)
            j = int(np.argmin(cand))
            if cand[j] < g_new[l]:
                g_new[l], back[l] = float(cand[j]), ("merge", j)
        # LLM-only stage s: l0 -> l
        if s > 0:
            for l in range(2, L + 1):
                if l == L and s != pp - 1:
                    continue
                lo = np.arange(1, l)
                t = lt[lo, l]
                ok = mem_ok(ls[lo, l], la[lo, l])
                cand = np.where(ok, np.maximum(g[lo], t), INF)
                j = int(np.argmin(cand))
                if cand[j] < g_new[l]:
                    g_new[l], back[l] = float(cand[j]), ("llm", int(lo[j]))
        g_hist.append(g_new)
        g_back.append(back)
        # encoder-only stage s
        if encs:
            ok = S + fl[s] * A <= cap
            cand = np.where(ok, np.maximum(f[:, None], T), INF)
            j = np.argmin(cand, axis=0)
            f_new = cand[j, np.arange(nstate)]
            f_new[0] = INF
            f_back.append(j)
            f = f_new
        else:
            f = np.full(nstate, INF)
            f_back.append(np.zeros(nstate, dtype=int))
        f_hist.append(f)
        g = g_new
    if not math.isfinite(g_hist[-1][L]):
        return None
    # Walk back.
    counts = {mod: [0] * pp for mod in fam.module_names}
    l = L
    s = pp - 1
    state = None
    while s >= 0:
        kind, j = g_back[s][l]
        if kind == "llm":
            counts[dec][s] = l - j
            l = j
            s -= 1
            continue
        counts[dec][s] = l
        state = j
        for e, hi, lo in zip(encs, states[full], states[state]):
            counts[e][s] = hi - lo
        s -= 1
        break
    while s >= 0:
        prev = int(f_back[s][state])
        for e, hi, lo in zip(encs, states[state], states[prev]):
            counts[e][s] = hi - lo
        state = prev
        s -= 1
    return counts


def stage_times(mc: Mapping[str, ModuleCosts], counts: Mapping[str, list[int]], order) -> list[float]:
    """fwd + bwd seconds of each stage of a split (for checks and the exhaustive search)."""
    pp = len(next(iter(counts.values())))
    start = {m: 0 for m in order}
    out = []
    for s in range(pp):
        t = 0.0
        for m in order:
            c = counts.get(m, [0] * pp)[s]
            t += mc[m].range_cost(start[m], start[m] + c)[0]
            start[m] += c
        out.append(t)
    return out


def exhaustive(cm: CostModel, pp: int, incumbent: float = INF) -> tuple[float, dict[str, list[int]] | None]:
    """Smallest slowest-stage time over every valid split, by depth-first search
    with pruning (a stage at or above the best so far; the remaining work spread
    evenly over the remaining stages at or above it). No memory cap.
    Returns (bottleneck, split); split is None when nothing beats `incumbent`."""
    fam = cm.family
    mc = module_costs(cm)
    encs = [e for e in fam.encoders if fam.depths[e]]
    dec = fam.decoder
    order = [*encs, dec]
    depth = {m: fam.depths[m] for m in order}
    total_left = lambda pos: sum(mc[m].range_cost(pos[m], depth[m])[0] - (mc[m].call if pos[m] < depth[m] else 0) for m in order)  # noqa: E731
    best = [incumbent, None]
    counts = {m: [0] * pp for m in order}

    def rec(s: int, pos: dict, worst: float) -> None:
        stages_left = pp - s
        if stages_left == 0:
            if all(pos[m] == depth[m] for m in order) and worst < best[0]:
                best[0], best[1] = worst, {m: list(c) for m, c in counts.items()}
            return
        if total_left(pos) / stages_left >= best[0]:
            return
        merged = pos[dec] > 0
        enc_ranges = [range(0, 1)] * len(encs) if merged else [range(0, depth[e] - pos[e] + 1) for e in encs]
        for enc_take in itertools.product(*enc_ranges):
            t_enc = 0.0
            for e, c in zip(encs, enc_take):
                t_enc += mc[e].range_cost(pos[e], pos[e] + c)[0]
            if t_enc >= best[0]:
                continue
            enc_done = all(pos[e] + c == depth[e] for e, c in zip(encs, enc_take))
            # LLM layers only once the encoders are done; the last stage must hold some
            lo_l = 1 if s == pp - 1 else 0
            hi_l = depth[dec] - pos[dec] if enc_done else 0
            for c_l in range(lo_l, hi_l + 1):
                if not c_l and not any(enc_take):
                    continue  # empty stage
                if s == pp - 1 and pos[dec] + c_l != depth[dec]:
                    continue
                if pos[dec] + c_l == depth[dec] and s != pp - 1:
                    break  # the head belongs on the last stage
                t = t_enc + mc[dec].range_cost(pos[dec], pos[dec] + c_l)[0]
                if t >= best[0]:
                    break  # more LLM layers only cost more
                for e, c in zip(encs, enc_take):
                    counts[e][s] = c
                counts[dec][s] = c_l
                nxt = dict(pos)
                for e, c in zip(encs, enc_take):
                    nxt[e] += c
                nxt[dec] += c_l
                rec(s + 1, nxt, max(worst, t))
        for m in order:
            counts[m][s] = 0

    rec(0, {m: 0 for m in order}, 0.0)
    return best[0], best[1]


def refine(cm: CostModel, split: dict[str, list[int]], pp: int, *, schedule: str, m: int, memory_cap: float | None = None,
           max_rounds: int = 40) -> dict[str, list[int]]:
    """Among splits as balanced as `split` (slowest stage no slower), move single
    layers between neighbouring stages while the simulated step gets shorter
    (the slowest stage fixes most of a step; where several splits share it,
    the stages before and after it decide the fill and drain)."""
    from omnitrain.config import ConfigError
    from omnitrain.parallel.layout import validate_layout
    from omnitrain.plan.cost import predict

    fam = cm.family
    cap = INF if memory_cap is None else memory_cap

    def score(s):
        try:
            plans = validate_layout(pp, s, fam.depths, num_microbatches=m, schedule=schedule)
        except ConfigError:
            return None
        p = predict(cm, plans, schedule=schedule, pp=pp, m=m)
        if max(p.memory) > cap:
            return None
        return max(x.fwd + x.bwd for x in p.stages), p.step_s

    limit, best = score(split)
    limit *= 1 + 1e-9
    for _ in range(max_rounds):
        top = None
        for mod in fam.module_names:
            for s in range(pp - 1):
                for src, dst in ((s, s + 1), (s + 1, s)):
                    if not split[mod][src]:
                        continue
                    cand = {k: list(v) for k, v in split.items()}
                    cand[mod][src] -= 1
                    cand[mod][dst] += 1
                    sc = score(cand)
                    if sc is not None and sc[0] <= limit and sc[1] < best - 1e-12 and (top is None or sc[1] < top[0]):
                        top = (sc[1], cand)
        if top is None:
            break
        best, split = top
    return split


def auto_split(cm: CostModel, pp: int, *, schedule: str, m: int, memory_cap: float | None = None) -> dict[str, list[int]] | None:
    """`parallel.pp.layers=auto`: the most balanced split, then the shortest step among equally balanced ones."""
    split = best_split(cm, pp, schedule=schedule, m=m, memory_cap=memory_cap)
    if split is None or pp == 1:
        return split
    return refine(cm, split, pp, schedule=schedule, m=m, memory_cap=memory_cap)
