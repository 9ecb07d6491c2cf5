import pytest

from omnitrain.pipeline.schedule import (
    SCHEDULES,
    SPLIT_BACKWARD,
    Action,
    DeadlockError,
    Schedule,
    build,
    check,
    gpipe,
    interleaved_1f1b,
    interleaved_warmup,
    one_f_one_b,
    simulate,
    zero_bubble,
    zbv,
)

PS = range(1, 9)
MS = range(1, 17)
F, B = 1.0, 2.0


@pytest.mark.parametrize("p", PS)
def test_gpipe_and_1f1b_are_deadlock_free_and_bounded(p):
    for m in MS:
        g = simulate(gpipe(p, m), fwd=F, bwd=B)
        assert g.peak_in_flight == (m,) * p
        assert g.makespan == (m + p - 1) * (F + B)
        s = simulate(one_f_one_b(p, m), fwd=F, bwd=B)
        assert s.peak_in_flight == tuple(min(m, p - r) for r in range(p)), (p, m)
        assert s.makespan == (m + p - 1) * (F + B)  # same bubble as GPipe, less memory


@pytest.mark.parametrize("p", PS)
def test_interleaved_is_deadlock_free_bounded_and_no_slower(p):
    for m in MS:
        plain = simulate(one_f_one_b(p, m), fwd=F, bwd=B).makespan
        for v in (2, 3, 4):
            # A chunk is 1/v of a rank's layers: same total work as plain 1F1B.
            r = simulate(interleaved_1f1b(p, m, v), fwd=F / v, bwd=B / v)
            assert r.peak_in_flight == tuple(min(interleaved_warmup(p, m, v, k) + 1, m * v) for k in range(p))
            assert r.makespan <= plain + 1e-9, (p, m, v)
            if m >= p:  # bubble (p-1)(f+b)/v: v times smaller than 1F1B's
                assert r.makespan == pytest.approx((m + (p - 1) / v) * (F + B)), (p, m, v)


def test_stage_placement():
    s = interleaved_1f1b(4, 8, 2)
    assert s.num_stages == 8 and s.stages_of(1) == [1, 5]
    assert {a.stage for a in s.actions[1]} == {1, 5}
    assert build("1f1b", 4, 8).actions[3][:2] == (Action("F", 0, 3), Action("B", 0, 3))
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build("zb", 4, 8)
    v = build("zbv", 4, 8, 2)
    assert v.num_stages == 8 and v.stages_of(0) == [0, 7] and v.stages_of(3) == [3, 4] and v.rank_of(5) == 2
    # SPLIT_BACKWARD (what config checks use) names exactly the schedules with W actions
    for name in SCHEDULES:
        assert build(name, 4, 8, 2 if name in ("interleaved_1f1b", "zbv") else 1).splits_backward == (
            name in SPLIT_BACKWARD
        ), name


@pytest.mark.parametrize("p", PS)
def test_zero_bubble_is_deadlock_free_keeps_1f1b_memory_and_shrinks_the_bubble(p):
    for m in MS:
        s = zero_bubble(p, m)
        assert s.num_stages == p and {a.op for r in s.actions for a in r} == ({"F", "B", "W"})
        # F/B keep 1F1B's order on every rank; only the W's are placed around them
        assert [tuple(a for a in acts if a.op != "W") for acts in s.actions] == list(one_f_one_b(p, m).actions)
        plain = simulate(one_f_one_b(p, m), fwd=F, bwd=B)
        for share in (0.5, 0.25, 0.75):  # W = half the backward (the schedule's design point), or not
            z = simulate(s, fwd=F, bwd=B, weight_share=share)  # same total work as 1F1B
            assert z.makespan <= plain.makespan + 1e-9, (p, m, share)
            assert max(z.peak_in_flight) == max(plain.peak_in_flight), (p, m)
            assert all(k <= min(m, p) for k in z.peak_in_flight)
        if m >= p:  # F = B = W: bubble (p-1)(F + B - W), a third of 1F1B's
            z = simulate(s, fwd=1.0, bwd=2.0)
            assert z.makespan == m * 3.0 + (p - 1) * 1.0, (p, m)


def test_zero_bubble_bubble_on_the_bench_costs():
    # scripts/bench_schedule.py: p=4, m=8, forward 20, backward 40 split in halves
    z = simulate(zero_bubble(4, 8), fwd=20.0, bwd=40.0)
    o = simulate(one_f_one_b(4, 8), fwd=20.0, bwd=40.0)
    frac = lambda r: max(r.bubble) / r.makespan  # noqa: E731
    assert frac(z) <= frac(o) / 2, (frac(z), frac(o))
    assert z.bubble == (60.0,) * 4 and o.bubble == (180.0,) * 4


def test_a_deadlocking_schedule_is_caught():
    # Rank 0 backprops mb 0 before forwarding mb 1, rank 1 wants mb 1 first.
    bad = Schedule(
        "bad",
        2,
        2,
        2,
        (
            (Action("F", 0, 0), Action("B", 0, 0), Action("F", 1, 0), Action("B", 1, 0)),
            (Action("F", 0, 1), Action("F", 1, 1), Action("B", 0, 1), Action("B", 1, 1)),
        ),
    )
    with pytest.raises(DeadlockError, match=r"rank 0 at B0@0 waits for B0@1; rank 1 at F1@1 waits for F1@0"):
        simulate(bad)


def test_malformed_schedules_are_rejected():
    def sched(r0, r1=()):
        return Schedule("x", 2, 2, 1, (tuple(r0), tuple(r1)))

    ok1 = (Action("F", 0, 1), Action("B", 0, 1))
    with pytest.raises(ValueError, match="before its forward"):
        check(sched([Action("B", 0, 0), Action("F", 0, 0)], ok1))
    with pytest.raises(ValueError, match="runs on rank 1"):
        check(sched([Action("F", 0, 1), Action("B", 0, 1)], ok1))
    with pytest.raises(ValueError, match="appears twice"):
        check(sched([Action("F", 0, 0), Action("F", 0, 0), Action("B", 0, 0)], ok1))
    with pytest.raises(ValueError, match="expected 4"):
        check(sched([Action("F", 0, 0)], ok1))
    # split backward: W after its B, and then every (mb, stage) needs one
    ok1w = (*ok1, Action("W", 0, 1))
    with pytest.raises(ValueError, match="before its input-grad backward"):
        check(sched([Action("F", 0, 0), Action("W", 0, 0), Action("B", 0, 0)], ok1w))
    with pytest.raises(ValueError, match="expected 6"):
        check(sched([Action("F", 0, 0), Action("B", 0, 0)], ok1w))
    check(sched([Action("F", 0, 0), Action("B", 0, 0), Action("W", 0, 0)], ok1w))


def test_timeline_and_bubble():
    r = simulate(one_f_one_b(4, 8), fwd=F, bwd=B)
    assert [a for _, _, a in r.timeline[3][:2]] == [Action("F", 0, 3), Action("B", 0, 3)]
    assert r.timeline[3][0][0] == 3 * F  # the last rank waits for three forwards
    assert r.bubble == (3 * (F + B),) * 4


def test_zero_bubble_is_optimal_on_the_bench_costs_and_latency_is_what_moves_the_ratio():
    # The bench's stages: f = 20, b = 40 in halves, the first stage's backward all W.
    p, m, f, b = 4, 8, 20.0, 40.0
    share = [1.0, 0.5, 0.5, 0.5]
    frac = lambda r: 1 - m * (f + b) / r.makespan  # noqa: E731  (the bench's bubble)
    z = simulate(zero_bubble(p, m), fwd=f, bwd=b, weight_share=share)
    # The last rank gets its first input after (p - 1) forwards and then has m (f + b)
    # of work: no schedule with one stage per rank ends earlier (ZB-H2's extra warm-up cannot help).
    assert z.makespan == (p - 1) * f + m * (f + b)
    o = simulate(one_f_one_b(p, m), fwd=f, bwd=b, weight_share=share)
    assert abs(frac(z) / frac(o) - 0.407) < 1e-3
    # A few ms per message (gloo on a loaded CPU) push the same schedules past half.
    zl = simulate(zero_bubble(p, m), fwd=f, bwd=b, weight_share=share, latency=3.0)
    ol = simulate(one_f_one_b(p, m), fwd=f, bwd=b, weight_share=share, latency=3.0)
    assert frac(zl) / frac(ol) > 0.5


# The executor's first stage sends no input grads: its B is empty, its W the whole backward.
def _first_all_w(n):
    return [1.0] + [0.5] * (n - 1)


@pytest.mark.parametrize("p", PS)
def test_zbv_is_deadlock_free_never_slower_than_zb_h1_and_bounded_in_memory(p):
    for m in MS:
        s = zbv(p, m)
        assert s.num_stages == 2 * p and s.placement == "v"
        assert all(set(s.stages_of(r)) == {a.stage for a in s.actions[r]} for r in range(p))
        # a chunk is half a rank's layers: the same work as ZB-H1 and 1F1B on whole stages
        z = simulate(s, fwd=F / 2, bwd=B / 2, weight_share=_first_all_w(2 * p))
        assert all(k <= 2 * p + 2 for k in z.peak_in_flight), (p, m, z.peak_in_flight)  # p + 1 micro-batches
        if m < p:
            continue
        h = simulate(zero_bubble(p, m), fwd=F, bwd=B, weight_share=_first_all_w(p))
        o = simulate(one_f_one_b(p, m), fwd=F, bwd=B)
        assert z.makespan <= h.makespan + 1e-9 <= o.makespan + 1e-9, (p, m)
        assert z.makespan >= m * (F + B) + (p - 1) * F / 2 - 1e-9  # the lower bound holds (the simulator is sane)


def test_zbv_meets_the_lower_bound_on_the_bench_costs():
    # scripts/bench_schedule.py: p=4, m=8, forward 20, backward 40 in halves, as two chunks per rank
    p, m, f, b = 4, 8, 20.0, 40.0
    z = simulate(zbv(p, m), fwd=f / 2, bwd=b / 2, weight_share=_first_all_w(2 * p))
    assert z.makespan == m * (f + b) + (p - 1) * f / 2  # 510: the last rank waits 3 chunk forwards, then never idles
    o = simulate(one_f_one_b(p, m), fwd=f, bwd=b)
    frac = lambda r: 1 - m * (f + b) / r.makespan  # noqa: E731  (the bench's bubble)
    assert frac(z) / frac(o) < 0.22


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_schedule.py"
    spec = importlib.util.spec_from_file_location("bench_schedule", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_stage_costs_are_booked_on_one_serial_device():
    # The bench's stages cost wall time from their start; several micro-batches'
    # weight halves run in one autograd call (the executor's W runs) still cost
    # one half each, back to back.
    import time

    import torch

    bench = _bench()
    f, b = 0.004, 0.008
    mod = bench.SleepModule(f, b)
    xs = [torch.ones(2, 3, requires_grad=True) for _ in range(2)]
    t0 = time.perf_counter()
    ys = [mod(x) for x in xs]
    assert time.perf_counter() - t0 >= 2 * f
    t0 = time.perf_counter()
    torch.autograd.grad([y.sum() for y in ys], xs, retain_graph=True)  # input halves only
    assert time.perf_counter() - t0 >= 2 * b / 2
    t0 = time.perf_counter()
    (gw,) = torch.autograd.grad([y.sum() for y in ys], [mod.w])  # both weight halves, one call
    assert time.perf_counter() - t0 >= 2 * b / 2
    assert gw.item() == sum(x.sum().item() for x in xs)  # d(sum x * w)/dw
