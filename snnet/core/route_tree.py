"""Run many routes on one batch, computing every shared prefix once.

Routes are tuples of steps (pure data, `SNNet.routes`). Routes that begin with the same steps (the same anchor's
stem and blocks 0..j, or the same stage) share a path in a trie; a depth-first walk computes each trie node once
per batch. An activation lives only while the walk is inside its subtree: when the last route that continues from
it has been produced, Python drops it. Peak memory is therefore the activations along one root-to-leaf path, not
one per route.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch


@dataclass
class _Node:
    children: dict = field(default_factory=dict)  # step -> _Node
    cfg_ids: list[int] = field(default_factory=list)  # routes that end here


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

    def run(self, run_step: Callable[[tuple, torch.Tensor], torch.Tensor], x: torch.Tensor,
            emit: Callable[[int, torch.Tensor], None], track_bytes: bool = False) -> int:
        """Walk the trie on input `x`; call ``emit(cfg_id, output)`` for every route. Returns the peak bytes of
        live activations (input excluded) when `track_bytes`, else 0."""
        peak = live = 0

        def nbytes(t) -> int:
            if isinstance(t, torch.Tensor):
                return t.numel() * t.element_size()
            return sum(nbytes(v) for v in t) if isinstance(t, (tuple, list)) else 0

        # explicit stack instead of recursion: (node's children iterator, activation feeding them, its size)
        stack = [(iter(self.root.children.items()), x, 0)]
        while stack:
            children, h, size = stack[-1]
            item = next(children, None)
            if item is None:
                stack.pop()  # every route continuing from `h` is done: drop it
                live -= size
                continue
            step, node = item
            out = run_step(step, h)
            for cfg_id in node.cfg_ids:
                emit(cfg_id, out)
            if node.children:
                out_size = nbytes(out) if track_bytes else 0
                live += out_size
                peak = max(peak, live)
                stack.append((iter(node.children.items()), out, out_size))
            elif track_bytes:
                peak = max(peak, live + nbytes(out))
        return peak
