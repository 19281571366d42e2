"""One trainer (snnet/train/trainer.py) for train.py and stitch-train: its epoch loop (the training state a recovery
checkpoint saves and restores, the after-step hooks per optimizer step, a resumed epoch), and --model-ema
(`"model_ema": true` in a sweep's `train`): an EMA that differs from the raw weights is what validation and the
result evaluate and what is saved, in both tools."""
from __future__ import annotations

from collections import deque

import pytest
import torch
from helpers import FAST, TINY

from snnet import build_snnet, parse_stitch_config
from snnet.data.options import LoaderOptions
from snnet.train import main as train_main
from snnet.train import trainer as trainer_module
from snnet.train.options import (
    TRAINING_OPTIONS,
    OptimOptions,
    OptionError,
    RunOptions,
    ScheduleOptions,
    options_by_key,
)
from snnet.train.resolve import resolve
from snnet.train.resume import TrainState
from snnet.train.trainer import EpochHooks, Trainer

EMA = {"model_ema": True, "model_ema_decay": 0.5}  # a short memory: after a few steps far from the raw weights


def _floats_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(v, b[k]) for k, v in a.items() if v.is_floating_point())


def tiny_trainer(batches: int = 4, size: int = 8, sampler=None, **values) -> Trainer:
    """A trainer of a tiny two-anchor SN-Net on `batches` random batches of `size` images (16 px, 10 classes)."""
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config({"anchors": TINY, "skip_final_norm": False}), pretrained=False,
                      num_classes=10, img_size=16)
    data = [(torch.randn(size, 3, 16, 16), torch.randint(0, 10, (size,))) for _ in range(batches)]
    loss_fn = lambda x, out, y: torch.nn.functional.cross_entropy(out, y)
    options = resolve(RunOptions.from_values({"data_dir": "", "opt": "sgd", "lr": 0.1, "epochs": 2, "warmup_epochs": 0,
                                              "batch_size": size, "log_interval": 10 ** 6, **values}), world_size=1)
    return Trainer(net, data, loss_fn, options, sampler or (lambda step: step % net.num_configs), snapshot_rng=True)


def test_an_epoch_advances_the_state_and_calls_the_hooks_per_optimizer_step():
    trainer, steps = tiny_trainer(batches=7, size=2, grad_accum_steps=2), []
    trainer.after_step.append(steps.append)
    metrics = trainer.train_one_epoch(3)
    state = trainer.state
    assert steps == [1, 2, 3] and state.global_step == 3  # 7 batches, 2 per step: 1 dropped
    assert (state.epoch, state.epoch_step, state.epoch_loss[1]) == (3, 3, 12.0)
    assert metrics["loss"] == pytest.approx(state.epoch_loss[0] / 12)
    assert len(state.rng_after) == 2  # the last two batches' RNG snapshots (recovery checkpoints need them)


def test_under_a_grad_scaler_a_non_finite_loss_stops_at_the_next_read_and_never_reaches_the_weights():
    """fp16 with a GradScaler reads the losses back only where it logs (no stall of the device per step): a NaN loss
    at step 2 is caught at the read after step 4, named by its step, and the scaler kept it off the weights."""
    trainer = tiny_trainer(batches=6, amp=True, amp_dtype="float16", device="cpu", log_interval=4)
    assert trainer.loss_scaler is not None
    base, calls, weights = trainer.loss_fn, [], {}

    def loss_fn(x, out, y):
        calls.append(1)
        return base(x, out, y) * (float("nan") if len(calls) == 3 else 1.0)

    trainer.loss_fn = loss_fn
    trainer.after_step.append(lambda step: weights.__setitem__(step, {k: v.clone() for k, v in
                                                                       trainer.model.state_dict().items()}))
    with pytest.raises(trainer_module.NonFiniteLoss, match=r"at epoch 0, step 2 on rank 0 \(stitch cfg_id 2:"):
        trainer.train_one_epoch(0)
    assert sorted(weights) == [1, 2, 3, 4]  # trained on to the read
    assert not _floats_differ(weights[2], weights[3]) and _floats_differ(weights[3], weights[4])


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
    trainer, steps = tiny_trainer(batches=6, size=2), []
    trainer.after_step.append(steps.append)
    trainer.state = TrainState(global_step=2)
    trainer.state.continue_from(2, {"rng": None, "rng_prev": None, "epoch_loss": [0.0, 4.0]})
    trainer.train_one_epoch(0)
    assert steps == [3, 4, 5, 6] and trainer.state.skip == 0 and trainer.state.epoch_loss[1] == 12.0


def test_trainer_trains_an_ema_and_validates_it():
    trainer = tiny_trainer(grad_accum_steps=2, **EMA)
    net = trainer.model
    seen, ends = [], []

    class Hooks(EpochHooks):  # the caller's state on its hooks object, the hooks as methods
        def validate(self, epoch, train_metrics):
            seen.append(trainer.eval_model)
            return {}, None

        def end_epoch(self, epoch, train_metrics, metrics, lr):
            ends.append((epoch, lr))

    trainer.fit(Hooks())
    assert trainer.state.global_step == 2 * 2 and [e for e, _ in ends] == [0, 1]  # 4 batches, 2 per step, 2 epochs
    assert seen == [trainer.ema, trainer.ema] and trainer.ema is not net
    raw, ema = net.state_dict(), trainer.ema.state_dict()
    assert _floats_differ(raw, ema)
    trainer.use_ema_weights()
    assert not _floats_differ(net.state_dict(), ema)


def test_train_py_saves_validates_and_evaluates_the_ema(tmp_path, digits_folder, tiny_config, monkeypatch):
    """train.py --model-ema (one epoch, in process): the checkpoint's state_dict_ema is the trainer's EMA and
    differs from state_dict; validation and stitches_res_ema.txt evaluate the EMA itself."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    built, evaluated = [], []
    real_build, real_evaluate = Trainer.for_run.__func__, trainer_module.evaluate_all
    monkeypatch.setattr(Trainer, "for_run", classmethod(lambda cls, *a: built.append(real_build(cls, *a)) or built[-1]))

    def evaluate_all(net, *a, **k):
        evaluated.append((net, a[5] if len(a) > 5 else "stitches_res.txt"))
        return real_evaluate(net, *a, **k)

    monkeypatch.setattr(trainer_module, "evaluate_all", evaluate_all)
    validated = []
    real_validate = trainer_module.validate_stitches
    monkeypatch.setattr(trainer_module, "validate_stitches",
                        lambda net, *a, **k: validated.append(net) or real_validate(net, *a, **k))
    argv = [str(digits_folder), "--stitch_config", str(tiny_config), *FAST, "--epochs", "1", "--model-ema",
            "--model-ema-decay", "0.5", "--val-stitches", "0", "--save-predictions", "none", "--output",
            str(tmp_path), "--experiment", "ema"]
    assert train_main.main(argv) == 0
    (trainer,) = built
    state = torch.load(tmp_path / "ema" / "last.pth.tar", weights_only=True)
    ema = trainer.ema.checkpoint_state()
    assert state["state_dict_ema"].keys() == ema.keys()
    assert all(torch.equal(state["state_dict_ema"][k], v) for k, v in ema.items())
    assert _floats_differ(state["state_dict"], state["state_dict_ema"])
    assert validated == [trainer.net, trainer.ema]  # the raw panel, then the EMA's (the epoch's metrics)
    assert evaluated == [(trainer.net, "stitches_res.txt"), (trainer.ema, "stitches_res_ema.txt")]
    assert (tmp_path / "ema" / "stitches_res_ema.txt").is_file()


def test_stitch_train_model_ema_is_evaluated_and_saved(tmp_path, digits_folder, monkeypatch):
    """A sweep with ``"model_ema": true`` in its `train`: the EMA differs from the raw layer, the last validation
    (the result's acc1) evaluates the EMA, and stitch_layer.pth.tar holds the EMA's weights."""
    from test_stitch_train import TRAIN, write_sweep

    from snnet.explore.stitch_train import runner as runner_module
    from snnet.explore.stitch_train.jobs import run_sweep
    from snnet.explore.stitch_train.sweep import load_sweep
    from snnet.results.records import read_results
    from snnet.utils.checkpoint import load_checkpoint
    anchors = {f"v{w}": {"name": "deit_tiny_patch16_224",
                         "model_kwargs": {"patch_size": 4, "depth": 3, "embed_dim": w, "num_heads": 2}}
               for w in (8, 16)}
    swapped, evaluated = [], []
    real_use = trainer_module.Trainer.use_ema_weights

    def use_ema_weights(self):
        swapped.append((self, {k: v.clone() for k, v in self.model.state_dict().items()},
                        {k: v.clone() for k, v in self.ema.state_dict().items()}))
        real_use(self)

    monkeypatch.setattr(trainer_module.Trainer, "use_ema_weights", use_ema_weights)
    real_eval = runner_module.evaluate_stitches
    monkeypatch.setattr(runner_module, "evaluate_stitches", lambda net, *a, **k: evaluated.append(
        (net, real_eval(net, *a, **k))) or evaluated[-1][1])
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "x.yaml", anchors, digits_folder, out, runs=[{"pair": ["v8", "v16"], "cut": 1}],
                       train={**TRAIN, **EMA, "lr": 0.05}, pretrained=False)
    assert run_sweep(load_sweep(path)).trained == [0]
    ((trainer, raw, ema),) = swapped
    assert _floats_differ(raw, ema)
    run = read_results(out / "stitches_res.txt")[0]
    ran = [m for net, m in evaluated if net is trainer.ema]
    assert len(ran) == 2 and ran[-1][0]["acc1"] == run["acc1"]  # init and epoch 1: the EMA's; the result its last
    saved = load_checkpoint(out / "runs" / run["run"] / "stitch_layer.pth.tar")["state_dict"]
    layer = {k.split("transform.", 1)[1]: v for k, v in ema.items() if ".transform." in k}
    raw_layer = {k.split("transform.", 1)[1]: v for k, v in raw.items() if ".transform." in k}
    assert layer and all(torch.equal(saved[f"transform.{k}"], v) for k, v in layer.items())
    assert _floats_differ(raw_layer, layer)


@pytest.mark.parametrize("key, value, message", [
    ("model_ema", "yes", "key 'model_ema': 'yes' is not true or false"),
    ("epoch", 3, "unknown key 'epoch'; did you mean epochs"),
])
def test_options_by_key_names_the_key_and_the_fix(key, value, message):
    with pytest.raises(OptionError, match=message):
        options_by_key(TRAINING_OPTIONS, {key: value}, "sweep.yaml: train")
    made = options_by_key(TRAINING_OPTIONS, {"lr": "1e-3", "epochs": 2, "opt_betas": [0.9, 0.99]}, "x")
    assert made[OptimOptions].lr == 1e-3 and made[ScheduleOptions].epochs == 2
    assert made[OptimOptions].opt_betas == (0.9, 0.99)


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, "'epochs': 0 is not >= 1"), ("clip_mode", "l2", "'clip_mode': 'l2' is not one of 'norm'"),
    ("hflip", 2, "'hflip': 2.0 is not a probability"), ("scale", [0.5, -1], None)])
def test_options_by_key_refuses_what_train_py_refuses(key, value, message):
    """The typed options' value rules are train.py's: a value its parser refuses is refused by keyword too."""
    classes = (LoaderOptions, *TRAINING_OPTIONS)
    if message is None:  # no rule: taken as typed
        assert options_by_key(classes, {key: value}, "x")[LoaderOptions].scale == (0.5, -1)
        return
    with pytest.raises(OptionError, match=message):
        options_by_key(classes, {key: value}, "sweep.yaml: train")
