"""Point-to-point transfer of a *bundle*: an ordered dict of named tensors.

What crosses a pipeline cut in an omni model (hidden states, encoder outputs,
3-D position ids, masks, grids, lengths) changes in number, shape and dtype
from one micro-batch to the next. `torch.distributed.pipelining` cannot carry
that: it needs fixed, pre-declared shapes per stage and tensors or tuples, not
named dicts (with varying shapes it aborts or silently corrupts data). So a
bundle goes as:

1. a fixed-size int64 header (`HEADER_WORDS` words): a magic number, a
   3-int key chosen by the caller (the executor sends kind, micro-batch,
   stage), the tensor count, then per tensor its name (UTF-8, packed 8 bytes
   per word), dtype code, requires-grad flag, ndim and shape;
2. the payload: every tensor's bytes packed into one uint8 buffer (each at
   a 16-byte aligned offset). Up to `EAGER_BYTES` it rides in the same
   message, after the header words; larger, it follows as a second message.

A fixed-size first message can be received without knowing anything about
the bundle. Fewer messages matter because the CPU backend moves data only
once the receive is posted: each message costs a rendezvous between the two
processes (~0.5 ms, several ms on a loaded machine). Packing costs a copy on
the send side; sending raw bytes sidesteps backends that lack bool or
bfloat16. Received tensors are views into the receive buffer.

Peers are ranks *within* `group`. Messages between one pair of ranks are
matched in order, so a receiver must take bundles from a peer in the order
they were sent (the executor keeps ones it does not need yet), and at most
one receive per peer may be outstanding: a second posted first-message
receive would match the first bundle's payload.

`exchange` posts one slot's sends and the next receive as one
`batch_isend_irecv` (on accelerator backends one grouped launch, so a
neighbour's send and receive in opposite directions cannot serialise). With
a `stream` (a device's communication stream, `device.comm_stream`) packing
and the transfers run on it: it first waits for the compute stream's work
so far (the outputs being sent), tensors read or filled there are recorded
on the stream that uses them next (`record_stream`, so the caching
allocator does not hand their memory out early), and a received bundle is
handed over only after the compute stream waits for the comm stream.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import array
import contextlib

import torch
import torch.distributed as dist

from omnitrain import device as omnitrain_device

HEADER_WORDS = 512  # 4 KiB of metadata: ~45 tensors with 4-D shapes and 24-byte names
# Payloads up to this size travel inside the first message: a tiny model's
# cut (hidden states of a few hundred tokens) then costs one rendezvous, and
# 64 KiB more per message is noise next to a real model's activations.
EAGER_BYTES = 64 * 1024
_FIRST_WORDS = HEADER_WORDS + EAGER_BYTES // 8
_MAGIC = 0x6F6D6E69  # "omni"
_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}

Key = tuple[int, int, int]


class TensorMeta(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool


def encode_header(bundle: Mapping[str, torch.Tensor], key: Key = (0, 0, 0)) -> torch.Tensor:
    words = [_MAGIC, *key, len(bundle)]
    for name, t in bundle.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bundle entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _CODE:
            raise TypeError(f"bundle entry {name!r} has dtype {t.dtype}, which p2p cannot send")
        raw = name.encode()
        words.append(len(raw))
        for i in range(0, len(raw), 8):
            words.append(int.from_bytes(raw[i : i + 8].ljust(8, b"\0"), "little", signed=True))
        words += [_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(words) > HEADER_WORDS:
        raise ValueError(
            f"bundle header needs {len(words)} words, more than HEADER_WORDS={HEADER_WORDS}: "
            f"send fewer tensors or shorter names ({list(bundle)})"
        )
    words += [0] * (HEADER_WORDS - len(words))
    # frombuffer over an array: a quarter of torch.tensor(list)'s time, which is on every send's path
    return torch.frombuffer(array.array("q", words), dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[Key, list[TensorMeta]]:
    w = header.tolist()
    if w[0] != _MAGIC:
        raise RuntimeError(f"p2p: received a header with magic {w[0]:#x}: peers are out of step")
    key, count, i = (w[1], w[2], w[3]), w[4], 5
    metas = []
    for _ in range(count):
        n = w[i]
        nw = (n + 7) // 8
        raw = b"".join(x.to_bytes(8, "little", signed=True) for x in w[i + 1 : i + 1 + nw])[:n]
        i += 1 + nw
        dtype, grad, ndim = _DTYPES[w[i]], bool(w[i + 1]), w[i + 2]
        shape = tuple(w[i + 3 : i + 3 + ndim])
        i += 3 + ndim
        metas.append(TensorMeta(raw.decode(), dtype, shape, grad))
    return key, metas


_ALIGN = 16  # so every tensor in the packed payload can be viewed as its dtype


def _offsets(metas: list[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for dtype, shape in metas:
        offsets.append(end)
        end += -(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN
    return offsets, end


def _pack(bundle: Mapping[str, torch.Tensor], offsets: list[int], buf: torch.Tensor) -> None:
    for off, t in zip(offsets, bundle.values()):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[off : off + raw.numel()].copy_(raw)


def _global(group, peer: int) -> int:
    return peer if group is None else dist.get_global_rank(group, peer)


def _on_comm(stream, dev: torch.device):
    """Run what follows on the comm stream, after the compute stream's work so far; no-op without one."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(omnitrain_device.current_stream(dev))
    return omnitrain_device.use_stream(dev, stream)


class SendHandle:
    """Outstanding sends of one bundle; keeps the buffers alive until done."""

    def __init__(self, works: list, buffers: list[torch.Tensor]):
        self._works = works
        self._buffers = buffers

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._buffers = []


def _send_buffers(bundle: Mapping[str, torch.Tensor], key: Key, device: torch.device, stream) -> list[torch.Tensor]:
    """The bundle's one or two messages (header with small payload; large payload apart)."""
    first = torch.empty(_FIRST_WORDS, dtype=torch.int64, device=device)
    first[:HEADER_WORDS].copy_(encode_header(bundle, key))
    offsets, size = _offsets([(t.dtype, tuple(t.shape)) for t in bundle.values()])
    if size <= EAGER_BYTES:
        _pack(bundle, offsets, first[HEADER_WORDS:].view(torch.uint8))
        buffers = [first]
    else:
        payload = torch.empty(size, dtype=torch.uint8, device=device)
        _pack(bundle, offsets, payload)
        buffers = [first, payload]
    if stream is not None:  # read on the comm stream: keep their memory until it is done
        for t in bundle.values():
            if t.device.type == device.type:
                t.record_stream(stream)
    return buffers


def _device_of(bundle, device):
    if device is None:
        device = next(iter(bundle.values())).device if bundle else torch.device("cpu")
    return device


def isend_bundle(
    bundle: Mapping[str, torch.Tensor],
    dst: int,
    *,
    group=None,
    key: Key = (0, 0, 0),
    device: torch.device | None = None,
    stream=None,
) -> SendHandle:
    """Start sending `bundle` to group rank `dst`; returns at once."""
    device = _device_of(bundle, device)
    peer = _global(group, dst)
    with _on_comm(stream, device):
        buffers = _send_buffers(bundle, key, device, stream)
        works = [dist.isend(b, peer, group=group) for b in buffers]
    return SendHandle(works, buffers)


def send_bundle(bundle: Mapping[str, torch.Tensor], dst: int, *, group=None, key: Key = (0, 0, 0), device=None) -> None:
    isend_bundle(bundle, dst, group=group, key=key, device=device).wait()


class RecvHandle:
    """A bundle being received: the first message's receive is posted at creation
    (or by `exchange`, in a batch); `wait()` does the rest."""

    def __init__(self, src: int, group, device: torch.device, stream=None, *, post: bool = True):
        self._peer = _global(group, src)
        self._group = group
        self._device = device
        self._stream = stream
        with omnitrain_device.use_stream(device, stream):
            self._first = torch.empty(_FIRST_WORDS, dtype=torch.int64, device=device)
            self._works = [dist.irecv(self._first, self._peer, group=group)] if post else []

    def wait(self) -> tuple[Key, dict[str, torch.Tensor]]:
        with omnitrain_device.use_stream(self._device, self._stream):
            for w in self._works:
                w.wait()
            key, metas = decode_header(self._first[:HEADER_WORDS])  # the host needs the shapes: it syncs here
            offsets, size = _offsets([(m.dtype, m.shape) for m in metas])
            if size <= EAGER_BYTES:
                buf = self._first[HEADER_WORDS:].view(torch.uint8)
            else:
                buf = torch.empty(size, dtype=torch.uint8, device=self._device)
                dist.irecv(buf, self._peer, group=self._group).wait()
        if self._stream is not None:  # compute uses the bundle next: after the comm stream, and keeping its memory
            compute = omnitrain_device.current_stream(self._device)
            compute.wait_stream(self._stream)
            buf.record_stream(compute)
        bundle = {}
        for off, m in zip(offsets, metas):
            n = torch.Size(m.shape).numel() * m.dtype.itemsize
            t = buf[off : off + n].view(m.dtype).reshape(m.shape).detach()
            if m.requires_grad and (t.is_floating_point() or t.is_complex()):
                t.requires_grad_(True)
            bundle[m.name] = t
        return key, bundle


def exchange(
    sends: list[tuple[Mapping[str, torch.Tensor], int, Key]],
    recv_from: int | None,
    *,
    group=None,
    device: torch.device,
    stream=None,
) -> tuple[list[SendHandle], RecvHandle | None]:
    """Post `sends` ((bundle, group rank, key) each) and the first message of the next
    bundle from `recv_from` as one batch_isend_irecv; returns their handles.

    A large bundle's payload is received after its header is read (its size is
    in the header), so only the first message of the receive joins the batch.
    """
    ops, spans, handles = [], [], []
    with _on_comm(stream, device):
        for bundle, dst, key in sends:
            buffers = _send_buffers(bundle, key, device, stream)
            peer = _global(group, dst)
            spans.append((len(ops), len(buffers)))
            ops += [dist.P2POp(dist.isend, b, peer, group) for b in buffers]
            handles.append(buffers)
        recv = None
        if recv_from is not None:
            recv = RecvHandle(recv_from, group, device, stream, post=False)
            ops.append(dist.P2POp(dist.irecv, recv._first, recv._peer, group))
        works = dist.batch_isend_irecv(ops) if ops else []
    # Backends that coalesce the batch return one work for all of it.
    per_op = len(works) == len(ops)
    out = [SendHandle(works[i : i + n] if per_op else works, bufs) for (i, n), bufs in zip(spans, handles)]
    if recv is not None:
        recv._works = works[-1:] if per_op else works
    return out, recv


def irecv_bundle(src: int, *, group=None, device: torch.device | None = None, stream=None) -> RecvHandle:
    """Post the receive of the next bundle from group rank `src`."""
    return RecvHandle(src, group, device or torch.device("cpu"), stream)


def recv_bundle(src: int, *, group=None, device: torch.device | None = None) -> tuple[Key, dict[str, torch.Tensor]]:
    return irecv_bundle(src, group=group, device=device).wait()
