"""Run many routes on one batch, computing every shared prefix once.

Routes are tuples of steps (pure data, `SNNet.routes`). Routes that begin with the same steps (the same anchor's
stem and blocks 0..j, or the same stage) share a path in a trie; a depth-first walk computes each trie node once
per batch. An activation lives only while the walk is inside its subtree: when the last route that continues from
it has been produced, Python drops it. Peak memory is therefore the activations along one root-to-leaf path, not
one per route.

The routes' first steps are the trie's roots. Each root may read its own input (`RouteTree.run` with a mapping or a
function of the first step): anchors with their own preprocessing, where a route reads its front anchor's images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch


@dataclass
class _Node:
    children: dict = field(default_factory=dict)  # step -> _Node
    cfg_ids: list[int] = field(default_factory=list)  # routes that end here


#: what `RouteTree.run` reads: one tensor for every route, or per first step (mapping or function)
Inputs: TypeAlias = torch.Tensor | Mapping[tuple, torch.Tensor] | Callable[[tuple], torch.Tensor]


class RouteTree:
    def __init__(self, routes: dict[int, Sequence[tuple]]):
        self.root = _Node()
        self.cfg_ids = list(routes)
        for cfg_id, steps in routes.items():
            node = self.root
            for step in steps:
                node = node.children.setdefault(step, _Node())
            node.cfg_ids.append(cfg_id)

    def nodes(self) -> Iterable[tuple[tuple, _Node]]:
        stack = list(self.root.children.items())
        while stack:
            step, node = stack.pop()
            yield step, node
            stack.extend(node.children.items())

    def unique_steps(self) -> list[tuple]:
        """One entry per trie node: the steps computed once per batch."""
        return [step for step, _ in self.nodes()]

    def roots(self) -> list[tuple]:
        """The distinct first steps of the routes: one per trie root, in order of first use."""
        return list(self.root.children)

    def run(self, run_step: Callable[[tuple, torch.Tensor], torch.Tensor], x: Inputs,
            emit: Callable[[int, torch.Tensor], None]) -> None:
        """Walk the trie depth first; call ``emit(cfg_id, output)`` for every route. `x` is the input of every route
        (a tensor), or per root: a mapping or a function from a route's first step to the tensor that route reads
        (asked once per root). Only the activations on the path from a root to the current node are alive, so the
        memory held is at most one activation per step of the longest route."""
        if isinstance(x, torch.Tensor):
            input_for = lambda step: x
        elif isinstance(x, Mapping):
            input_for = x.__getitem__
        elif callable(x):
            input_for = x
        else:
            raise TypeError(f"RouteTree.run takes a tensor, a mapping or a function of the first step, not "
                            f"{type(x).__name__}")
        # explicit stack instead of recursion: (node's children iterator, activation feeding them); the roots' entry
        # holds no activation: each root reads its own input
        stack: list[tuple[Any, Any]] = [(iter(self.root.children.items()), None)]
        while stack:
            children, h = stack[-1]
            item = next(children, None)
            if item is None:
                stack.pop()  # every route continuing from `h` is done: drop it
                continue
            step, node = item
            out = run_step(step, input_for(step) if len(stack) == 1 else h)
            for cfg_id in node.cfg_ids:
                emit(cfg_id, out)
            if node.children:
                stack.append((iter(node.children.items()), out))
