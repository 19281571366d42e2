"""`train.py --dry-run` prints, byte for byte, what it printed when these files were recorded (the options
are re-declared, the parser derived from them; every recipe card, the seed command and the precedence of -c YAML,
stitch config and typed flags must resolve exactly as before).

Recorded outputs: tests/data/dry_run/<case>.yaml. To re-record after a change that is meant to change what a run
resolves (never to make this test pass), run with SNNET_RECORD_DRY_RUNS=1 and review the diff.
"""
import os
from pathlib import Path

import pytest

from snnet.train.main import main

RECORDED = Path(__file__).parent / "data" / "dry_run"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_checkout(tmp_path, monkeypatch):
    """Every dry run from a folder laid out like a fresh checkout (configs/ only): the demo cards' relative anchor
    checkpoints resolve beside the card unless output/demo/ exists in the working folder (`make demo` writes it),
    so in the repository itself the recording would depend on whether the demo has run."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
CARDS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.json"))
#: case -> (command line after train.py, processes); the recipe cards as tests/test_recipes.py runs them
CASES = {
    # the seed command (README, docs/snnet_compat.md C16): nothing but the data and the card, one process
    "seed_command": (["/data/imagenet", "--stitch_config", "configs/deit_ti_s_b.json"], 1),
    **{f"card_{card}": (["/data/imagenet", "--stitch_config", f"configs/{card}.json", "--device", "cuda"], 8)
       for card in CARDS},
    # typed flags over the card (-b, --lr, a switch, a list, a key=value flag, an alias)
    "card_typed_flags": (["/data/imagenet", "--stitch_config", "configs/swin_ti_s_b.json", "--device", "cuda", "-b",
                          "64", "--lr", "0.1", "--no-amp-loss", "--scale", "0.5", "1.0", "--dr", "0.5",
                          "--model-kwargs", "drop_rate=0.1", "--val-stitches", "0", "3", "--torchcompile"], 4),
    # one plain timm model, timm's defaults
    "plain_model": (["/data/imagenet", "--model", "resnet18", "--device", "cpu"], 1),
}


def _slow(case: str):
    return pytest.param(case, marks=pytest.mark.slow) if case.endswith("_v2") else case


def dry_run_text(argv, world_size, capsys, monkeypatch) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the seed command's device: the same anywhere
    # the loader-worker default is timm's 4 fitted to the machine's cores (tests/test_short_runs.py): a
    # machine with 4 or more, so the recording is the same on any machine
    monkeypatch.setattr("snnet.data.loaders.usable_cores", lambda: 64)
    assert main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def check(case: str, text: str) -> None:
    path = RECORDED / (f"{case}.json" if case == "flags" else f"{case}.yaml")
    if os.environ.get("SNNET_RECORD_DRY_RUNS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is not recorded"
    recorded = path.read_text()
    if text != recorded:
        import difflib
        diff = "".join(difflib.unified_diff(recorded.splitlines(True), text.splitlines(True), "recorded", "now", n=1))
        pytest.fail(f"{case}: --dry-run differs from the recorded output:\n{diff[:4000]}")


@pytest.mark.parametrize("case", [_slow(c) for c in CASES])
@pytest.mark.slow
def test_dry_run_is_byte_identical_to_the_recording(case, capsys, monkeypatch):
    argv, world_size = CASES[case]
    check(case, dry_run_text(argv, world_size, capsys, monkeypatch))


@pytest.mark.slow
def test_yaml_then_card_then_typed(tmp_path, capsys, monkeypatch):
    """The precedence, recorded: a -c YAML under the stitch config under typed flags (the YAML names the card)."""
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("stitch_config: configs/levit_192_256.json\nepochs: 7\nbatch-size: 4\nopt: sgd\n"
                         "warmup_epochs: 2\nmean: [0.5, 0.5, 0.5]\n")
    text = dry_run_text(["/data/imagenet", "-c", str(yaml_file), "--device", "cuda", "--warmup-epochs", "1"], 8,
                        capsys, monkeypatch)
    check("yaml_card_typed", text.replace(str(yaml_file), "<yaml>"))


def test_a_changed_output_fails(capsys, monkeypatch):
    """The comparison can fail: one flag more changes the printed run."""
    monkeypatch.delenv("SNNET_RECORD_DRY_RUNS", raising=False)
    argv, world_size = CASES["plain_model"]
    with pytest.raises(pytest.fail.Exception, match="differs from the recorded"):
        check("plain_model", dry_run_text([*argv, "--epochs", "7"], world_size, capsys, monkeypatch))


def parser_surface() -> str:
    """Every flag of train.py as the parser knows it: its spellings, dest, default, nargs, choices, const, metavar."""
    import json

    from snnet.train.args import build_parser
    rows = [{"flags": a.option_strings, "dest": a.dest, "default": a.default, "nargs": a.nargs,
             "choices": list(a.choices) if a.choices else None, "const": a.const, "metavar": a.metavar,
             "switch": a.nargs == 0} for a in build_parser()._actions if a.dest != "help"]
    return json.dumps(sorted(rows, key=lambda r: r["dest"]), indent=0, default=repr) + "\n"


def test_train_py_flags_are_spelled_as_recorded():
    """timm's flag names and spellings, aliases, defaults, nargs and choices: as recorded."""
    check("flags", parser_surface())
