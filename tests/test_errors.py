"""One error type: every error a user can cause is an `SNNetError` (with its exit code), caught once by each entry
point and printed as one line; a model argument timm cannot take is such an error, whatever timm raised; a
non-finite loss stops the run (exit 3) naming the step and stitch and leaves the last good checkpoint intact."""
import ast
import hashlib
import json
import sys
from pathlib import Path

import pytest
from helpers import FAST, ROOT, run, run_cli

from snnet.utils.errors import SNNetError


def _error_classes():
    """(module, class name, base names) of every class named *Error in the library and the family packages."""
    out = []
    for path in [*Path(ROOT, "snnet").rglob("*.py"), *Path(ROOT).glob("stitching_*/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Mismatch", "Loss")) and node.bases:
                out.append((str(path.relative_to(ROOT)), node.name, [ast.unparse(b) for b in node.bases]))
    return out


def test_every_error_class_is_an_snnet_error():
    import importlib
    for path, name, _ in _error_classes():
        module = importlib.import_module(path[:-3].replace("/", "."))
        cls = getattr(module, name)
        if name.startswith("_") or not issubclass(cls, Exception):
            continue
        internal = name in ("StateDictMismatch",)  # raised and caught inside checkpoint loading, never shown
        assert internal or issubclass(cls, SNNetError), f"{path}: {name} is not an SNNetError"


def test_one_usage_error_class():
    defined = [(p, n) for p, n, _ in _error_classes() if n == "UsageError"]
    assert defined == [("snnet/utils/errors.py", "UsageError")], defined


BAD_KWARGS = [("deit_tiny_patch16_224", {"depth": -1}, "RuntimeError"),
              ("deit_tiny_patch16_224", {"embed_dim": 7, "num_heads": 2}, "AssertionError"),
              ("resnet18", {"block": "nope"}, "AttributeError"),
              ("deit_tiny_patch16_224", {"bogus": 1}, "TypeError"),
              ("deit_tiny_patch16_224", {"mlp_ratio": "abc"}, "ValueError")]


@pytest.mark.parametrize("name,kwargs,raised", BAD_KWARGS)
def test_a_bad_model_argument_is_an_anchor_error(name, kwargs, raised):
    from snnet.stitching.adapter import AnchorError
    from snnet.stitching.build import create_anchor
    from snnet.stitching.config import AnchorSpec
    with pytest.raises(AnchorError, match=rf"cannot create '{name}' with arguments .*\({raised}.*fix --model-kwargs"):
        create_anchor(AnchorSpec(name, None, kwargs), pretrained=False)


def test_bad_model_kwargs_are_one_line_in_train_py(digits_folder, tiny_config, capsys):
    from snnet.train.main import main
    rc = main([str(digits_folder), "--stitch_config", str(tiny_config), *map(str, FAST), "--model-kwargs",
               "depth=-1", "--device", "cpu", "--eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: cannot create 'deit_tiny_patch16_224' with arguments"), err


def test_bad_model_kwargs_are_one_line_in_snnet(digits_folder, tmp_path, capsys):
    anchor = json.dumps({"name": "deit_tiny_patch16_224", "model_kwargs": {"depth": -1, "img_size": 16,
                                                                           "patch_size": 4}})
    rc, out, err = run_cli(capsys, "similarity", "--data", digits_folder, "--anchors", anchor, "resnet18", "--out",
                           tmp_path / "sim", "--no-pretrained", "--device", "cpu", "-b", "8", "--batches", "1")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("snnet similarity: error: cannot create 'deit_tiny_patch16_224' with arguments"), err


def test_exit_codes_come_from_the_error():
    from snnet.train.trainer import NonFiniteLoss
    assert SNNetError.exit_code == 2 and NonFiniteLoss.exit_code == 3 and issubclass(NonFiniteLoss, SNNetError)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, digits_folder):
    base = [sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--output", tmp_path,
            "--experiment", "nan"]
    r = run(base + ["--epochs", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    last = tmp_path / "nan" / "last.pth.tar"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    r = run(base + ["--epochs", "3", "--resume", last, "--no-resume-opt", "--opt", "sgd", "--lr", "1e12"])
    assert r.returncode == 3, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss at epoch 1, step ") and "(stitch cfg_id " in err, err
    assert "the last good checkpoint" in err and "is kept" in err
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
