"""snnet quickstart: the data it reads and splits, the choices it prints, the whole run on a tiny generated
folder (docs/own_data.md's first command) and its resume; the refusal of pretrained weights that are neither cached
nor reachable; the warning about a class with far fewer images than the others."""
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run

from snnet.data.checks import small_class_warning
from snnet.quickstart import (
    SEED,
    DataSummary,
    QuickstartOptions,
    _recipes,
    _split_record,
    plan,
    read_data,
    snnet_recipe,
    stitch_config,
    write_split,
)
from snnet.results.predictions import predictions_path, read_predictions, write_predictions
from snnet.stitching.weights import WeightsUnavailable, check_pretrained
from snnet.utils.errors import UsageError

MARK = "<!-- example runs in: tests/test_quickstart.py::test_quickstart_guide_runs -->"


def _shapes():
    spec = importlib.util.spec_from_file_location("shapes_data", Path(ROOT) / "benchmarks" / "shapes_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    return QuickstartOptions(data="d", out="o", **kw)


def test_the_shapes_generators_noise_is_a_harder_set_and_its_range_is_checked(tmp_path, capsys):
    """benchmarks/shapes_data.py --noise: the default is the sets measured so far, image for image; more noise
    spreads the pixels wider; a value off the 0-255 scale is one line naming it, exit 2."""
    shapes = _shapes()
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    default, same = shapes.image("star", rng()), shapes.image("star", rng(), noise_sd=shapes.NOISE)
    assert np.array_equal(np.asarray(default), np.asarray(same))
    spread = [np.asarray(shapes.image("star", rng(), noise_sd=sd), dtype=float).std() for sd in (0.0, 28.0, 90.0)]
    assert spread[0] < spread[1] < spread[2], spread
    # --noise-over: the shape is noisy too, where by default it is one flat colour the noise leaves alone
    flat = lambda px: np.unique(px.reshape(-1, 3), axis=0, return_counts=True)[1].max()  # noqa: E731
    under = np.asarray(shapes.image("hexagon", rng(), noise_sd=90.0), dtype=np.uint8)
    over = np.asarray(shapes.image("hexagon", rng(), noise_sd=90.0, noise_over=True), dtype=np.uint8)
    assert flat(under) > 20 * flat(over), (flat(under), flat(over))
    assert np.array_equal(np.asarray(shapes.image("star", rng(), noise_sd=0.0)),
                          np.asarray(shapes.image("star", rng(), noise_sd=0.0, noise_over=True)))
    with pytest.raises(SystemExit) as e:
        shapes.main([str(tmp_path / "x"), "--noise", "300"])
    assert e.value.code == 2 and "--noise 300 is outside 0-255" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_flat_folder_is_split_per_class_and_kept(tmp_path):
    """Reading writes nothing; the split is written whole (links, and what it was made from) and read the same
    again (a resumed run)."""
    data = _shapes().write(tmp_path / "mine", ["circle", "square", "ring"], 8, 2, size=16, flat=True)
    summary = read_data(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert summary.split_made and summary.root == tmp_path / "out" / "data"
    assert summary.train == {"circle": 8, "ring": 8, "square": 8} and summary.val == {"circle": 2, "ring": 2,
                                                                                      "square": 2}
    assert summary.side == 16 and len(summary.files) == 30 and not summary.warnings
    write_split(summary, tmp_path / "out", {"files": summary.files})
    again = read_data(data, tmp_path / "out")
    assert again.links == summary.links
    assert sorted(p.name for p in (tmp_path / "out/data/val/ring").iterdir()) == \
        sorted(name for _, name in again.links["val"]["ring"])
    assert json.loads((tmp_path / "out/data/split.json").read_text())["files"] == summary.files


def test_large_photos_are_stored_downscaled_small_ones_linked(tmp_path):
    """Images above the stored side (256 px, or twice --img-size) are copied at it, as RGB in their format; the rest
    are links; a larger --img-size stores them larger."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i, (size, ext, mode) in enumerate([((900, 600), ".jpg", "RGB"), ((400, 800), ".png", "L"),
                                               ((40, 30), ".png", "RGB"), ((256, 300), ".png", "RGB")]):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(tmp_path / "d" / c / f"{i}{ext}")
    summary = read_data(tmp_path / "d", tmp_path / "out")
    assert write_split(summary, tmp_path / "out", _split_record(tmp_path / "d", summary, SEED, 32)) == 4
    stored = list((tmp_path / "out" / "data").glob("*/*/*"))
    assert len(stored) == 8 and sorted(p.name for p in stored if p.is_symlink()) == ["2.png", "2.png", "3.png", "3.png"]
    for path in (p for p in stored if not p.is_symlink()):
        with Image.open(path) as img:
            want = ((384, 256), "JPEG") if path.name == "0.jpg" else ((256, 512), "PNG")
            assert (img.size, img.mode, img.format) == (*want[:1], "RGB", want[1]), (path, img.size, img.mode)
    assert write_split(summary, tmp_path / "out", _split_record(tmp_path / "d", summary, SEED, 256)) == 2  # 512 px
    assert all(p.is_symlink() for p in (tmp_path / "out" / "data").glob("*/*/1.png"))


def test_identical_files_stay_on_one_side_and_are_named(tmp_path):
    """Copies of one image in a class go to one side of the split (no validation image is a training image); a
    copy in another class, or in val/ of a file in train/, is a warning naming both files. Without copies the split
    is the one made before copies were looked for: every file shuffled alone."""
    shapes = _shapes()
    data = shapes.write(tmp_path / "mine", ["circle", "square"], 8, 2, size=16, flat=True)
    plain, rng = read_data(data, tmp_path / "out"), random.Random(SEED)
    for c in ("circle", "square"):  # each file shuffled alone, the first fifth validates
        files = sorted((data / c).iterdir())
        rng.shuffle(files)
        assert [f for f, _ in plain.links["val"][c]] == files[:2]
    circles = sorted((data / "circle").iterdir())
    for i in range(4):  # four copies of each of the first three circles, one of them in square/
        for k in range(3):
            (data / "circle" / f"copy{k}_{i}.png").write_bytes(circles[k].read_bytes())
    (data / "square" / "odd.png").write_bytes(circles[5].read_bytes())
    summary = read_data(data, tmp_path / "out")
    val = {f.name for f, _ in summary.links["val"]["circle"]}
    groups = [{circles[k].name} | {f"copy{k}_{i}.png" for i in range(4)} for k in range(3)]
    assert all(g <= val or not g & val for g in groups), val
    assert any(g <= val for g in groups) and not all(g <= val for g in groups), val  # this seed: both sides
    assert 4 <= summary.val["circle"] <= 8  # a fifth of 22 images: 4, or up to 4 more to keep a group whole
    assert any("identical copies in their class" in n and "'circle/" in n for n in summary.notes), summary.notes
    two = [w for w in summary.warnings if "in two or more classes as identical files" in w]
    assert len(two) == 1 and f"'circle/{circles[5].name}'='square/odd.png'" in two[0], summary.warnings
    # train/ and val/ as given: a validation image identical to a training image is said
    given = shapes.write(tmp_path / "given", ["circle", "square"], 6, 2, size=16)
    train_img = sorted((given / "train" / "circle").iterdir())[0]
    (given / "val" / "circle" / "leak.png").write_bytes(train_img.read_bytes())
    leak = [w for w in read_data(given, tmp_path / "o2").warnings if "validation image(s) are identical" in w]
    assert len(leak) == 1 and "'val/circle/leak.png'" in leak[0] and f"'train/circle/{train_img.name}'" in leak[0]


def test_split_folders_are_found_in_any_case_and_test_stands_in_for_val(tmp_path):
    """Train/ and Val/ (or Test/, where there is no val/) are splits, not two classes named after them."""
    shapes = _shapes()
    for names in (("Train", "Val"), ("train", "test"), ("TRAINING", "Testing")):
        data = shapes.write(tmp_path / "_".join(names), ["circle", "square"], 6, 2, size=16)
        for split, name in zip(("train", "val"), names):
            (data / split).rename(data / f"{name}.tmp")
            (data / f"{name}.tmp").rename(data / name)
        summary = read_data(data, tmp_path / "out")
        assert not summary.split_made and summary.train == {"circle": 6, "square": 6}, names
        assert summary.val == {"circle": 2, "square": 2} and not summary.warnings, (names, summary.warnings)
        test_note = [n for n in summary.notes if "has no val/" in n]
        assert bool(test_note) == names[1].lower().startswith("test"), (names, summary.notes)
        assert not test_note or f"its {names[1]}/ is the validation split" in test_note[0]
    data = tmp_path / "train_test"  # with val/ beside it, test/ is left out, and said
    shutil.copytree(data / "test", data / "val")
    summary = read_data(data, tmp_path / "out")
    assert summary.val == {"circle": 2, "square": 2} and not any("has no val/" in n for n in summary.notes)
    assert len(summary.warnings) == 1 and "left out ('test/')" in summary.warnings[0], summary.warnings


@pytest.mark.parametrize("layout, needle", [("file", "is a file, not a folder"), ("empty", "no class sub-folders"),
                                            ("train-only", "has train/ but no val/"), ("missing", "does not exist"),
                                            ("zip", "is a zip archive; unpack it (unzip"),
                                            ("tar", "is a tar archive; unpack it (mkdir DIR && tar xf")])
def test_bad_data_is_one_line(tmp_path, layout, needle):
    from snnet.utils.errors import UsageError
    data = tmp_path / "d"
    if layout == "file":
        data.write_text("x")
    elif layout == "empty":
        data.mkdir()
    elif layout in ("zip", "tar"):
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "1.png").write_bytes(b"x")
        data = Path(shutil.make_archive(str(tmp_path / "d"), "zip" if layout == "zip" else "gztar", tmp_path, "a"))
    elif layout == "missing":
        pass
    else:
        (data / "train" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match=re.escape(needle)):
        read_data(data, tmp_path / "out")


def test_the_plan_says_each_choice_and_its_flag(tmp_path):
    summary = DataSummary(Path("d"), {c: 240 for c in "abcde"}, {c: 60 for c in "abcde"}, 64)
    p = plan(summary, _args(nproc=2))
    assert p.img_size == 64 and [a[0] for a in p.anchors] == ["c4", "c12"]
    # ResNet-34's 16 blocks laid out 1, 1, 8, 6; the larger anchor's early stages at most twice the smaller's, and the
    # smaller's stem
    assert p.anchors[1][1:] == ("resnet34", {"layers": [1, 1, 8, 6], "channels": [8, 16, 48, 96], "stem_type": "deep",
                                             "stem_width": 2})
    assert not p.pretrained
    # 1200 images in the anchors' batches of 128: 9 steps an epoch, >= 600 steps within 30-60 epochs; as many for SN-Net
    assert (p.anchor_batch, p.batch, p.anchor_epochs, p.snnet_epochs) == (128, 32, 60, 60)
    anchor_flags, common, run, _ = _recipes(p, 0)
    recipe = snnet_recipe(p)
    assert anchor_flags[-2:] == ["-b", "128"] and recipe["batch-size"] == 32 and "-b" not in common + run
    text = "\n".join(p.lines)
    for flag in ("--img-size", "--widths", "--anchors", "--anchor-epochs", "--snnet-epochs", "--nproc",
                 "--stitch-stages", "--stitch-plan", "--bn-stats"):
        assert flag in text, flag
    assert p.stitch_stages == [2, 3] and "stitches: in stage(s) 2 3 of 0-3" in text
    assert p.stitch_plan == "large_to_small" and "stitch direction: large_to_small, the larger anchor in front" in text
    assert plan(summary, _args(nproc=2, stitch_plan="two_way")).stitch_plan == "two_way"
    assert p.bn_stats == "per_stitch" and "BatchNorm statistics: per_stitch, one set per stitch" in text
    assert plan(summary, _args(nproc=2, bn_stats="shared")).bn_stats == "shared"
    written = json.loads(stitch_config(tmp_path, p, 2).read_text())
    assert written["bn_stats"] == "per_stitch" and written["recipe"] == recipe
    # the stitching layers at 5e-3, the CNN anchors at a tenth of it
    assert (recipe["lr"], recipe["anchor-lr-scale"]) == (5e-3, 0.1), recipe
    with pytest.raises(UsageError, match="--stitch-stages 1 4: the CNN anchors have stages 0-3 of 1, 1, 8, 6 blocks, "
                                         ".*give some of 2 3"):
        plan(summary, _args(nproc=1, stitch_stages=[1, 4]))
    tiny = plan(DataSummary(Path("d"), {"a": 12, "b": 12}, {"a": 4, "b": 4}, 16), _args(nproc=1))
    assert tiny.img_size == 32 and tiny.anchor_epochs == 60  # small images seen at twice their side; the most epochs
    assert tiny.anchor_batch == 24  # a batch is never larger than the images (timm drops a short one)
    photos = plan(DataSummary(Path("d"), {c: 800 for c in "abcde"}, {c: 200 for c in "abcde"}, 28), _args(nproc=2))
    assert photos.img_size == 56 and (photos.anchor_epochs, photos.snnet_epochs) == (30, 30)
    fine = plan(summary, _args(anchors=["resnet18.a1_in1k", "resnet50.a1_in1k"], nproc=1))
    assert fine.pretrained and [a[1] for a in fine.anchors] == ["resnet18.a1_in1k", "resnet50.a1_in1k"]
    assert fine.stitch_stages is None and fine.stitch_plan == "sliding_window"  # the family's own default, SN-Net's
    assert (snnet_recipe(fine)["lr"], snnet_recipe(fine)["anchor-lr-scale"]) == (5e-4, 1.0)  # timm: SN-Net's one LR


@pytest.mark.slow
@pytest.mark.dist  # two anchors (one at a time), then the SN-Net (one process), then the evaluation
def test_quickstart_guide_runs(tmp_path, capsys):
    """docs/own_data.md's quickstart command on a generated folder of 3 classes (12 images each at 16 px, split
    here), with what only the test adds: the tiny widths 4 8, 16 px, 1 epoch each, batch 4, one process. Then the
    same command again: every step is reused, nothing is trained. Its cost is 4 interpreters' torch and timm import
    (2 anchors, the SN-Net's rank, the evaluation) and the launcher's torch import: ~33 s of CPU on a loaded 2-core
    machine, where it was 5 interpreters with the launcher's checks (quickstart skips them now)."""
    from helpers import run_cli
    text = (Path(ROOT) / "docs" / "own_data.md").read_text()
    block = re.search(re.escape(MARK) + r"\n```bash\n(?P<body>.*?)^```\n", text, re.M | re.S)
    assert block is not None, "docs/own_data.md has no quickstart block marked for this test"
    command = [ln for ln in block["body"].splitlines() if ln.strip() and not ln.startswith("#")][0]
    argv = re.sub(r"\s+#.*$", "", command).split()
    assert argv[:2] == ["snnet", "quickstart"], command
    mine = _shapes().write(tmp_path / "data" / "mine", ["circle", "square", "ring"], 10, 2, size=16, flat=True)
    # as a newcomer's folder: a macOS ._ file, a GIF, a truncated JPEG (skipped, named), a note
    (mine / "ring" / "._val_0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    from PIL import Image
    with Image.open(mine / "ring" / "val_0001.png") as im:
        im.save(mine / "ring" / "scan.gif")
        im.resize((64, 64)).save(mine / "square" / "cut.jpg")
    (mine / "square" / "cut.jpg").write_bytes((mine / "square" / "cut.jpg").read_bytes()[:400])
    (mine / "README.txt").write_text("my shapes")
    os.chdir(tmp_path)  # the guide's relative paths
    try:
        extra = ["--widths", "4", "8", "--img-size", "16", "--anchor-epochs", "1", "--snnet-epochs", "1", "--batch",
                 "4", "--nproc", "1"]
        rc, out, err = run_cli(capsys, *argv[1:], *extra)
        assert rc == 0, out[-3000:] + err
        out_dir = tmp_path / argv[argv.index("--out") + 1]
        results = out_dir / "results"
        for f in ("stitches_res.txt", "pareto_flops.png", "pareto_flops.md", "report.html", "snnet.pth.tar"):
            assert (results / f).is_file(), f
        records = [json.loads(ln) for ln in (results / "stitches_res.txt").read_text().splitlines()]
        assert [r["route"] for r in records[:2]] == ["c4", "c8"]
        # the stitch config it wrote holds the SN-Net's recipe: train.py with it alone trains the same SN-Net
        import yaml

        from snnet.train.args import parse_args
        ran = yaml.safe_load((out_dir / "snnet" / "args.yaml").read_text())
        alone, _ = parse_args([ran["data_dir"], "--stitch_config", str(out_dir / "stitch_config.json")], fit=False)
        recipe = ("opt", "lr", "anchor_lr_scale", "warmup_epochs", "epochs", "batch_size", "weight_decay", "scale",
                  "smoothing", "img_size", "no_pretrained", "lr_base", "sched", "mixup", "drop_path")
        assert {k: getattr(alone, k) for k in recipe} == {k: ran[k] for k in recipe}, ran
        # the served network names its answers by the class folders, as the results beside it do
        from snnet.results.records import read_class_names
        from snnet.utils.checkpoint import load_checkpoint
        names = json.loads(load_checkpoint(results / "snnet.pth.tar")["args"]).get("class_names")
        assert names == read_class_names(results / "stitches_res.txt") == ["circle", "ring", "square"], names
        # a stitch between every two neighbouring blocks of the 8- and 6-block stages 2 and 3 (STITCH_STAGES), the
        # larger anchor in front (STITCH_PLAN)
        routes = [r["route"] for r in records[2:]]
        assert len(routes) == 7 + 5 and routes[0] == "c8[..s2.b0] -(0.0.0)-> c4[s2.b1..]", routes
        assert routes[-1] == "c8[..s3.b4] -(1.0.4)-> c4[s3.b5..]", routes
        # one process: the SN-Net step is train.py itself, without a launcher's interpreter before it
        assert f"[snnet] $ {sys.executable} train.py " in out and "distributed_train.sh" not in out, out[-3000:]
        for what in ("image size: 16 px", "anchors: 2 small CNNs", "change: --widths", "ETA", "[snnet] done in",
                     "quickstart finished in", "report.html in a browser", "30 training and 7 validation images",
                     ".gif images are read too"):
            assert what in out, what
        # every stitch's predictions kept: the counts against mixing come with intervals over resampled images
        assert re.search(r"\d+ of 12 \(\d+-\d+\) stitches above the line", out), out[-2000:]
        warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
        assert len(warned) == 3 and "'ring/._val_0000.png'" in warned[0] and "'README.txt'" in warned[1], err
        assert "'square/cut.jpg': unreadable" in warned[2], err
        _opens_in_a_browser(results / "report.html", tmp_path / "profile")
        # what to type next, as printed: the selection runs and picks a network; the server's files exist
        select, serve = [ln.split("#")[0].split() for ln in out.splitlines()[-2:]]
        assert select[:3] == ["next:", "snnet", "select"] and serve[:2] == ["snnet", "serve"], out[-500:]
        assert run_cli(capsys, *select[2:])[0] == 0
        assert Path(serve[2]) == results / "snnet.pth.tar" and Path(serve[4]) == results / "stitches_res.txt"
        rc, out, err = run_cli(capsys, *argv[1:], *extra)  # again: resumed, nothing redone
        assert rc == 0, err
        assert out.count("reusing") == 4 and "$ " not in out, out  # 2 anchors, SN-Net, evaluation
        # an evaluation that kept the anchors' predictions only is made again, not reused without its intervals
        pred_file = predictions_path(results / "stitches_res.txt")
        write_predictions(pred_file, read_predictions(pred_file).subset([0, 1]))
        rc, out, err = run_cli(capsys, *argv[1:], *extra)
        assert rc == 0, err
        assert out.count("reusing") == 3 and "[snnet_eval] $ " in out, out
        assert read_predictions(pred_file).cfg_id.tolist() == list(range(14))
    finally:
        os.chdir(ROOT)


def _as_shards_and_parquet(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An ImageFolder (train/, val/) written as `snnet shards` tar shards and as a local Hugging Face dataset
    (parquet in the Hub's layout, data/<split>-*.parquet)."""
    import datasets

    from snnet.data.datasets import write_folder_shards
    write_folder_shards(str(folder), str(tmp_path / "shards"), 16)
    parts = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "hf" / "data").mkdir(parents=True)
    for split, ds in parts.items():
        ds.to_parquet(str(tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"))
    return tmp_path / "shards", tmp_path / "hf"


def test_shards_and_a_local_hugging_face_dataset_read_as_the_folder(tmp_path):
    """quickstart's DATA as tar shards or as parquet files: the same classes, counts and image side as the folder
    they were written from, and the train.py flags that read them (--dataset wds/ or hfds/ with their splits)."""
    folder = _shapes().write(tmp_path / "mine", ["circle", "square", "ring"], 10, 3, size=24)
    shards, hf = _as_shards_and_parquet(folder, tmp_path)
    want = read_data(folder, tmp_path / "o1")
    assert want.train == {"circle": 10, "ring": 10, "square": 10} and want.side == 24
    for data, flags in ((shards, ("--dataset", "wds/", "--train-split", "train", "--val-split", "val")),
                        (hf, ("--dataset", "hfds/", "--train-split", "train", "--val-split", "validation"))):
        got = read_data(data, tmp_path / "o2")
        assert (got.root, got.train, got.val, got.side, got.flags) == (data, want.train, want.val, 24, flags), data
    import pyarrow as pa
    import pyarrow.parquet as pq
    png = next((folder / "train" / "ring").iterdir()).read_bytes()
    bad = tmp_path / "bad" / "data"
    bad.mkdir(parents=True)
    for split in ("train", "validation"):  # plain integer labels, one of them negative
        pq.write_table(pa.table({"image": [{"bytes": png, "path": None}] * 2, "label": [0, -1]}),
                       bad / f"{split}-00000-of-00001.parquet")
    with pytest.raises(UsageError, match=r"class index -1, outside its 1 class names"):
        read_data(bad.parent, tmp_path / "o3")


@pytest.mark.slow
def test_quickstart_trains_from_shards(tmp_path, capsys, monkeypatch):
    """The whole quickstart from tar shards at the guide test's tiny sizes: train.py gets --dataset wds/ at every
    step (anchors, SN-Net, evaluation) and the results count the validation split's images. Then other stitch
    stages: they rewrite the config at the same path, and the SN-Net is trained again (it was once reused because
    the command names only the path), the anchors reused. Its steps are forked from the tests' import server (the
    guide test runs them as fresh processes, with their progress relayed)."""
    from helpers import ForkedPopen, run_cli

    import snnet.demo
    monkeypatch.setattr(snnet.demo, "subprocess", ForkedPopen.module())
    folder = _shapes().write(tmp_path / "mine", ["circle", "square", "ring"], 10, 2, size=16)
    shards, _ = _as_shards_and_parquet(folder, tmp_path)
    command = ["quickstart", str(shards), "--out", str(tmp_path / "out"), "--widths", "4", "8", "--img-size", "16",
               "--anchor-epochs", "1", "--snnet-epochs", "1", "--batch", "4", "--nproc", "1"]
    rc, out, err = run_cli(capsys, *command)
    assert rc == 0, out[-3000:] + err
    assert out.count("--dataset wds/") >= 3, out  # the two anchors' and the SN-Net's command lines
    results = tmp_path / "out" / "results" / "stitches_res.txt"
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert len(records) == 14 and all(r["samples"] == 6 for r in records), records
    stages = [r["route"].split("..")[1][:2] for r in records[2:]]
    assert stages == ["s2"] * 7 + ["s3"] * 5, [r["route"] for r in records]
    rc, out, err = run_cli(capsys, *command, "--stitch-stages", "3")
    assert rc == 0, err
    assert out.count("reusing") == 2 and "[snnet] $ " in out, out  # the anchors only
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert [r["route"].split("..")[1][:2] for r in records[2:]] == ["s3"] * 5, [r["route"] for r in records]


def _opens_in_a_browser(page: Path, profile: Path) -> None:
    """The quickstart's report.html loads in Chromium without a script error and shows its front (tests/test_report.py
    checks the page itself in depth); nothing when no browser is installed (`make browser`), as that file skips."""
    from test_report import browser_paths, open_page, start_browser
    try:
        chromium, chromedriver = browser_paths()
    except pytest.skip.Exception:
        return
    driver = start_browser(chromium, chromedriver, profile)
    try:
        open_page(driver, page)
        assert driver.execute_script("return document.querySelectorAll('#picks tbody tr').length") >= 1
    finally:
        driver.quit()


def _fake_cache(cache: Path, repo: str, filename: str = "model.safetensors") -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc")
    (folder / "snapshots" / "abc").mkdir(parents=True)
    (folder / "snapshots" / "abc" / filename).write_bytes(b"x")


def test_pretrained_weights_cached_unreachable_or_offline(tmp_path, monkeypatch):
    """Cached: accepted without a connection. Not cached: HF_HUB_OFFLINE refuses at once; otherwise one connection
    attempt (here to a closed local port) decides, and the line names the model, the cache, and the three fixes."""
    import huggingface_hub.constants as hf

    from snnet.stitching import weights
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    weights._REACHED.clear()
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        check_pretrained("deit_tiny_patch16_224", "anchor 0")
    assert time.perf_counter() - t0 < weights.CONNECT_SECONDS + 2
    line = str(e.value)
    for needle in ("anchor 0 'deit_tiny_patch16_224'", str(tmp_path / "hub"), "127.0.0.1: no connection",
                   "\"checkpoint\"", "timm.create_model('deit_tiny_patch16_224', pretrained=True)", "--no-pretrained"):
        assert needle in line, needle
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        check_pretrained("deit_tiny_patch16_224", "anchor 0")
    _fake_cache(tmp_path / "hub", "timm/deit_tiny_patch16_224.fb_in1k")
    check_pretrained("deit_tiny_patch16_224", "anchor 0")  # cached: no connection needed


@pytest.mark.slow  # the launcher's check in a forked process: ~10 s with timm's model registry
def test_an_unreachable_pretrained_anchor_is_refused_before_torchrun(tmp_path):
    """distributed_train.sh with a DeiT-Ti/S config and no weights anywhere: one line, exit 2, in seconds, before
    torchrun starts; the dry run says the same line once as a warning (it resolves a run for any machine), on one
    process: its rank 0 is the one that would say it again (only rank 0 warns)."""
    from test_docs import _pets
    _pets(tmp_path / "pets")
    cfg = tmp_path / "pets_stitch.json"
    cfg.write_text(json.dumps({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"], "input_size": 224}))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch")}
    for nproc, extra in (("2", []), ("1", ["--dry-run"])):
        t0 = time.perf_counter()
        done = run(["./distributed_train.sh", nproc, tmp_path / "pets", "--stitch_config", cfg, "-b", "8", "--output",
                    tmp_path / "out", *extra], env=env, timeout=120)
        took = time.perf_counter() - t0
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        # the real run: refused; the dry run (a run resolved for any machine): said once as a warning
        assert done.returncode == (0 if extra else 2) and len(lines) == 1, done.stderr
        assert lines[0].startswith("warning: here the run would be refused: " if extra else "error: "), lines[0]
        assert "anchor 0 'deit_tiny_patch16_224'" in lines[0] and "--no-pretrained" in lines[0], lines[0]
        assert "HF_HUB_OFFLINE is set" in lines[0] and lines[0].rstrip().endswith("random weights"), lines[0]
        assert "OMP_NUM_THREADS" not in done.stdout + done.stderr and took < 30, took


def test_anchors_fine_tune_from_the_weights_the_plan_names(tmp_path, monkeypatch):
    """--anchors: each model's pretrained weights are found before any work (here in a cache) and the plan says
    where from; the anchors' train.py step gets --pretrained (a plain --model starts from random weights without
    it), the SN-Net's none (its anchors are the trained checkpoints)."""
    import huggingface_hub.constants as hf

    from snnet.quickstart import check_anchors
    from snnet.stitching import weights
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights._REACHED.clear()
    _fake_cache(tmp_path / "hub", "timm/resnet18.a1_in1k")
    _fake_cache(tmp_path / "hub", "timm/resnet34.a1_in1k")
    args = _args(anchors=["resnet18", "resnet34"], nproc=1)
    sources = check_anchors(args)
    assert sources == {"resnet18": "cached", "resnet34": "cached"}
    summary = DataSummary(Path("d"), {c: 40 for c in "abc"}, {c: 10 for c in "abc"}, 64)
    p = plan(summary, args, sources)
    line = next(ln for ln in p.lines if ln.startswith("anchors:"))
    assert "timm's pretrained weights (resnet18: this machine's cache; resnet34: this machine's cache" in line
    anchor_flags, common, run, _ = _recipes(p, 0)
    assert "--pretrained" in anchor_flags and "--no-pretrained" not in common and "no-pretrained" not in snnet_recipe(p)
    unpretrained = plan(summary, _args(anchors=["resnet18", "resnet34"], no_pretrained=True, nproc=1))
    assert "--pretrained" not in _recipes(unpretrained, 0)[0] and "--no-pretrained" in _recipes(unpretrained, 0)[1]
    assert snnet_recipe(unpretrained)["no-pretrained"] is True
    with pytest.raises(UsageError, match="--anchors 'resnet50' needs timm's pretrained weights"):
        check_anchors(_args(anchors=["resnet18", "resnet50"], nproc=1))


def test_the_batch_and_processes_fit_the_images():
    """Few images: the default batch is what each SN-Net process draws an epoch (timm drops a short batch), the
    default processes leave each at least 2; a --batch no process could fill is refused by quickstart's flag."""
    few = DataSummary(Path("d"), {"a": 6, "b": 6, "c": 3}, {"a": 2, "b": 2, "c": 1}, 16)
    p = plan(few, _args(nproc=2))
    assert (p.batch, p.nproc) == (8, 2)
    assert plan(few, _args()).nproc <= 7
    with pytest.raises(UsageError, match=r"--batch 9 gives no training step: each of the SN-Net's 2 processes draws "
                                         r"8 of the 15 training images an epoch.*give --batch 8 or less \(or fewer "
                                         r"--nproc\)"):
        plan(few, _args(nproc=2, batch=9))


def test_the_default_processes_are_the_cores_this_process_may_use():
    """Slurm and containers give a job some of a machine's cores (its affinity mask): the default --nproc counts
    those, not the machine's."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("needs 2 cores to give this process 1 of them")
    summary = DataSummary(Path("d"), {c: 400 for c in "abc"}, {c: 100 for c in "abc"}, 64)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert plan(summary, _args()).nproc == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert plan(summary, _args()).nproc == min(len(cores), 8)


def test_what_out_holds_follows_data_and_seed(tmp_path):
    """A split records what it was made from: the same DATA and seed reuse it; another --seed splits it again (and
    says so); an image added, changed or removed, or another DATA, is refused naming the change and --fresh, which
    starts from nothing: it removes what quickstart wrote in --out, nothing else."""
    from snnet.quickstart import SEED, _check_state, _recorded_run, _split_record, start_fresh
    data = _shapes().write(tmp_path / "mine", ["circle", "square"], 6, 2, size=16, flat=True).resolve()
    out = (tmp_path / "out").resolve()

    def check_state(summary, seed, fresh):  # as preflight checks --out: the record first, then the files
        return _check_state(out, data, summary, seed, _recorded_run(out, data, fresh))

    summary = read_data(data, out)
    assert check_state(summary, SEED, False) is None  # nothing there yet
    write_split(summary, out, _split_record(data, summary, SEED, 32))
    assert check_state(read_data(data, out), SEED, False) is None
    again = check_state(read_data(data, out, 1), 1, False)
    assert again is not None and "--seed 1" in again and "every step is redone" in again
    (data / "circle" / "train_0000.png").write_bytes((data / "square" / "train_0000.png").read_bytes())
    (data / "square" / "val_0001.png").unlink()
    changed = read_data(data, out)
    with pytest.raises(UsageError, match=r"changed since .* \(1 removed \(e.g. 'square/val_0001.png'\), 1 changed "
                                         r"\(e.g. 'circle/train_0000.png'\)\); pass --fresh"):
        check_state(changed, SEED, False)
    assert check_state(changed, SEED, True) is None
    (out / "anchor_c6").mkdir()
    (out / "anchor_c6.log").write_text("")
    (out / "notes.md").write_text("mine")  # not quickstart's: kept
    assert start_fresh(out) == ["anchor_c6/", "anchor_c6.log", "data/"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


def test_an_out_with_others_files_of_its_names_is_refused_even_with_fresh(tmp_path, capsys):
    """--out holding folders of quickstart's names (data/, results/) but no quickstart run's record is another
    program's: refused before anything is read, with --fresh too (which would otherwise remove them), and kept."""
    from helpers import run_cli
    data = _shapes().write(tmp_path / "mine", ["circle", "square"], 6, 2, size=16, flat=True)
    out = tmp_path / "project"
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "notes.txt").write_text("mine")
    (out / "results").mkdir()
    (out / "results" / "table.csv").write_text("mine")
    for fresh in ([], ["--fresh"]):
        rc, _, err = run_cli(capsys, "quickstart", data, "--out", out, *fresh)
        assert rc == 2 and f"--out '{out}' holds data/, results/ but no quickstart run's record" in err, err
    assert (out / "data" / "raw" / "notes.txt").read_text() == (out / "results" / "table.csv").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["data", "results"]


def test_a_steps_warnings_reach_the_console_once(tmp_path, capsys):
    """Each distinct warning line the steps write to their logs is said once on the console (with the step that
    said it first), a line only when whole; what a log held before this run was said then."""
    from snnet.quickstart import WarningRelay
    (tmp_path / "anchor_c6.log").write_text("warning: from an earlier run\n")
    with WarningRelay(tmp_path) as relay:
        with open(tmp_path / "anchor_c6.log", "a") as f:
            f.write("12:00:01 Train: 0 [ 1/2] loss 1.0\n12:00:02 warning: skipped training image 'a.png' (cut)\n")
        (tmp_path / "anchor_c12.log").write_text("12:00:02 warning: skipped training image 'a.png' (cut)\n"
                                                 "/x/timm.py:3: UserWarning: an old argument\nwarning: half a li")
        relay.poll()
    err = capsys.readouterr().err.splitlines()
    assert err == ["[anchor_c12] warning: skipped training image 'a.png' (cut)",
                   "[anchor_c12] UserWarning: an old argument"], err


def test_after_a_step_fails_no_other_starts(capsys):
    """An anchor's step that fails (demo.run exits with the log's tail) is said at once; no anchor starts after it,
    and the run ends with exit 1 before the SN-Net's step."""
    from snnet.quickstart import train_anchors
    p = plan(DataSummary(Path("d"), {"a": 40, "b": 40}, {"a": 10, "b": 10}, 64), _args(widths=[4, 8, 16], nproc=1))
    started = []

    def train(anchor):
        started.append(anchor[0])
        if anchor[0] == "c16":
            raise SystemExit("step anchor_c16 failed (exit 2; full log: x.log):\nerror: no")
    with pytest.raises(SystemExit) as e:
        train_anchors(p, train, workers=1)
    assert e.value.code == 1 and started == ["c16"]
    err = capsys.readouterr().err
    assert "step anchor_c16 failed" in err and "anchor c16 failed: no other step starts" in err


def test_a_class_far_below_the_others_is_named():
    line = small_class_warning({"cat": 120, "dog": 118, "fox": 1}, "train folder 'd/train'")
    assert line is not None and "'fox' has 1" in line and "median class's 118" in line and "\n" not in line
    assert small_class_warning({"cat": 120, "dog": 118, "fox": 12}, "x") is None  # a tenth: not flagged
    assert small_class_warning({"cat": 5}, "x") is None


def test_the_small_class_warning_shows_in_the_dry_run(tmp_path):
    from test_docs import _pets
    _pets(tmp_path / "pets")
    for f in sorted((tmp_path / "pets" / "train" / "fox").iterdir())[1:]:
        f.unlink()
    done = run([sys.executable, "train.py", tmp_path / "pets", "--model",
                "resnet18", "--img-size", "16", "--dry-run"])
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "'fox' has 1 image(s)" in warnings[0] and "median class's 12" in warnings[0]


def test_the_cheapest_stitch_costs_little_more_than_the_smallest_anchor(tmp_path):
    """quickstart's anchors take the smallest anchor's stem (timm's default is a 64-channel 7x7 conv whatever
    `stem_width` says: at 64 px 9.6 MFLOPs alone) and early stages at most twice its width, so the cheapest of the 12
    stitches costs about 1.5x the smallest anchor (with ResNet's w, 2w early stages and own stems: 2.6x) while the
    largest anchor costs about 7x it: the stitches spread over the anchors' FLOPs range from its low end."""
    import torch

    from snnet import build_snnet
    from snnet.quickstart import Plan, anchor_kwargs
    from snnet.stitching.config import parse_stitch_config
    from snnet.stitching.cost import cost_table
    anchors = [(f"c{w}", "resnet34", anchor_kwargs(w, 4)) for w in (4, 12)]
    p = Plan(56, anchors, False, [2, 3], "large_to_small", 1, 1, 2, 1, bn_stats="per_stitch")
    cfg = json.loads(stitch_config(tmp_path, p, 5).read_text())
    for a in cfg["anchors"]:
        del a["checkpoint"]
    net = build_snnet(parse_stitch_config(cfg, "quickstart"), pretrained=False, img_size=56, num_classes=5)
    stems = [[m for m in net.anchor(a).conv1.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels
             for a in range(2)]
    assert stems == [4, 4], stems
    table = cost_table(net, 56)
    flops = [table.route_flops(net.routes[c]) for c in range(len(net.routes))]
    small, large, stitches = flops[0], flops[1], flops[2:]
    assert len(stitches) == 12 and 6 * small < large < 8 * small, flops
    assert min(stitches) < 1.6 * small and max(stitches) < large, flops
