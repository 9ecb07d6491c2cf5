"""A stage's backward in two passes: input grads now (B), weight grads later (W).

B runs autograd from the stage's outputs to its received inputs only, which
is what the previous stage waits for. W must then produce the parameters'
grads without walking the input-grad chain again. It restarts from the
*boundary* nodes: the autograd nodes B ran (they lead to an input) that also
have an edge to a part of the graph that leads only to parameters (the
weight side of a matmul, a norm's weight). A pre-hook captures the grads
flowing into each boundary node during B; W re-runs just those nodes towards
their parameters, from the captured grads (GradientEdge roots). A parameter
whose grad W would otherwise collect twice (its path from the boundary is
not a simple chain: a weight used twice, or through several outputs) is
instead handled the plain way, by autograd from the stage's outputs with only
those parameters as `inputs`. Parameters on no path from an input (an encoder
on raw data beside received activations) hang below an output that does not
depend on an input: W starts there from that output's grad.

torch.distributed.pipelining (`_backward.py`) splits the same way; this is
written for named, variable bundles and for the fallback above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class WeightWork:
    """What B leaves for W."""

    groups: list[tuple[object, list[torch.Tensor]]] = field(default_factory=list)  # (boundary node, its params)
    captured: dict = field(default_factory=dict)  # boundary node -> grads that flowed into it in B
    root_groups: list[tuple[list[int], list[torch.Tensor]]] = field(default_factory=list)  # (root indices, params)
    plain: list[torch.Tensor] = field(default_factory=list)  # params W gets from the roots directly
    roots: list[torch.Tensor] = field(default_factory=list)
    root_grads: list[torch.Tensor | None] = field(default_factory=list)


def _node(t: torch.Tensor):
    return get_gradient_edge(t).node


def _graph(root_nodes, input_nodes):
    """Nodes reachable from the roots: which lead to an input, and each node's parents (edges, with repeats)."""
    parents: dict = {}
    leads_in: dict = {}
    seen = set()
    stack = [(n, False) for n in root_nodes]
    while stack:
        n, done = stack.pop()
        if done:
            leads_in[n] = n in input_nodes or any(leads_in.get(c, False) for c, _ in n.next_functions if c is not None)
            continue
        if n in seen:
            continue
        seen.add(n)
        stack.append((n, True))
        for c, _ in n.next_functions:
            if c is None:
                continue
            parents.setdefault(c, []).append(n)
            if c not in seen:
                stack.append((c, False))
    return parents, leads_in


def backward_input(
    roots: list[torch.Tensor],
    root_grads: list[torch.Tensor] | None,
    inputs: list[torch.Tensor],
    params: list[torch.Tensor],
) -> WeightWork:
    """B: accumulate the grads of `inputs` (into .grad) and return what W needs for `params`."""
    root_grads = list(root_grads) if root_grads is not None else [None] * len(roots)
    work = WeightWork(roots=roots, root_grads=root_grads)
    if not roots:
        return work
    if not inputs:  # nothing to send back: W is the plain backward
        work.plain = list(params)
        return work
    root_nodes = [_node(t) for t in roots]
    input_nodes = {_node(t) for t in inputs}
    parents, leads_in = _graph(root_nodes, input_nodes)
    root_of: dict = {}
    for i, n in enumerate(root_nodes):
        root_of.setdefault(n, []).append(i)

    by_boundary: dict = {}
    by_roots: dict = {}
    for p in params:
        cur = _node(p)
        if cur not in leads_in:
            continue  # not used by this stage's outputs: no grad, as with a plain backward
        while True:
            ups = parents.get(cur, [])
            if len(ups) + len(root_of.get(cur, ())) != 1:
                work.plain.append(p)  # more than one way in: the plain way counts each once
                break
            if not ups:  # the chain ends at an output that depends on no input
                by_roots.setdefault(tuple(root_of[cur]), []).append(p)
                break
            up = ups[0]
            if leads_in[up]:  # a node B runs: W restarts from the grads flowing into it
                by_boundary.setdefault(up, []).append(p)
                break
            cur = up
    work.groups = list(by_boundary.items())
    work.root_groups = [(list(k), v) for k, v in by_roots.items()]

    handles = []
    for node in by_boundary:

        def keep(grad_outputs, node=node):
            work.captured[node] = tuple(grad_outputs)

        handles.append(node.register_prehook(keep))
    try:
        torch.autograd.backward(roots, root_grads, inputs=inputs, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return work


def _accumulate(params: list[torch.Tensor], grads) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            # A copy: autograd may hand back a captured grad itself (an add's
            # backward passes its grad through), which another group still reads.
            p.grad = g.clone()
        else:
            p.grad += g


def backward_weight(work: WeightWork) -> None:
    """W: accumulate the grads of B's `params` into .grad; frees nothing itself (drop `work` after)."""
    backward_weights([work])


def backward_weights(works: list[WeightWork]) -> None:
    """Several W's run back to back (a schedule often has runs of them) with
    one engine call per parameter group instead of one per group and W: the
    per-call host cost is paid once, and a parameter gets the sum over the
    micro-batches. Only boundaries of the same parameters share a call: they
    lie in different micro-batches' graphs, so a root cannot reach another's
    parameters (two boundaries of one graph could: a later layer's node leads
    down to an earlier layer's weights)."""
    calls: dict[tuple, tuple[list, list, list]] = {}  # param ids -> (params, edges, grads)
    for work in works:
        for node, ps in work.groups:
            got = work.captured.get(node)
            if got is None:  # no grad reached the node in B: nothing for its parameters
                continue
            _, edges, grads = calls.setdefault(tuple(id(p) for p in ps), (ps, [], []))
            for i, g in enumerate(got):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    grads.append(g)
    for ps, edges, grads_out in calls.values():
        if edges:
            grads = torch.autograd.grad(edges, ps, grad_outputs=grads_out, retain_graph=True, allow_unused=True)
            _accumulate(ps, grads)
    for work in works:
        for idx, ps in work.root_groups:
            grads = torch.autograd.grad(
                [work.roots[i] for i in idx],
                ps,
                grad_outputs=[work.root_grads[i] for i in idx],
                retain_graph=True,
                allow_unused=True,
            )
            _accumulate(ps, grads)
        if work.plain:
            torch.autograd.backward(work.roots, work.root_grads, inputs=work.plain, retain_graph=True)
