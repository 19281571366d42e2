"""The training loop's three parts (snnet/train/engine.py, issue 52): frozen `LoopSettings`, the `TrainState` a
recovery checkpoint saves and restores, and the `TrainContext` of built components holding both; on CPU, no data."""
import dataclasses
from collections import deque

import pytest
import torch
from torch import nn

from snnet.train.engine import LoopSettings, TrainContext, TrainState, train_one_epoch


class Tiny(nn.Module):
    """What the loop calls: forward(x, cfg_id)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, cfg_id):
        return self.fc(x)


def batches(n=6, size=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def context(net, steps, **settings):
    return TrainContext(lambda step: 0, LoopSettings(torch.device("cpu"), log_interval=10 ** 6, **settings),
                        parameters=lambda: list(net.parameters()), after_step=[steps.append])


def test_each_part_has_at_most_15_fields_and_the_settings_are_frozen():
    assert [len(dataclasses.fields(c)) for c in (LoopSettings, TrainState, TrainContext)] == [10, 7, 10]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoopSettings(torch.device("cpu")).accum_steps = 2


def test_an_epoch_advances_the_state_and_calls_the_hooks_per_optimizer_step():
    net, steps = Tiny(), []
    ctx = context(net, steps, accum_steps=2, snapshot_rng=True)
    loss_fn = lambda x, out, y: nn.functional.cross_entropy(out, y)
    metrics = train_one_epoch(3, net, batches(7), torch.optim.SGD(net.parameters(), lr=0.1), loss_fn, ctx)
    state = ctx.state
    assert steps == [1, 2, 3] and state.global_step == ctx.global_step == 3  # 7 batches, 2 per step: 1 dropped
    assert (state.epoch, state.epoch_step, state.epoch_loss[1]) == (3, 3, 12.0)
    assert metrics["loss"] == pytest.approx(state.epoch_loss[0] / 12)
    assert len(state.rng_after) == 2  # the last two batches' RNG snapshots (recovery checkpoints need them)


def test_a_recovery_rank_state_restores_what_the_epoch_continues_from():
    saved = TrainState(global_step=9, epoch=1, epoch_step=4, epoch_loss=[5.5, 8.0],
                       rng_after=deque(["a", "b"], maxlen=2)).rank_state()
    assert saved == {"rng": "b", "rng_prev": "a", "epoch_loss": [5.5, 8.0]}
    resumed = TrainState(global_step=9)
    resumed.continue_from(4, saved)
    assert (resumed.skip, resumed.restore, resumed.epoch_loss) == (4, ["a", "b"], [5.5, 8.0])
    assert TrainState(rng_after=deque(["only"], maxlen=2)).rank_state()["rng_prev"] is None


def test_a_resumed_epoch_skips_the_steps_it_already_trained():
    """From a recovery checkpoint after step 2 of 6: the epoch trains steps 3 to 6 and adds their samples to the
    saved loss sum."""
    net, steps, loss_fn = Tiny(), [], lambda x, out, y: nn.functional.cross_entropy(out, y)
    state = TrainState(global_step=2)
    state.continue_from(2, {"rng": None, "rng_prev": None, "epoch_loss": [0.0, 4.0]})
    ctx = dataclasses.replace(context(net, steps), state=state)
    train_one_epoch(0, net, batches(6), torch.optim.SGD(net.parameters(), lr=0.1), loss_fn, ctx)
    assert steps == [3, 4, 5, 6] and state.skip == 0 and state.epoch_loss[1] == 12.0
