"""SN-Net's pickled releases load only through `snnet convert --trust` (which still runs no code from the file), and
convert maps their keys onto ours."""
import argparse
import json
import os
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import FAST, assert_refused, run, run_cli

from snnet import build_snnet, load_stitch_config

PWNED = Path("/tmp/snnet_pwned_marker_convert")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def tiny_snnet(cfg_path):
    torch.manual_seed(0)
    return build_snnet(load_stitch_config(cfg_path), pretrained=False, img_size=16, num_classes=10)


@pytest.mark.slow
def test_snnet_release_is_refused_by_train_and_converted_on_request(tmp_path, tiny_config, digits_folder):
    net = tiny_snnet(tiny_config)
    # what SN-Net's main.py saves (docs/snnet_compat.md, C26): weights + a pickled Namespace
    release = tmp_path / "snnet_deit.pth"
    torch.save({"model": net.state_dict(), "epoch": 49, "args": argparse.Namespace(lr=5e-5, model="snnet"),
                "optimizer": {"state": {}, "param_groups": []}}, release)
    base = [sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, "--eval", *FAST,
            "--output", tmp_path, "--experiment", "ev"]
    r = run(base + ["--resume", release])
    assert r.returncode == 2 and "holds pickled Python objects" in r.stderr, r.stderr
    r = run([sys.executable, "-m", "snnet.cli", "convert", release, tmp_path / "ours.pth.tar"])
    assert r.returncode == 2 and "add --trust" in r.stderr and not (tmp_path / "ours.pth.tar").exists()
    r = run([sys.executable, "-m", "snnet.cli", "convert", release, tmp_path / "ours.pth.tar", "--trust"])
    assert r.returncode == 0, r.stderr
    ours = torch.load(tmp_path / "ours.pth.tar", weights_only=True)
    assert json.loads(ours["converted_from"])["snnet_args"] == {"lr": 5e-5, "model": "snnet"}
    for k, v in net.state_dict().items():
        assert torch.equal(ours["state_dict"][k], v), k
    r = run(base + ["--resume", tmp_path / "ours.pth.tar"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "ev" / "stitches_res.txt").read_text().splitlines()) == net.num_configs


def test_swin_release_with_cfgnode_maps_keys(tmp_path):
    """SN-Net's Swin checkpoints pickle a yacs CfgNode and use Microsoft Swin names: read without yacs, keys mapped."""
    from snnet.deploy.convert import convert_release
    from stitching_swin.convert import ours_to_snnet
    cfg = {"anchors": [{"name": "swin_tiny_patch4_window7_224",
                        "model_kwargs": {"embed_dim": 16, "num_heads": [1, 1, 2, 2]}},
                       {"name": "swin_small_patch4_window7_224",
                        "model_kwargs": {"embed_dim": 16, "num_heads": [1, 1, 2, 2]}}]}
    (tmp_path / "swin.json").write_text(json.dumps(cfg))
    net = build_snnet(load_stitch_config(tmp_path / "swin.json"), pretrained=False, num_classes=10, img_size=64)
    yacs = types.ModuleType("yacs")
    config = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode = CfgNode
    sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config
    try:
        node = CfgNode(MODEL=CfgNode(TYPE="snnet"), TRAIN=CfgNode(EPOCHS=50))
        torch.save({"model": ours_to_snnet(net.state_dict()), "config": node, "epoch": 49, "max_accuracy": 0.0},
                   tmp_path / "swin.pth")
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    summary = convert_release(tmp_path / "swin.pth", tmp_path / "swin.pth.tar")
    assert summary["family"] == "swin"
    converted = torch.load(tmp_path / "swin.pth.tar", weights_only=True)["state_dict"]
    net.load_state_dict(converted, strict=True)
    assert json.loads(torch.load(tmp_path / "swin.pth.tar", weights_only=True)["converted_from"])["snnet_args"][
        "TRAIN"] == {"EPOCHS": 50}


def test_convert_refuses_other_pickled_objects_and_runs_nothing(tmp_path):
    PWNED.unlink(missing_ok=True)
    torch.save({"model": {}, "args": Exploit()}, tmp_path / "evil.pth")
    r = run([sys.executable, "-m", "snnet.cli", "convert", tmp_path / "evil.pth", tmp_path / "out.pth.tar", "--trust"])
    assert r.returncode == 2 and "refused unread" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "(posix.system)" in r.stderr and "\x1b" not in r.stderr, r.stderr  # the culprit named, not torch's advice
    assert not PWNED.exists() and not (tmp_path / "out.pth.tar").exists()


def test_a_release_cut_short_is_said_to_be_corrupt(tmp_path):
    """A download that stopped part-way is no pickle of other objects: the line says to download it again."""
    from snnet.deploy.convert import load_release
    from snnet.utils.checkpoint import CheckpointError
    torch.save({"model": {"w": torch.zeros(64)}}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cannot be read \(.+\); it is corrupt or cut short .* download it"):
        load_release(tmp_path / "cut.pth")


def test_convert_checks_both_paths_before_asking_for_trust(tmp_path, capsys):
    """What no --trust can fix is said first: a file torch.save did not write, an output folder, a file in the
    output's way or a folder that takes no write (/proc); nothing is written."""
    plain, text, folder = tmp_path / "plain.pth.tar", tmp_path / "notes.pth", tmp_path / "out"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)
    text.write_text("not a checkpoint\n")
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "hub.safetensors")
    for argv, needle in [((text, tmp_path / "a.pth.tar"), "is not a file torch.save wrote"),
                         ((tmp_path / "hub.safetensors", tmp_path / "a.pth.tar"),
                          "is a safetensors file, which needs no conversion"),
                         ((tmp_path / "missing.pth", tmp_path / "a.pth.tar"), "does not exist"),
                         ((plain, folder), f"output {str(folder)!r} is a folder; give a file path, e.g. "
                                           f"{str(folder / 'plain.pth.tar')!r}"),
                         ((plain, text / "a.pth.tar"), f"{str(text)!r} is a file, not a folder"),
                         ((plain, "/proc/snnet-convert/a.pth.tar"), "folder '/proc/snnet-convert' "),  # kernel: no
                         ((plain, tmp_path / "a.pth.tar"), "add --trust")]:
        rc, _, err = run_cli(capsys, "convert", *argv)
        assert_refused(rc, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.safetensors", "notes.pth", "out", "plain.pth.tar"]
    assert list(folder.iterdir()) == []


def test_convert_refuses_weights_that_are_no_state_dict(tmp_path, capsys):
    """An empty state dict, or one with an entry that is not a tensor, is refused naming it: converted, it would
    only fail later, where an anchor's checkpoint or --resume loads it. Nothing is written."""
    for name, weights, needle in [("empty", {}, "holds an empty state dict"),
                                  ("text", {"w": torch.zeros(2), "note": "x"}, "weight 'note' is a str, not a tensor"),
                                  ("nested", {"w": torch.zeros(2), "block": {"b": torch.zeros(1)}},
                                   "weight 'block' is a dict, not a tensor")]:
        torch.save({"model": weights, "epoch": 3}, tmp_path / f"{name}.pth")
        rc, _, err = run_cli(capsys, "convert", tmp_path / f"{name}.pth", tmp_path / f"{name}.pth.tar", "--trust")
        assert_refused(rc, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pth", "nested.pth", "text.pth"]


def test_convert_replaces_only_its_own_earlier_output(tmp_path, capsys):
    """An output that exists is replaced only when an earlier conversion wrote it (a rerun): a checkpoint that
    train.py wrote there, or any other file, is refused and kept as it was."""
    from snnet.utils.checkpoint import save_checkpoint
    release, trained, notes = tmp_path / "release.pth", tmp_path / "last.pth.tar", tmp_path / "notes.txt"
    torch.save({"model": {"w": torch.zeros(2)}}, release)
    save_checkpoint(trained, {"state_dict": {"w": torch.ones(2)}, "epoch": 9, "args": "{}"})
    notes.write_text("mine\n")
    before = trained.read_bytes()
    for dst in (trained, notes):
        rc, _, err = run_cli(capsys, "convert", release, dst, "--trust")
        assert_refused(rc, err, f"output {str(dst)!r} exists and is no earlier snnet convert output")
    assert trained.read_bytes() == before and notes.read_text() == "mine\n"
    for _ in range(2):  # converted, then converted again onto its own output
        rc, out, _ = run_cli(capsys, "convert", release, tmp_path / "ours.pth.tar", "--trust")
        assert rc == 0 and "converted" in out


def test_convert_says_what_it_wrote_in_words(tmp_path, capsys):
    torch.save({"model": {"anchors.0.w": torch.zeros(2)}, "epoch": 3}, tmp_path / "one.pth")
    rc, out, _ = run_cli(capsys, "convert", tmp_path / "one.pth", tmp_path / "one.pth.tar", "--trust")
    assert rc == 0 and "(timm 1.0 keys, 1 tensor, read without running code)" in out, out
