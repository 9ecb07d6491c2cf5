import pytest
import torch

from omnitrain.pipeline import p2p
from _dist import run_workers


def _bundle(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    n = 3 + 4 * i  # a different length every time
    big = {"big": torch.randn(20000, generator=g)} if i == 1 else {}  # over EAGER_BYTES: a second message
    return big | {
        "hidden_states": torch.randn(1, n, 5, generator=g).requires_grad_(True),
        "position_ids": torch.arange(3 * n).reshape(3, 1, n),
        "attention_mask": torch.rand(1, n, generator=g) > 0.3,
        "bf16": torch.randn(n, 2, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(float(i)),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, n, generator=g).t(),  # not contiguous
        "ünïcode/long.name.for.the.header": torch.tensor([i], dtype=torch.int32),
    }


def test_header_roundtrip_without_processes():
    b = _bundle(2)
    key, metas = p2p.decode_header(p2p.encode_header(b, key=(1, 7, 3)))
    assert key == (1, 7, 3)
    assert [m.name for m in metas] == list(b)
    for m, t in zip(metas, b.values()):
        assert (m.dtype, m.shape, m.requires_grad) == (t.dtype, tuple(t.shape), t.requires_grad)


def test_header_overflow_is_a_clear_error():
    many = {f"tensor_{i}": torch.zeros(1, 1, 1, 1) for i in range(200)}
    with pytest.raises(ValueError, match="HEADER_WORDS"):
        p2p.encode_header(many)


def _exchange(rank, world):
    # Rank 0 sends three bundles of changing shapes; rank 1 receives them in order.
    if rank == 0:
        handles = [p2p.isend_bundle(_bundle(i), 1, key=(0, i, 1)) for i in range(3)]
        p2p.send_bundle({}, 1, key=(9, 9, 9))
        for h in handles:
            h.wait()
        return None
    got = [p2p.recv_bundle(0) for _ in range(4)]
    return [(key, {k: (v, v.requires_grad) for k, v in b.items()}) for key, b in got]


def test_bundles_of_varying_shapes_and_dtypes():
    _, got = run_workers(_exchange, 2)
    for i, (key, b) in enumerate(got[:3]):
        want = _bundle(i)
        assert key == (0, i, 1)
        assert list(b) == list(want)
        for name, (t, rg) in b.items():
            assert t.dtype == want[name].dtype and t.shape == want[name].shape, name
            assert torch.equal(t, want[name].detach()), name
            assert rg == (name == "hidden_states"), name
    assert got[3] == ((9, 9, 9), {})


def _both_ways(rank, world):
    # Both ranks send 4 MB to each other before receiving: the 1F1B steady-state
    # pattern that deadlocks with blocking sends.
    peer = 1 - rank
    big = {"x": torch.full((1 << 20,), float(rank))}
    h = p2p.isend_bundle(big, peer)
    recv = p2p.irecv_bundle(peer)
    _, b = recv.wait()
    h.wait()
    return float(b["x"][0]), b["x"].numel()


def test_isend_both_ways_does_not_deadlock():
    assert run_workers(_both_ways, 2) == [(1.0, 1 << 20), (0.0, 1 << 20)]


def _batched(rank, world):
    # One batch_isend_irecv per side: a small and a large (two-message) bundle
    # out, the peer's first bundle's receive in; then a plain receive for the second.
    peer = 1 - rank
    sends, recv = p2p.exchange(
        [(_bundle(0), peer, (0, 0, rank)), (_bundle(1), peer, (0, 1, rank))], peer, device=torch.device("cpu")
    )
    got = [recv.wait(), p2p.recv_bundle(peer)]
    for h in sends:
        h.wait()
    return [(key, {k: v.detach() for k, v in b.items()}) for key, b in got]


def test_batched_exchange_both_ways():
    for rank, got in enumerate(run_workers(_batched, 2)):
        for i, (key, b) in enumerate(got):
            assert key == (0, i, 1 - rank)
            want = _bundle(i)
            assert list(b) == list(want) and all(torch.equal(b[k], want[k].detach()) for k in want)


def _in_subgroup(rank, world):
    import torch.distributed as dist

    sub = dist.new_group([1, 2])  # peers are ranks within the group
    if rank == 1:
        p2p.send_bundle({"a": torch.tensor([5])}, 1, group=sub)
    elif rank == 2:
        return p2p.recv_bundle(0, group=sub)[1]["a"].item()
    return None


def test_peers_are_group_ranks():
    assert run_workers(_in_subgroup, 3)[2] == 5


def _hang(rank, world):
    if rank == 1:
        import time

        time.sleep(30)
    return p2p.recv_bundle(1) if rank == 0 else None


def test_a_hanging_rank_is_reported():
    with pytest.raises(AssertionError, match=r"ranks \[0, 1\] of 2 hung"):
        run_workers(_hang, 2, timeout_s=3)
