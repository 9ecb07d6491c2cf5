"""Mixture-of-experts helpers shared by every MoE family: the router
load-balancing loss and the expert-load statistics.

Definition of the aux loss (`model.moe.aux_loss_coef`), the same under every
layout. For one MoE layer l and one micro-batch m with T_m real
(attention-mask) tokens, the Switch-Transformer term HF computes
(`load_balancing_loss_func` on that layer's router logits and the mask):

    b(l, m) = E * sum_e f_e * P_e,   f_e = top-k assignments to e / T_m,
                                     P_e = sum of router probabilities of e / T_m

The step's aux loss is the token-weighted mean over the global batch's
micro-batches and the mean over MoE layers,

    aux = coef * (1 / L) * sum_l sum_m b(l, m) * T_m / T

with T the real tokens of the whole global batch. Every term belongs to one
layer (one pipeline stage) and one micro-batch (one data-parallel rank), and
the terms add up: any pipeline / data-parallel split of the same micro-batches
sums to the single-process value. (HF's own loss pools all layers of one
forward into a single f and P; that product of pooled sums cannot be split
over pipeline stages, so the per-layer mean is used, as Megatron does.)

Each term joins backward through `AuxLossInjector` on the layer's output
hidden states (Megatron's MoEAuxLossAutoScaler idea): a stage that does not
hold the head still backpropagates its layers' aux terms with no extra
communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AuxLossInjector(torch.autograd.Function):
    """Identity on `h` whose backward also sends gradient 1 into `aux`."""

    @staticmethod
    def forward(ctx, h, aux):
        ctx.save_for_backward(aux)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        (aux,) = ctx.saved_tensors
        return grad_h, torch.ones_like(aux)


def router_balance(logits: torch.Tensor, mask: torch.Tensor, top_k: int):
    """b(l, m) for one layer's router logits (B*S, E) and the flat mask (B*S,),
    and the top-k assignment counts per expert (E,). Same arithmetic as HF's
    load_balancing_loss_func with an attention mask, for one layer."""
    E = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    m = mask.reshape(-1).to(probs.dtype)
    counts = torch.zeros(E, dtype=torch.float32, device=logits.device).scatter_add_(
        0, chosen.reshape(-1), m.repeat_interleave(top_k)
    )
    T = m.sum()
    f = counts / T
    P = (probs * m.unsqueeze(-1)).sum(0) / T
    return E * torch.sum(f * P), counts.detach()


class MoEStats:
    """Per step: the aux loss (unscaled: without coef) and tokens routed to
    each expert of each MoE layer, over what this rank ran. The trainer sums
    them over ranks (`ParallelContext.reduce_sum`) before logging."""

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.E = num_layers, num_experts
        self.reset(1)

    def reset(self, global_tokens: int) -> None:
        self.global_tokens = max(int(global_tokens), 1)
        self.aux = 0.0
        self.counts = torch.zeros(self.L, self.E, dtype=torch.float64)
        self.seen = torch.zeros(self.L, dtype=torch.float64)  # layers that ran here (1 per micro-batch)

    def vector(self) -> torch.Tensor:
        """Everything as one float64 vector (for one all-reduce)."""
        return torch.cat([torch.tensor([self.aux], dtype=torch.float64), self.seen, self.counts.reshape(-1)])

    def metrics(self, vec: torch.Tensor) -> dict:
        """Log row entries from a (reduced) vector: `moe_aux` (the balance loss
        before coef; k at perfect balance) and per MoE layer the expert load
        max / mean tokens per expert (1.0 = balanced)."""
        aux, seen, counts = vec[0], vec[1 : 1 + self.L], vec[1 + self.L :].reshape(self.L, self.E)
        ran = seen > 0
        load = (counts.max(-1).values / counts.mean(-1).clamp_min(1e-12))[ran]
        return {
            "moe_aux": float(aux),
            "moe_load_max_mean": float(load.max()) if load.numel() else 0.0,
            "moe_load_per_layer": [round(float(x), 3) for x in load],
        }
