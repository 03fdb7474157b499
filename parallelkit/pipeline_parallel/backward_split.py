"""A stage's backward split in two, for zero-bubble schedules: B (input gradient) now, W later.

    grad_input, weight_grad = backward_input(output, grad_output, stage_input)   # B
    ... send grad_input upstream, run other micro-batches ...
    weight_grad()                                                                 # W: param .grad

B asks autograd for the gradient w.r.t. the stage input only, so the engine skips every branch
that leads only to parameters (``dW = x^T dy`` of each matmul, a norm's affine gradients): B costs
about the input-gradient half of a backward. While B runs, a hook on each node where such a
branch leaves the input path records the gradient flowing into that node. W then runs autograd
from those recorded gradients down the parameter branches only, the graph kept from B (the
torch.distributed.pipelining approach): it does not recompute the input-gradient chain.

Nodes whose parameter branches share a parameter (a weight used twice) are run by one autograd
call in W; each such node's incoming gradient is pinned to its recorded value, so the path
between them (which that call then also walks) cannot count a contribution twice.

Recomputed (checkpointed, ``parallelkit.recompute``) regions: torch's non-reentrant checkpoint
recomputes once per autograd call that unpacks the region's tensors, and a recomputed tensor is
freed once unpacked. B recomputes; W re-runs B's nodes, so it recomputes again. W's calls share
one recompute (a ``GraphExecGroup``) when no two of them walk the same node, i.e. when no group
joins several nodes; otherwise each call recomputes. Exact either way.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


def backward_input(output: torch.Tensor, grad_output: torch.Tensor | None,
                   stage_input: torch.Tensor | None) -> tuple[torch.Tensor | None, Callable[[], None]]:
    """B: the gradient w.r.t. ``stage_input`` (None if it needs none), and the W to run later.

    ``output``: the stage output (``grad_output`` its gradient, same shape) or a scalar loss
    (``grad_output`` None). ``stage_input``: a leaf that requires grad, e.g. a received
    activation ``[s, b, h]``; None or not requiring grad on the first stage, whose W then runs the
    whole backward. W accumulates into each parameter's ``.grad``.
    """
    root = output.grad_fn
    if root is None:
        return None, lambda: None
    if stage_input is None or not stage_input.requires_grad:
        return None, lambda: torch.autograd.backward(output, grad_output)
    input_node = get_gradient_edge(stage_input).node
    on_path, hanging = _split_graph(root, input_node)
    if root not in on_path:  # the output does not depend on the input
        return torch.zeros_like(stage_input), lambda: torch.autograd.backward(output, grad_output)

    captured: dict[Node, tuple] = {}

    def capture(node: Node):
        def hook(grad_outputs):
            captured[node] = grad_outputs
        return hook

    handles = [node.register_prehook(capture(node)) for node in hanging]
    try:
        (grad_input,) = torch.autograd.grad(output, stage_input, grad_output, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    groups = _group_by_shared_parameters(hanging)
    return grad_input, lambda: _backward_weight(groups, captured)


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _split_graph(root: Node, input_node: Node) -> tuple[set[Node], dict[Node, frozenset[Node]]]:
    """The input path (nodes from which ``input_node`` is reachable) and, for each node on it, the
    parameter leaves (AccumulateGrad nodes) below its children that are off the path."""
    order, seen, stack = [], {root}, [(root, iter(_children(root)))]
    while stack:  # iterative post-order: children before parents, no recursion limit
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            order.append(stack.pop()[0])
        elif child not in seen:
            seen.add(child)
            stack.append((child, iter(_children(child))))
    on_path: set[Node] = set()
    below: dict[Node, frozenset[Node]] = {}  # off-path node -> parameter leaves under it
    for node in order:
        children = _children(node)
        if node is input_node or any(c in on_path for c in children):
            on_path.add(node)
        else:
            leaf = {node} if hasattr(node, "variable") else set()
            below[node] = frozenset(leaf.union(*(below[c] for c in children)))
    hanging = {}
    for node in on_path:
        params = frozenset().union(*(below[c] for c in _children(node) if c not in on_path))
        if params:
            hanging[node] = params
    return on_path, hanging


def _group_by_shared_parameters(hanging: dict[Node, frozenset[Node]]) -> list[tuple[list[Node], frozenset[Node]]]:
    """Connected components of nodes linked by a shared parameter: (nodes, parameter leaves)."""
    groups: list[tuple[list[Node], frozenset[Node]]] = []
    for node, params in hanging.items():
        joined = [g for g in groups if g[1] & params]
        nodes, leaves = [node], params
        for g in joined:
            nodes, leaves = nodes + g[0], leaves | g[1]
        groups = [g for g in groups if not g[1] & params] + [(nodes, leaves)]
    return groups


def _backward_weight(groups, captured: dict[Node, tuple]) -> None:
    """W: the parameter gradients from the gradients B recorded, accumulated into ``.grad``."""
    with _one_recompute(groups):
        _run_weight_groups(groups, captured)


def _one_recompute(groups):
    """One recompute of each checkpointed region for all of W's calls, where allowed: the calls
    must not unpack a saved tensor twice (a group of several nodes walks the path between them)."""
    group_type = getattr(torch_checkpoint, "GraphExecGroup", None)  # torch >= 2.9
    if (group_type is None or group_type._get_current_group() is not None
            or any(len(nodes) > 1 for nodes, _ in groups)):
        return contextlib.nullcontext()
    return group_type()


def _run_weight_groups(groups, captured: dict[Node, tuple]) -> None:
    for nodes, leaves in groups:
        edges, grads = [], []
        for node in nodes:
            for index, grad in enumerate(captured.get(node, ())):
                if grad is not None:
                    edges.append(GradientEdge(node, index))
                    grads.append(grad)
        if not edges:
            continue
        params = [leaf.variable for leaf in leaves]
        pins = [node.register_prehook(lambda _, saved=captured[node]: saved)
                for node in nodes if len(nodes) > 1 and node in captured]
        try:
            # retain_graph: another group's call may walk nodes this one walks (only when
            # parameters are shared); the graph goes when the caller drops this W
            param_grads = torch.autograd.grad(edges, params, grads, retain_graph=True,
                                              allow_unused=True)
        finally:
            for pin in pins:
                pin.remove()
        for param, grad in zip(params, param_grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
