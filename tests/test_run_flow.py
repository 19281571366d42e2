"""train.py's flow runs forward: the command line, config files and recipe are resolved once into frozen arguments,
written as args.yaml after every check and before any work (a refused run leaves no trace); stitch positions are
chosen before the SN-Net is built; nothing changes args mid-run."""

import pytest
import yaml
from helpers import FAST


def test_the_recorded_arguments_refuse_changes():
    """What args.yaml and a checkpoint record: the options by flag name (lists as typed), then what the run
    resolved; read-only (the run reads its typed options)."""
    from snnet.train.describe import recorded_arguments
    from snnet.train.options import RunOptions
    options = RunOptions.from_values({"data_dir": "d", "lr": 0.1, "epochs": 3, "mean": (0.5,)})
    recorded = recorded_arguments(options, rank=0, epochs=5)
    assert (recorded["lr"], recorded["epochs"], recorded["mean"], recorded["rank"]) == (0.1, 5, [0.5], 0)
    assert list(recorded)[-1] == "rank" and "data_dir" in recorded
    with pytest.raises(TypeError):
        recorded["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        del recorded["epochs"]  # type: ignore[attr-defined]


class Stop(BaseException):
    """Raised by a patched phase to stop train.py's main where it is: not a user error, not Ctrl-C (which main
    turns into exit 130)."""


def _stop_at(monkeypatch, name):
    """Make train.py's phase `name` (a function the trainer's build calls) record what it got and stop the run."""
    import snnet.train.trainer as trainer_mod
    seen = {}
    recorded_arguments = trainer_mod.recorded_arguments

    def record(options, **resolved):  # the resolved options and the arguments they record
        seen["options"] = options
        seen["args"] = recorded_arguments(options, **resolved)
        return seen["args"]

    def stop(*a, **k):
        if name == "build_network":
            seen["network"] = next(x for x in a if hasattr(x, "num_classes"))
        raise Stop  # not a user error: stops the run where it is

    monkeypatch.setattr(trainer_mod, "recorded_arguments", record)
    monkeypatch.setattr(trainer_mod, name, stop)
    return seen


def _argv(digits_folder, tiny_config, tmp_path):
    return [str(digits_folder), "--stitch_config", str(tiny_config), *map(str, FAST), "--epochs", "1", "--output",
            str(tmp_path), "--experiment", "flow", "--device", "cpu"]


def test_args_yaml_is_written_before_any_work(digits_folder, tiny_config, tmp_path, monkeypatch):
    """The run stops at the least-squares init (the first work): args.yaml is already there, with what the run
    resolved (classes from the data folder) and the same resolved section as --dry-run prints."""
    import snnet.train.main as main_mod
    seen = _stop_at(monkeypatch, "run_ls_init")
    with pytest.raises(Stop):
        main_mod.main(_argv(digits_folder, tiny_config, tmp_path))
    written = yaml.safe_load((tmp_path / "flow" / "args.yaml").read_text())
    assert written["num_classes"] == 10 and written["resume"] in ("", None)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in seen["args"].items()}  # YAML: lists
    assert plain == {k: v for k, v in written.items() if k != "resolved"}  # what was recorded is what runs
    with pytest.raises(TypeError):
        seen["args"]["lr"] = 1.0
    dry = main_mod.describe_run(seen["options"], None, "cpu")["resolved"]
    assert written["resolved"]["lr"] == dry["lr"] and written["resolved"]["schedule"] == dry["schedule"]


def test_a_run_refused_while_building_leaves_no_trace(digits_folder, tiny_config, tmp_path, monkeypatch):
    """Building the network is the last check (anchors, positions, resolutions): stopped there, nothing is
    written, and the arguments it got are already the frozen, resolved ones."""
    import snnet.train.main as main_mod
    seen = _stop_at(monkeypatch, "build_network")
    with pytest.raises(Stop):
        main_mod.main(_argv(digits_folder, tiny_config, tmp_path))
    assert not (tmp_path / "flow").exists()
    assert seen["network"].num_classes == 10  # the resolved options (classes from the data folder), frozen
    with pytest.raises(AttributeError):
        seen["network"].num_classes = 2


def test_positions_are_chosen_before_the_snnet_is_built(monkeypatch):
    """build_snnet refuses a config that still asks to select positions: selection happens on the built anchors,
    before the SN-Net exists (train.py's build_network), never from inside it."""
    from snnet import parse_stitch_config
    from snnet.stitching.build import build_snnet
    from snnet.stitching.config import ConfigError
    cfg = parse_stitch_config({"anchors": [{"name": "deit_tiny_patch16_224", "model_kwargs": {
        "patch_size": 4, "depth": 2, "embed_dim": w, "num_heads": 2}} for w in (8, 16)],
        "positions": {"select": "kl", "per_pair": 1}})
    with pytest.raises(ConfigError, match="selects from data, which only train.py does"):
        build_snnet(cfg, pretrained=False, img_size=16, num_classes=10)


@pytest.mark.slow
def test_an_evaluation_is_never_taken_for_other_anchor_weights(digits_folder, tmp_path):
    """--eval without a checkpoint is identified by the network's own weights: a rerun with the same anchor files skips
    the evaluated stitches; the same config with other weights in those files is refused (one line), never
    answered with the earlier numbers. train.py's three runs are forked from helpers' server (its imports done once),
    each with only the environment below, as a fresh process with that environment."""
    import json

    import timm
    import torch
    from helpers import TINY, shared_cli
    anchors = []
    for n, a in enumerate(TINY):
        torch.manual_seed(n)
        model = timm.create_model(a["name"], num_classes=10, img_size=16, **a["model_kwargs"])
        torch.save({"state_dict": model.state_dict()}, tmp_path / f"a{n}.pth")
        anchors.append({**a, "model_kwargs": {**a["model_kwargs"], "img_size": 16},
                        "checkpoint": str(tmp_path / f"a{n}.pth")})
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"anchors": anchors, "skip_final_norm": False, "stitch_init_bs": 32}))
    argv = [str(digits_folder), "--stitch_config", str(cfg), *map(str, FAST), "--eval", "--output", str(tmp_path),
            "--experiment", "ev", "--device", "cpu"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    train_py = lambda: shared_cli().call("train", argv, env=env, timeout=300)  # (exit code, stdout, stderr)
    code, _, err = train_py()
    assert code == 0, err[-2000:]
    code, _, err = train_py()
    assert code == 0 and "already evaluated" in err, err[-2000:]
    torch.manual_seed(99)  # other weights under the same file name
    model = timm.create_model(TINY[1]["name"], num_classes=10, img_size=16, **TINY[1]["model_kwargs"])
    torch.save({"state_dict": model.state_dict()}, tmp_path / "a1.pth")
    code, _, err = train_py()
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and "another checkpoint" in err


@pytest.mark.dist
def test_random_anchors_are_the_same_on_every_rank(digits_folder, tiny_config, tmp_path):
    """Random anchors (no checkpoint, no pretrained weights) are built before the ranks' streams part: an evaluation on
    2 processes (each half the images, statistics of the LS init summed over both) gives each stitch the top-1 of
    the same evaluation on 1 process. With anchors drawn per rank the halves would come from different networks."""
    import json
    import sys

    from helpers import run
    common = [str(digits_folder), "--stitch_config", str(tiny_config), *map(str, FAST), "--eval", "--output",
              str(tmp_path)]
    one = run([sys.executable, "train.py", *common, "--experiment", "one"], timeout=300)  # one process, no torchrun
    two = run(["./distributed_train.sh", "2", *common, "--experiment", "two"], timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    read = lambda name: [json.loads(l) for l in (tmp_path / name / "stitches_res.txt").read_text().splitlines()]
    one, two = read("one"), read("two")
    assert len(one) == 12 and [r["acc1"] for r in one] == [r["acc1"] for r in two]
    # random tiny anchors predict nearly one class (top-1 near 10 % whatever the weights): the loss tells networks apart
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-5)


def test_the_preflight_the_dry_run_and_the_trainer_read_one_resolved_run(digits_folder, tiny_config, tmp_path,
                                                                         monkeypatch, capsys):
    """train.py resolves its options once (`resolve`: the global batch, the rates, the schedule, the folder) and
    hands the same frozen `RunOptions` to the preflight's checks, to args.yaml's description and to the trainer;
    none of them resolves again. --dry-run prints the same values."""
    import snnet.train.main as main_mod
    import snnet.train.preflight as preflight_mod
    import snnet.train.trainer as trainer_mod
    from snnet.train.options import RunOptions

    made, read = [], {}
    resolve, check_training, describe_run = main_mod.resolve, preflight_mod.check_training, trainer_mod.describe_run

    def resolving(*a, **k):
        made.append(resolve(*a, **k))
        return made[-1]

    def checking(options, *a):
        read["preflight"] = options
        return check_training(options, *a)

    def describing(options, *a, **k):
        read["describe"] = options
        return describe_run(options, *a, **k)

    def trainer(self, net, loader, loss_fn, options, *a, **k):
        read["trainer"] = options
        raise Stop  # the trainer got what it builds from: stop before it builds

    monkeypatch.setattr(main_mod, "resolve", resolving)
    monkeypatch.setattr(preflight_mod, "check_training", checking)
    monkeypatch.setattr(trainer_mod, "describe_run", describing)
    monkeypatch.setattr(trainer_mod.Trainer, "__init__", trainer)
    monkeypatch.setattr(trainer_mod, "run_ls_init", lambda *a, **k: None)
    argv = [*_argv(digits_folder, tiny_config, tmp_path), "-b", "8", "--lr", "2e-3"]
    with pytest.raises(Stop):
        main_mod.main(argv)
    assert len(made) == 1 and isinstance(made[0], RunOptions)
    assert read["preflight"] is made[0]
    # the trainer's build adds only the data's classes (known once the datasets are open)
    assert read["describe"] is read["trainer"] and read["trainer"] == made[0].replaced(
        num_classes=10, class_names=read["trainer"].network.class_names)
    assert (made[0].global_batch, made[0].out_dir, made[0].lr) == (8, tmp_path / "flow", 2e-3)
    written = yaml.safe_load((tmp_path / "flow" / "args.yaml").read_text())["resolved"]
    capsys.readouterr()
    assert main_mod.main([*argv, "--dry-run"]) in (0, None)
    dry = yaml.safe_load(capsys.readouterr().out)["resolved"]
    assert len(made) == 2 and read["preflight"] is made[1]
    assert (dry["global_batch"], dry["lr"], dry["schedule"]) == (written["global_batch"], written["lr"],
                                                                 written["schedule"])
    assert (dry["global_batch"], dry["lr"]) == (made[1].global_batch, made[1].lr)


def _project_frames(stack) -> list[str]:
    """The repository's own frames of `stack` (a traceback.extract_stack()), from train.py's module frame down:
    'file:function', the library's and the entry point's (not the tests', torch's or the environment's)."""
    from helpers import ROOT
    frames = [f for f in stack if f.filename.startswith(ROOT + "/") and "/.venv/" not in f.filename
              and "/tests/" not in f.filename]
    start = next(i for i, f in enumerate(frames) if f.filename == ROOT + "/train.py" and f.name == "<module>")
    return [f"{f.filename[len(ROOT) + 1:]}:{f.name}" for f in frames[start:]]


@pytest.mark.slow
def test_the_network_is_at_most_six_frames_below_train_py(digits_folder, tiny_config, tmp_path, monkeypatch):
    """train.py's training step calls the network, and its --eval --resume reaches the one-pass evaluation's
    mechanism (the route tree), within 6 of the repository's own frames counted from train.py's module frame
    (timm: train.py, main, train_one_epoch; torchtitan about 5)."""
    import runpy
    import sys
    import traceback

    import torch
    from helpers import ROOT

    from snnet.stitching.model import RoutedNet
    stacks, phase = {}, []

    def record(module, inputs):  # the first training call of the network; the first unit the --eval run's tree runs
        if phase[-1] in stacks:
            return
        if phase[-1] == "train" and isinstance(module, RoutedNet) and module.training:
            stacks["train"] = traceback.extract_stack()
        elif phase[-1] == "eval" and any(f.filename.endswith("snnet/stitching/route_tree.py")
                                         for f in traceback.extract_stack()):
            stacks["eval"] = traceback.extract_stack()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    argv = [str(digits_folder), "--stitch_config", str(tiny_config), *map(str, FAST), "--epochs", "1", "--output",
            str(tmp_path), "--device", "cpu"]
    try:
        for name, extra in (("train", ["--experiment", "frames"]),
                            ("eval", ["--experiment", "frames-eval", "--eval", "--resume",
                                      str(tmp_path / "frames" / "last.pth.tar")])):
            phase.append(name)
            monkeypatch.setattr(sys, "argv", [ROOT + "/train.py", *argv, *extra])
            with pytest.raises(SystemExit) as done:
                runpy.run_path(ROOT + "/train.py", run_name="__main__")
            assert done.value.code == 0, name
    finally:
        handle.remove()
    train = _project_frames(stacks["train"])
    assert train[-1] == "snnet/train/trainer.py:train_one_epoch" and len(train) <= 6, train
    evaluation = _project_frames(stacks["eval"])
    first = next(i for i, f in enumerate(evaluation) if f.startswith("snnet/stitching/"))
    assert evaluation[first] == "snnet/stitching/route_tree.py:run" and first + 1 <= 6, evaluation
