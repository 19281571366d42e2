"""Never lose a user's file, and read results files that do not deserve trust: a conversion never writes onto its
input, a latency measurement never rewrites a results file it would have to cut, a reader refuses impossible
records and says what it left out; a flag given twice adds up instead of silently dropping the first."""
import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from snnet.results.records import ResultsError, read_results
from snnet.train.options import LossOptions, RunOptions


def test_convert_never_writes_onto_its_input(tmp_path, capsys):
    release = tmp_path / "release.pth"
    torch.save({"model": {"blocks.0.weight": torch.ones(2)}, "epoch": 3}, release)
    before = hashlib.sha256(release.read_bytes()).hexdigest()
    link = tmp_path / "link.pth"
    link.symlink_to(release)
    for dst in (release, link):  # the same file, by its own name or through a link
        rc, out, err = run_cli(capsys, "convert", release, dst, "--trust")
        assert rc == 2 and err.count("\n") == 1 and "is the release being converted" in err, err
    assert hashlib.sha256(release.read_bytes()).hexdigest() == before


def test_convert_onto_an_existing_folder_names_that_folder(tmp_path, capsys):
    """`snnet convert SRC FOLDER`: the one line names FOLDER (it named the temporary file os.replace could not
    move); the folder is left as it was."""
    release = tmp_path / "release.pth"
    torch.save({"model": {"blocks.0.weight": torch.ones(2)}, "epoch": 3}, release)
    folder = tmp_path / "converted"
    folder.mkdir()
    rc, out, err = run_cli(capsys, "convert", release, folder, "--trust")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{str(folder)!r}" in err and "is a folder" in err and ".tmp" not in err, err
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["converted", "release.pth"]


def test_latency_refuses_to_rewrite_a_results_file_with_a_torn_line(tiny, tmp_path, capsys):
    results = tmp_path / "stitches_res.txt"
    results.write_text(tiny.results.read_text() + '{"cfg_id": 99, "flo')  # an interrupted evaluation's last line
    before = results.read_bytes()
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--batch", 1, "--warmup", 1,
                           "--repeats", 1, "--results", results, "--threads", 1)
    assert rc == 2 and "is incomplete" in err and "nothing was written" in err, err
    assert results.read_bytes() == before


def test_reader_says_which_torn_line_it_left_out(tmp_path, caplog):
    path = tmp_path / "r.txt"
    path.write_text('{"cfg_id": 0, "acc1": 50, "flops": 10}\n{"cfg_id": 1, "ac')
    with caplog.at_level(logging.WARNING, logger="snnet"):
        records = read_results(path)
    assert [r["cfg_id"] for r in records] == [0]
    assert "line 2 is incomplete" in caplog.text and "left out" in caplog.text


@pytest.mark.parametrize("record,needle", [
    ({"cfg_id": 0, "acc1": 80.0, "acc5": 70.0, "flops": 10}, "acc5 70.0 is below acc1 80.0"),
    ({"cfg_id": 0, "acc1": 80.0, "flops": 0}, "flops 0"),
])
def test_reader_refuses_impossible_records(tmp_path, record, needle):
    path = tmp_path / "r.txt"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ResultsError, match=needle):
        read_results(path)


def test_model_kwargs_given_twice_add_up():
    """timm's ParseKwargs keeps only the last --model-kwargs: `--model-kwargs depth=2 --model-kwargs embed_dim=8`
    would build another model than typed. Here they add up (a key given again: the later value wins); a -c YAML or
    stitch-config default is still replaced as a whole, as every typed flag replaces its default."""
    from snnet.train.args import build_parser
    parser = build_parser()
    args = parser.parse_args(["/d", "--model", "resnet18", "--model-kwargs", "depth=2", "--model-kwargs",
                              "embed_dim=8", "depth=3"])
    assert args.model_kwargs == {"depth": 3, "embed_dim": 8}
    again = parser.parse_args(["/d", "--model", "resnet18", "--model-kwargs", "embed_dim=4"])
    assert again.model_kwargs == {"embed_dim": 4}  # a new command line starts afresh
    parser.set_defaults(model_kwargs={"depth": 6})
    assert parser.parse_args(["/d", "--model-kwargs", "embed_dim=4"]).model_kwargs == {"embed_dim": 4}
    assert isinstance(again, argparse.Namespace)


def test_no_pretrained_means_no_download_for_the_teacher_too(monkeypatch, caplog):
    """SN-Net's CNN recipe distils from a RegNetY-16GF; with --no-pretrained the anchors are random and so is the
    teacher (one warning line), so the seed command runs offline."""
    import timm

    from snnet.train.losses import create_teacher
    asked = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: (
        asked.append(pretrained), real("resnet10t", pretrained=False, num_classes=kw.get("num_classes", 10)))[1])
    args = argparse.Namespace(teacher="regnety_160.deit_in1k", teacher_checkpoint="", num_classes=10,
                              no_pretrained=True)
    with caplog.at_level(logging.WARNING, logger="snnet"):
        create_teacher(args, torch.device("cpu"))
    assert asked == [False] and "the teacher 'regnety_160.deit_in1k' is random too" in caplog.text


def test_an_anchor_that_cannot_join_is_named():
    import timm

    from snnet.stitching.adapter import AnchorError, adapter_for
    from snnet.stitching.build import plan_for
    vit = timm.create_model("deit_tiny_patch16_224", depth=2, embed_dim=8, num_heads=2, patch_size=4, img_size=16)
    cnn = timm.create_model("resnet18")
    models, names = [vit, cnn], ["deit_tiny_patch16_224", "resnet18"]
    adapters = [adapter_for(m, n) for m, n in zip(models, names)]
    with pytest.raises(AnchorError, match=r"'resnet18' \(resnet, hierarchical\) cannot join"):
        plan_for(models, adapters, names, kind="two_way")
    with pytest.raises(AnchorError, match=r"'deit_tiny_patch16_224' \(plain\) cannot join 'resnet18'"):
        plan_for(models, adapters, names)


def test_a_checkpoint_is_never_run_as_another_network(tmp_path, tiny_config):
    """skip_final_norm changes what a stitched route computes without changing a weight: a checkpoint trained with
    one value loads cleanly under the other. --resume (training or --eval) and export refuse that, naming the field."""
    from snnet import build_snnet, load_stitch_config
    from snnet.deploy.export import load_snnet
    from snnet.stitching.config import ConfigError
    from snnet.train.args import parse_args
    from snnet.train.preflight import check_checkpoints
    from snnet.utils.checkpoint import save_checkpoint
    trained = load_stitch_config(tiny_config)  # skip_final_norm: false
    net = build_snnet(trained, pretrained=False, img_size=16, num_classes=10)
    ident = {"stitch_config": trained.values, "anchors": [a.__dict__ for a in trained.anchors]}
    ckpt = tmp_path / "last.pth.tar"
    save_checkpoint(ckpt, {"state_dict": net.state_dict(), "epoch": 0, "config": json.dumps(ident),
                           "args": json.dumps({"num_classes": 10, "img_size": 16})})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(tiny_config.read_text()), "skip_final_norm": True}))
    for cfg_path, refused in ((tiny_config, False), (other, True)):
        args, cfg = parse_args(["/d", "--stitch_config", str(cfg_path), "--eval", "--resume", str(ckpt)])
        options = RunOptions.from_values(vars(args))  # as train.py types them
        if refused:
            with pytest.raises(ConfigError, match="skip_final_norm: True vs False"):
                check_checkpoints(options, cfg)
            with pytest.raises(ConfigError, match="skip_final_norm: True vs False"):
                load_snnet(ckpt, cfg_path)
        else:
            check_checkpoints(options, cfg)
            load_snnet(ckpt, cfg_path)
    load_snnet(ckpt)  # no config given: the recorded one


def test_anchor_drift_refuses_an_unrelated_before_file():
    from snnet.results.quality import front_quality
    after = [{"cfg_id": c, "flops": 10 ** 9 * (c + 1), "acc1": 50.0 + c, "route": f"a{c}"} for c in range(4)]
    same = [dict(r, acc1=r["acc1"] - 1) for r in after]
    assert front_quality(after, anchors=[0, 3], before=same)["anchor_drift"] == pytest.approx(1.0)
    other = [dict(r, flops=r["flops"] * 2) for r in same]  # another SN-Net's evaluation
    with pytest.raises(ResultsError, match="anchor cfg_id 0 is another network \\(flops"):
        front_quality(after, anchors=[0, 3], before=other)


def test_a_finished_run_resumed_elsewhere_is_refused_before_work(tmp_path):
    from snnet.train.args import parse_args
    from snnet.train.preflight import check_checkpoints
    from snnet.train.resolve import resolve
    from snnet.utils.checkpoint import save_checkpoint
    from snnet.utils.errors import UsageError
    (tmp_path / "a").mkdir()
    ckpt = tmp_path / "a" / "last.pth.tar"
    save_checkpoint(ckpt, {"state_dict": {}, "epoch": 1})  # epochs 0 and 1 done: a finished 2-epoch run
    base = ["/d", "--model", "resnet18", "--epochs", "2", "--resume", str(ckpt), "--output", str(tmp_path)]
    def typed(argv):
        return resolve(RunOptions.from_values(vars(parse_args(argv)[0])))
    with pytest.raises(UsageError, match="finished epoch 2 of --epochs 2: no epoch is left to train"):
        check_checkpoints(typed(base + ["--experiment", "b"]))
    check_checkpoints(typed(base + ["--experiment", "a"]))  # its own folder: on to the final evaluation
    check_checkpoints(typed(base + ["--experiment", "b", "--epochs", "3"]))  # an epoch is left


@pytest.mark.slow
def test_dry_run_runs_the_checks_that_need_nothing_of_this_machine(capsys):
    """--dry-run resolves a run for another machine (no data folder, no GPU here): the recipe's own checks still run,
    so a card with an unknown scheduler is refused by its dry run, not by the cluster."""
    from snnet.train.main import main
    base = ["/data/imagenet", "--stitch_config", "configs/deit_ti_s_b.json", "--device", "cuda", "--dry-run"]
    assert main(base) == 0 and "resolved:" in capsys.readouterr().out
    assert main(base + ["--sched", "cosin"]) == 2
    assert "--sched 'cosin'" in capsys.readouterr().err


@pytest.mark.parametrize("num_classes", [None, 10])
def test_teacher_checkpoint_checked_before_work(tmp_path, num_classes):
    """--teacher-checkpoint is compared with the teacher's meta-device structure in the preflight: its own weights
    pass (whatever the head's size when the data decides it), another model's are one CheckpointError."""
    import timm

    from snnet.train.preflight import _check_teacher_checkpoint
    from snnet.utils.checkpoint import CheckpointError
    own = tmp_path / "teacher.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=10).state_dict()}, own)
    loss = LossOptions(teacher="resnet18", teacher_checkpoint=str(own), num_classes=num_classes)
    _check_teacher_checkpoint(loss)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": timm.create_model("resnet34", num_classes=10).state_dict()}, other)
    with pytest.raises(CheckpointError, match="does not fit the teacher 'resnet18' .*unexpected"):
        _check_teacher_checkpoint(replace(loss, teacher_checkpoint=str(other)))


def test_a_switch_a_card_sets_is_turned_off_on_the_command_line(tmp_path, tiny_config, capsys):
    """A recipe card's ``"amp": true`` (SN-Netv2's cards set it: their fp16 GPU recipe) is turned off by --no-amp;
    every switch of train.py has its --no- form, except the negative ones and those whose --no- name is another
    option."""
    from snnet.train.args import build_parser
    from snnet.train.main import main
    card = json.loads(Path(tiny_config).read_text())
    card["recipe"] = {"amp": True}
    (tmp_path / "card.json").write_text(json.dumps(card))
    base = ["/data/imagenet", "--stitch_config", str(tmp_path / "card.json"), "--no-pretrained", "--dry-run"]
    assert main(base) == 0 and "\namp: true\n" in capsys.readouterr().out
    assert main([*base, "--no-amp"]) == 0 and "\namp: false\n" in capsys.readouterr().out
    assert json.loads(Path("configs/deit3_s_l_v2.json").read_text())["recipe"]["amp"] is True
    strings = {s for a in build_parser()._actions for s in a.option_strings}
    switches = [a for a in build_parser()._actions if a.nargs == 0 and a.option_strings[0].startswith("--")
                and a.dest != "help"]
    for action in switches:
        first = action.option_strings[0]
        assert first.startswith("--no-") or f"--no-{first[2:]}" in strings, first
    assert {"--no-amp", "--no-model-ema", "--no-sample-sync", "--no-freeze-anchors"} <= strings


def test_slow_amp_on_this_cpu_says_where_amp_came_from(tmp_path, monkeypatch, caplog):
    """On a CPU without bf16 instructions the warning names what asked for amp (a -c YAML here) and the fix."""
    import snnet.train.main as main_mod
    from snnet.train.args import parse_args
    from snnet.train.resolve import resolve
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("amp: true\n")
    monkeypatch.setattr(main_mod, "cpu_has_fast_bf16", lambda: False)
    args, _ = parse_args(["/d", "--model", "resnet18", "-c", str(yaml_file), "--device", "cpu"])
    with caplog.at_level("WARNING", logger="snnet"):
        main_mod.warn_slow_amp(resolve(RunOptions.from_values(vars(args))))
    assert f"amp (from -c/--config '{yaml_file}')" in caplog.text and "pass --no-amp" in caplog.text
    caplog.clear()
    args, _ = parse_args(["/d", "--model", "resnet18", "-c", str(yaml_file), "--device", "cpu", "--no-amp"])
    with caplog.at_level("WARNING", logger="snnet"):
        main_mod.warn_slow_amp(resolve(RunOptions.from_values(vars(args))))
    assert caplog.text == ""


def test_a_teacher_named_by_its_label_is_that_anchor_with_its_weights(tmp_path, capsys):
    """--teacher LABEL names a labelled anchor of the stitch config: the teacher is built with the anchor's
    model_kwargs and loads its checkpoint (the quickstart distils from its largest anchor); a timm name stays a timm
    model."""
    import timm

    from snnet.stitching.config import parse_stitch_config
    from snnet.train.losses import create_teacher
    kwargs = {"patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2, "img_size": 16}
    torch.manual_seed(3)
    own = timm.create_model("deit_tiny_patch16_224", num_classes=5, **kwargs)
    torch.save({"state_dict": own.state_dict()}, tmp_path / "big.pth")
    anchors = [{"name": "deit_tiny_patch16_224", "model_kwargs": kwargs},
               {"name": "deit_tiny_patch16_224", "label": "big", "checkpoint": str(tmp_path / "big.pth"),
                "model_kwargs": kwargs}]
    cfg = parse_stitch_config({"anchors": anchors})
    assert list(cfg.labelled()) == ["big"]
    teacher = create_teacher(LossOptions(teacher="big", num_classes=5, no_pretrained=True), torch.device("cpu"),
                             cfg.labelled())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    theirs = teacher.state_dict()
    assert theirs.keys() == own.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in own.state_dict().items())
    plain = create_teacher(LossOptions(teacher="resnet18", num_classes=5, no_pretrained=True), torch.device("cpu"),
                           cfg.labelled())
    assert type(plain).__name__ == "ResNet"
    from snnet.train.main import main
    (tmp_path / "cfg.json").write_text(json.dumps({"anchors": anchors}))
    base = ["/data/imagenet", "--stitch_config", str(tmp_path / "cfg.json"), "--distillation-type", "soft",
            "--num-classes", "5", "--img-size", "16", "--no-pretrained", "--dry-run"]
    assert main(base + ["--teacher", "big"]) == 0  # the preflight takes the label: no timm name, no download
    capsys.readouterr()
    assert main(base + ["--teacher", "bigg"]) == 2 and "unknown timm model name 'bigg'" in capsys.readouterr().err
