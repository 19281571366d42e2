"""Dynamic batching per stitch: requests that chose the same stitch run as one batch of ``net(x, cfg_id)``.

One queue per cfg_id and one worker: the stitch whose oldest request has waited longest runs next, as soon as its
queue holds `max_batch` requests or its oldest request has waited `max_wait_ms` (the classic size-or-timeout rule
of serving engines, applied per stitch because one batch runs one route). The forward pass runs in one worker
thread, so the event loop keeps accepting requests (and their queue depth is the load the policy sees) while a
batch computes. A failing batch fails its requests only; the worker goes on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable

import torch

Run = Callable[[torch.Tensor, int], torch.Tensor]


class StitchBatcher:
    """`await submit(x, cfg_id)` -> (the logits row of `x`, the size of the batch it ran in)."""

    def __init__(self, run: Run, max_batch: int = 16, max_wait_ms: float = 2.0):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.queues: dict[int, list[tuple[torch.Tensor, asyncio.Future, float]]] = {}
        self.running: tuple[int, int, float] | None = None  # (cfg_id, batch size, start time) of the batch running
        self.batches = 0
        self.on_batch: Callable[[int, int, float], None] | None = None  # (cfg_id, size, ms) after each batch
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # one thread: batches run one after another, as the latency table measured them
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-batch")

    def queued(self) -> dict[int, int]:
        """cfg_id -> requests waiting (the batch running now not included)."""
        return {c: len(q) for c, q in self.queues.items() if q}

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values()) + (self.running[1] if self.running else 0)

    async def submit(self, x: torch.Tensor, cfg_id: int) -> tuple[torch.Tensor, int]:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._loop())
        future: asyncio.Future = loop.create_future()
        self.queues.setdefault(cfg_id, []).append((x, future, time.perf_counter()))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            ready = {c: q for c, q in self.queues.items() if q}
            if not ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            cfg_id = min(ready, key=lambda c: ready[c][0][2])  # the oldest request's stitch
            queue = ready[cfg_id]
            left = queue[0][2] + self.max_wait - time.perf_counter()
            if len(queue) < self.max_batch and left > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    pass
                continue
            batch, self.queues[cfg_id] = queue[:self.max_batch], queue[self.max_batch:]
            started = time.perf_counter()
            self.running = (cfg_id, len(batch), started)
            try:
                x = torch.stack([item[0] for item in batch])
                out = await loop.run_in_executor(self._pool, self._forward, x, cfg_id)
                if self.on_batch is not None:
                    self.on_batch(cfg_id, len(batch), (time.perf_counter() - started) * 1e3)
            except Exception as e:  # this batch's requests fail; the server goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for i, (_, future, _) in enumerate(batch):
                    if not future.done():  # a client that left has its future cancelled
                        future.set_result((out[i], len(batch)))
            finally:
                self.running = None
                self.batches += 1

    def _forward(self, x: torch.Tensor, cfg_id: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.run(x, cfg_id)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
