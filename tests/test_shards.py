"""WebDataset shards: `snnet shards` writes an ImageFolder as timm-style tar shards; train.py trains, LS-initialises
and evaluates from them (--dataset wds/NAME); the evaluation counts every image exactly once on any number of
processes and loader workers, with the folder evaluation's numbers; training resumes bit-identically after kill -9;
preflight refuses bad shards in one line naming the shard."""
import argparse
import collections
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, assert_refused, run, run_cli, shared_cli, start

EVAL_CFG = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                crop_mode="center")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The digits demo's ImageFolder (1437 train, 360 val) and its shards (100 samples per shard) written by the
    snnet command."""
    from snnet.cli import main
    from snnet.demo import write_digits
    root = tmp_path_factory.mktemp("shards")
    folder = write_digits(root)
    assert main(["shards", str(folder), str(root / "wds"), "--shard-size", "100"]) == 0
    return folder, root / "wds"


def folder_samples(split_dir):
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    return ReaderImageFolder(str(split_dir)).samples


def shard_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.mark.slow
def test_snnet_shards_writes_the_folder_in_order_with_timms_info(demo, tmp_path, capsys, caplog):
    folder, wds = demo
    info = json.loads((wds / "_info.json").read_text())
    assert info["num_classes"] == 10 and info["classes"] == [str(c) for c in range(10)]
    for split, n in (("train", 1437), ("val", 360)):
        entry = info["splits"][split]
        assert entry["num_samples"] == n and sum(entry["shard_lengths"]) == n
        assert entry["shard_lengths"] == [100] * (n // 100) + [n % 100]
        assert entry["filenames"] == [f"{split}-{i:06d}.tar" for i in range(len(entry["shard_lengths"]))]
        # timm's own parser of _info.json reads it
        from timm.data.readers.reader_wds import _parse_split_info
        parsed = _parse_split_info(split, info)
        assert parsed.num_samples == n and list(parsed.shard_lengths) == entry["shard_lengths"]
        # every image, byte for byte, with its label, in the order timm's folder reader lists them
        members = [m for f in entry["filenames"] for m in shard_members(wds / f)]
        samples = folder_samples(folder / split)
        assert len(members) == 3 * len(samples)
        for i, (path, label) in enumerate(samples):
            (img_name, img), (cls_name, cls), (json_name, meta) = members[3 * i:3 * i + 3]
            assert img_name == f"{i:08d}.png" and cls_name == f"{i:08d}.cls" and json_name == f"{i:08d}.json"
            assert img == open(path, "rb").read() and int(cls) == label
            assert json.loads(meta)["filename"] == os.path.relpath(path, folder / split)
    # a rerun writes the same bytes and leaves no temporary file; progress is logged
    caplog.set_level(logging.INFO, logger="snnet")
    rc, out, err = run_cli(capsys, "shards", folder, tmp_path / "again", "--shard-size", "100")
    assert rc == 0, err
    assert "val: 360 images in 4 shard(s)" in out and "Writing shards of 1797 images [1797/1797]" in caplog.text
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(wds))
    for f in os.listdir(wds):
        assert (tmp_path / "again" / f).read_bytes() == (wds / f).read_bytes(), f
    rc, _, err = run_cli(capsys, "shards", tmp_path / "nowhere", tmp_path / "x", "--shard-size", "10")
    assert_refused(rc, err, "nowhere", "does not exist")
    assert not (tmp_path / "x").exists()


def eval_args(workers, batch=16):
    return argparse.Namespace(validation_batch_size=None, batch_size=batch, workers=workers, pin_mem=False)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_stream_evaluation_reads_every_image_exactly_once(demo, workers):
    """Any number of ranks (7 > the 4 validation shards) and loader workers: the ranks' batches hold every image
    once, with the folder's label for its id, and len(loader) is the number of batches."""
    from snnet.data.datasets import ShardDataset
    from snnet.data.loaders import create_eval_loader
    from snnet.data.shards import find_split
    folder, wds = demo
    labels = [label for _, label in folder_samples(folder / "val")]
    ds = ShardDataset(find_split(str(wds), "validation", ("val",)))
    assert len(ds) == 360
    for world_size in (1, 2, 3, 7):
        seen = collections.Counter()
        for rank in range(world_size):
            loader = create_eval_loader(ds, eval_args(workers), EVAL_CFG, rank, world_size)
            batches = 0
            for x, y, ids in loader:
                batches += 1
                assert x.shape[1:] == (3, 16, 16)
                assert y.tolist() == [labels[i] for i in ids.tolist()]
                seen.update(ids.tolist())
            assert batches == len(loader)
        assert sorted(seen) == list(range(360)) and set(seen.values()) == {1}, world_size


@pytest.mark.slow
def test_stream_evaluation_equals_the_folder_tensor_for_tensor(demo):
    from timm.data import create_dataset

    from snnet.data.datasets import ShardDataset
    from snnet.data.loaders import create_eval_loader
    from snnet.data.shards import find_split
    folder, wds = demo
    fds = create_dataset("", root=str(folder / "val"), split="", search_split=False, is_training=False)
    sds = ShardDataset(find_split(str(wds), "val"))
    a = {int(i): (x, int(y)) for xs, ys, ids in create_eval_loader(fds, eval_args(0, 50), EVAL_CFG, 1, 2)
         for x, y, i in zip(xs, ys, ids)}
    b = {int(i): (x, int(y)) for xs, ys, ids in create_eval_loader(sds, eval_args(0, 50), EVAL_CFG)
         for x, y, i in zip(xs, ys, ids)}
    assert set(a) < set(b) and len(b) == 360
    for i, (x, y) in a.items():
        assert torch.equal(x, b[i][0]) and y == b[i][1]


def test_ls_init_images_from_shards_are_the_folders(demo):
    from timm.data import create_dataset

    from snnet.data.datasets import ShardDataset
    from snnet.data.ls_images import clean_images
    from snnet.data.shards import find_split
    folder, wds = demo
    fds = create_dataset("", root=str(folder / "train"), split="", search_split=False, is_training=True)
    sds = ShardDataset(find_split(str(wds), "train"))
    for rank in (0, 1):
        a = list(clean_images(fds, EVAL_CFG, 70, seed=3, rank=rank, world_size=2, batch_size=16))
        b = list(clean_images(sds, EVAL_CFG, 70, seed=3, rank=rank, world_size=2, batch_size=16))
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


def keys(stream, workers=1):
    return [[where.split("'")[1] for where, _ in stream.samples(w, workers)] for w in range(workers)]


def test_training_stream_is_a_function_of_seed_and_epoch(demo):
    from snnet.data.datasets import TrainStream
    from snnet.data.shards import find_split
    _, wds = demo
    split = find_split(str(wds), "train")
    streams = [TrainStream(split, seed=5, rank=r, world_size=2, batch_size=16, buffer=64) for r in (0, 1)]
    assert all(len(s) == 719 // 16 * 16 for s in streams)  # ceil(1437 / 2) per rank, whole batches
    first = [sum(keys(s, 2), []) for s in streams]
    assert first == [sum(keys(TrainStream(split, 5, r, 2, 16, buffer=64), 2), []) for r in (0, 1)]
    assert all(len(k) == len(s) for k, s in zip(first, streams))
    assert not set(first[0]) & set(first[1])  # the ranks' parts are disjoint (no wrap within these batches)
    assert first[0] != sorted(first[0])  # shuffled
    for s in streams:
        s.set_epoch(1)
    assert [sum(keys(s, 2), []) for s in streams] != first
    assert sum(keys(TrainStream(split, 6, 0, 2, 16, buffer=64), 2), []) != first[0]


def test_a_test_split_is_packed_and_named_where_there_is_no_validation_one(tmp_path, capsys, caplog):
    """Train/ and Test/ (any case): both packed; a folder that is no split is said; training on either the folder or
    its shards says that nothing will be evaluated and which --val-split would."""
    from PIL import Image

    from snnet.data.checks import check_data
    for split in ("Train", "Test"):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(2):
                image = Image.new("RGB", (8, 8), (60 * i, 100 if c == "a" else 0, 0))
                image.save(tmp_path / "d" / split / c / f"{i}.png")
    (tmp_path / "d" / "extra").mkdir()
    rc, out, err = run_cli(capsys, "shards", tmp_path / "d", tmp_path / "wds", "--shard-size", "10")
    assert rc == 0, err
    assert "train: 4 images" in out and "test: 4 images" in out
    assert "'extra' left out, not a split folder" in caplog.text, caplog.text

    def args(data, dataset=""):
        return argparse.Namespace(data_dir=str(data), dataset=dataset, train_split="train", val_split="validation",
                                  class_map="", batch_size=2, num_classes=None, grad_accum_steps=1, eval=False,
                                  aug_repeats=0, dataset_download=False)
    for data, dataset, name in ((tmp_path / "d", "", "Test"), (tmp_path / "wds", "wds/d", "test")):
        check_data(args(data, dataset), need_train=True, world_size=1)
        err = capsys.readouterr().err
        assert f"has no validation split but a {name!r} one" in err and f"--val-split {name} " in err, err
    shutil.copytree(tmp_path / "d" / "Train", tmp_path / "u" / "Train")  # beside a test folder without labels
    (tmp_path / "u" / "Test").mkdir()
    shutil.copy(tmp_path / "d" / "Test" / "a" / "0.png", tmp_path / "u" / "Test" / "0.png")
    check_data(args(tmp_path / "u"), need_train=True, world_size=1)
    err = capsys.readouterr().err
    assert "its Test/ holds no class folders (its images have no labels)" in err and "--val-split" not in err, err


@pytest.fixture
def bad_shards(demo, tmp_path):
    dst = tmp_path / "wds"
    shutil.copytree(demo[1], dst)
    return dst


def preflight(capsys, data, *extra):
    from snnet.train.preflight import main
    cfg = data.parent / "tiny.json"
    from helpers import TINY
    cfg.write_text(json.dumps({"anchors": TINY}))
    rc = main(["2", str(data), "--dataset", "wds/digits", "--stitch_config", str(cfg), *FAST, "--epochs", "1",
               "--output", str(data.parent / "out"), *extra])
    out, err = capsys.readouterr()
    return rc, err


def rewrite_member(path, suffix, data):
    members = shard_members(path)
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            blob = data if name.endswith(suffix) else blob
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.slow
def test_preflight_refuses_bad_shards_naming_the_shard(bad_shards, capsys):
    rc, err = preflight(capsys, bad_shards)
    assert rc == 0, err
    shard = bad_shards / "train-000003.tar"
    shard.rename(bad_shards / "moved.tar")
    assert_refused(*preflight(capsys, bad_shards), str(shard), "missing")
    (bad_shards / "moved.tar").rename(shard)
    blob = shard.read_bytes()
    shard.write_bytes(blob[:len(blob) // 2 + 100])  # cut inside a member
    assert_refused(*preflight(capsys, bad_shards), str(shard), "truncated")
    shard.write_bytes(blob[:3 * 512 * 2 * 10])  # cut between members: fewer samples than _info.json says
    assert_refused(*preflight(capsys, bad_shards), str(shard), "truncated")
    shard.write_bytes(blob)
    info = json.loads((bad_shards / "_info.json").read_text())
    info["splits"]["val"]["shard_lengths"][1] = 101
    info["splits"]["val"]["num_samples"] = 361
    (bad_shards / "_info.json").write_text(json.dumps(info))
    assert_refused(*preflight(capsys, bad_shards), str(bad_shards / "val-000001.tar"), "says 101")
    info["splits"]["val"]["num_samples"] = 360
    (bad_shards / "_info.json").write_text(json.dumps(info))
    assert_refused(*preflight(capsys, bad_shards), "num_samples 360", "add up to 361")
    info["splits"]["val"]["shard_lengths"][1] = 100
    info["splits"]["val"]["num_samples"] = 360
    (bad_shards / "_info.json").write_text(json.dumps(info))
    rewrite_member(bad_shards / "val-000002.tar", "00000250.cls", b"12")
    assert_refused(*preflight(capsys, bad_shards), str(bad_shards / "val-000002.tar"), "class index 12",
                   "0..9")
    rewrite_member(bad_shards / "val-000002.tar", "00000250.cls", b"2")
    assert preflight(capsys, bad_shards)[0] == 0
    assert_refused(*preflight(capsys, bad_shards, "--class-map", str(bad_shards / "_info.json")), "--class-map",
                   "does not apply to shards")
    (bad_shards / "_info.json").unlink()
    assert_refused(*preflight(capsys, bad_shards), "_info.json", "snnet shards")


# ------------------------------------------------------------------------------------------- the whole journey
def results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_argv(wds, config, out, experiment):
    return [wds, "--dataset", "wds/digits", "--stitch_config", config, *FAST, "-j", "1", "--epochs", "1",
            "--output", out, "--experiment", experiment, "--val-stitches", "0"]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory, tiny_config):
    """1 epoch from the digits shards on 2 processes (each with 1 loader worker): the run folder."""
    out = tmp_path_factory.mktemp("trained")
    r = run(["./distributed_train.sh", "2", *train_argv(demo[1], tiny_config, out, "wds21")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LS init" in r.stderr and "fitted on 32 clean images" in r.stderr
    return out / "wds21"


@pytest.mark.slow
@pytest.mark.dist
def test_train_on_two_processes_from_shards_then_evaluate_exactly(demo, trained, tmp_path, tiny_config):
    """Train 1 epoch from the shards on 2 processes; evaluate that checkpoint from the folder (1 process) and from
    the shards on 1, 2 and 3 processes with 1 and 2 loader workers: the same images, the same numbers. (The training
    run's own final evaluation, 2 processes with 1 loader worker each, is one of them.) The readers of the 4 shards
    (100, 100, 100, 60 images): one (1 x 1), split between loader workers (1 x 2), between processes (2 x 1), and
    both, into more readers than shards (3 x 2: 6 ranges of 56-64 images, every one but the first starting inside a
    shard). 2 x 2 and 3 x 1 split the same way (ranges by rank, then whole batches by worker, starting inside
    shards) and are not run: each is a torchrun launch of its own."""
    folder, wds = demo
    shards = ["--dataset", "wds/digits"]
    ckpt = trained / "last.pth.tar"
    cli = shared_cli()  # one process: forked from a server that imported the library once

    def evaluate(data, name, procs, workers, *extra):
        argv = [data, *extra, "--stitch_config", tiny_config, *FAST, "-j", str(workers), "--eval", "--resume", ckpt,
                "--output", tmp_path, "--experiment", name]
        if procs == 1:
            code, _, err = cli.call("train", argv)
        else:  # torchrun itself (distributed_train.sh adds only its one-process preflight, run above)
            r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                     "train.py", *argv])
            code, err = r.returncode, r.stderr
        assert code == 0, err[-3000:]
        return results(tmp_path / name / "stitches_res.txt")

    folder_res = evaluate(folder, "folder", 1, 0)
    assert len(folder_res) == 12 and all(rec["samples"] == 360 for rec in folder_res)
    assert folder_res[0]["data"] == f"folder:{folder / 'val'}"
    run_dir = lambda name: trained if name == "wds21" else tmp_path / name
    preds = lambda name: np.load(run_dir(name) / "stitches_pred.npz", allow_pickle=False)
    folder_pred = preds("folder")  # per-image predictions (the anchors'), keyed by sample id
    assert folder_pred["sample_id"].tolist() == list(range(360))
    for procs, workers in ((1, 1), (1, 2), (2, 1), (3, 2)):
        name = f"wds{procs}{workers}"
        got = evaluate(wds, name, procs, workers, *shards) if name != "wds21" else \
            results(run_dir(name) / "stitches_res.txt")
        assert [(g["cfg_id"], g["samples"], g["acc1"], g["acc5"]) for g in got] == \
               [(f["cfg_id"], f["samples"], f["acc1"], f["acc5"]) for f in folder_res], (procs, workers)
        assert all(abs(g["loss"] - f["loss"]) < 1e-6 for g, f in zip(got, folder_res)), (procs, workers)
        assert got[0]["data"] == f"wds:{wds} split val (4 shards)"
        pred = preds(name)  # image by image: the same ids, labels and top-5 classes as the folder's
        for key in ("sample_id", "label", "cfg_id", "top5"):
            assert np.array_equal(pred[key], folder_pred[key]), (procs, workers, key)


@pytest.mark.slow
@pytest.mark.dist
def test_two_localhost_nodes_train_from_shards_like_one_node(demo, trained, tmp_path, tiny_config):
    """Two torchrun agents of one process each (static rendezvous on 127.0.0.1) read the same stream parts as one
    node of two processes: the same weights, bit for bit."""
    from test_multinode import free_port, stop, torchrun_args
    port, procs, logs = free_port(), [], [tmp_path / f"node{i}.log" for i in range(2)]
    for i in range(2):
        env = {"TORCHRUN_ARGS": " ".join(torchrun_args("static", port, i)),
               "SNNET_NO_PREFLIGHT": "1"}  # the shards' launch checks ran in the `trained` launch
        procs.append(start(["./distributed_train.sh", "1", *train_argv(demo[1], tiny_config, tmp_path, "nodes")],
                           logs[i], env))
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        stop([p for p in procs if p.poll() is None])
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    a, b = (torch.load(d / "last.pth.tar", weights_only=True)["state_dict"] for d in (trained, tmp_path / "nodes"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(x["acc1"], x["samples"]) for x in results(trained / "stitches_res.txt")] == \
           [(x["acc1"], x["samples"]) for x in results(tmp_path / "nodes" / "stitches_res.txt")]


RNG_HEAVY = ["--epochs", "2", "--reprob", "0.5", "--mixup", "0.3", "--drop-path", "0.1", "-j", "1"]


@pytest.mark.slow
def test_kill_and_resume_on_shards_is_bit_identical(digits_folder, tmp_path, tiny_config, capsys):
    """Killed mid-epoch after a recovery checkpoint, the run resumes its position in the shard stream (the epoch's
    order, the batches already trained) and ends bit-identical to the uninterrupted run."""
    rc, _, err = run_cli(capsys, "shards", digits_folder, tmp_path / "wds", "--shard-size", "40")
    assert rc == 0, err
    base = [sys.executable, "train.py", tmp_path / "wds", "--dataset", "wds/digits", "--stitch_config", tiny_config,
            *FAST, *RNG_HEAVY, "--output", tmp_path, "--recovery-interval", "2"]
    r = run(base + ["--experiment", "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    per_epoch = 160 // 16
    cmd = base + ["--experiment", "killed", "--auto-resume"]
    r = run(cmd, env={"SNNET_FAULT_KILL_AT_STEP": str(per_epoch + 5)})
    assert r.returncode == -9, r.stderr[-2000:]
    rec = torch.load(tmp_path / "killed" / "recovery.pth.tar", weights_only=True)
    assert (rec["epoch"], rec["batch_idx"]) == (1, 4)
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recovery.pth.tar" in r.stderr
    a, b = (torch.load(tmp_path / n / "last.pth.tar", weights_only=True) for n in ("whole", "killed"))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 2 * per_epoch)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert (tmp_path / "whole" / "summary.csv").read_bytes() == (tmp_path / "killed" / "summary.csv").read_bytes()
    assert [x["acc1"] for x in results(tmp_path / "whole" / "stitches_res.txt")] == \
           [x["acc1"] for x in results(tmp_path / "killed" / "stitches_res.txt")]


# --------------------------------------------------------------------------------- Hugging Face datasets (local)
@pytest.mark.slow
@pytest.mark.dist
def test_hugging_face_datasets_from_local_parquet_train_and_evaluate_exactly(digits_folder, tmp_path, tiny_config):
    """The digits as a local Hugging Face dataset (parquet in the Hub's layout, under --data-dir/NAME): training
    streams it (hfids/, 2 processes), and the run's own final evaluation of its checkpoint (hfds/, the same 2
    processes) counts the folder's images with the folder's numbers."""
    import datasets  # requirements.txt
    parts = datasets.load_dataset("imagefolder", data_dir=str(digits_folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(parts) == ["train", "validation"]
    (tmp_path / "hf" / "digits" / "data").mkdir(parents=True)
    for split, ds in parts.items():
        ds.to_parquet(str(tmp_path / "hf" / "digits" / "data" / f"{split}-00000-of-00001.parquet"))
    common = ["--stitch_config", tiny_config, *FAST, "--output", tmp_path]
    r = run(["./distributed_train.sh", "2", tmp_path / "hf", "--dataset", "hfids/digits", *common, "--epochs", "1",
             "--experiment", "train", "--val-stitches", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fitted on 32 clean images" in r.stderr
    trained = results(tmp_path / "train" / "stitches_res.txt")
    ckpt = tmp_path / "train" / "last.pth.tar"
    code, _, err = shared_cli().call("train", [digits_folder, *common, "--eval", "--resume", ckpt, "--experiment",
                                               "folder"])
    assert code == 0, err[-3000:]
    folder_res = results(tmp_path / "folder" / "stitches_res.txt")
    assert [(g["cfg_id"], g["samples"], g["acc1"]) for g in trained] == \
           [(f["cfg_id"], 60, f["acc1"]) for f in folder_res]
    assert all(abs(g["loss"] - f["loss"]) < 1e-6 for g, f in zip(trained, folder_res))
    assert folder_res[0]["data"] == f"folder:{digits_folder / 'val'}"
    assert trained[0]["data"] == f"hfds:{tmp_path / 'hf' / 'digits'} split validation"


# ------------------------------------------------------------------------------- never trust input, part 4
def _tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_into_a_non_empty_out_refused_or_cleaned(demo, tmp_path, capsys):
    """A rerun with another --shard-size used to leave the old shards beside the new _info.json."""
    folder, _ = demo
    out = tmp_path / "wds"
    assert run_cli(capsys, "shards", folder, out, "--shard-size", "400")[0] == 0
    before = _tree(out)
    assert_refused(*run_cli(capsys, "shards", folder, out, "--shard-size", "1000")[::2], f"OUT '{out}' already holds 6",
                   "pass --clean")
    assert _tree(out) == before
    rc, _, err = run_cli(capsys, "shards", folder, out, "--shard-size", "1000", "--clean")
    assert rc == 0, err
    assert sorted(_tree(out)) == ["_info.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert_refused(*run_cli(capsys, "shards", folder, out, "--clean")[::2], "notes.txt", "not shards")
    assert _tree(out) == before


@pytest.mark.parametrize("bad", ["0-byte PNG", "corrupt JPEG", "truncated PNG"])
def test_shards_refuse_an_image_they_cannot_read(demo, tmp_path, capsys, bad):
    folder, _ = demo
    src = tmp_path / "digits"
    shutil.copytree(folder, src)
    victim = sorted((src / "val" / "7").glob("*.png"))[2]
    if bad == "0-byte PNG":
        victim.write_bytes(b"")
    elif bad == "corrupt JPEG":
        victim.unlink()
        victim = victim.with_suffix(".jpg")
        victim.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    else:  # its header is whole, its pixels cut: only decoding finds it (as the images are packed)
        victim.write_bytes(victim.read_bytes()[:60])
    rc, _, err = run_cli(capsys, "shards", src, tmp_path / "wds", "--shard-size", "100")
    assert_refused(rc, err, f"image '{victim}' cannot be read")
    assert not (tmp_path / "wds").exists() or list((tmp_path / "wds").iterdir()) == []


def test_eval_from_shards_with_a_bad_validation_image_refused_before_work(demo, tmp_path, capsys):
    """Shards written by another tool (or damaged later): the preflight opens every validation image's header."""
    _, wds = demo
    bad = tmp_path / "wds"
    shutil.copytree(wds, bad)
    shard = bad / "val-000001.tar"
    members = shard_members(shard)
    target = next(n for n, _ in members if n.endswith(".png"))
    rewrite_member(shard, target, b"")
    rc, err = preflight(capsys, bad, "--eval")
    assert_refused(rc, err, f"sample '{target[:-4]}' of validation shard '{shard}': its image cannot be read")


@pytest.mark.slow
def test_resumed_evaluation_is_keyed_by_its_data_source(demo, tiny, tmp_path):
    """The folder evaluation's records are not reused for the shards' evaluation (another data source)."""
    folder, wds = demo
    small = tmp_path / "small"  # one validation image per class: the first evaluation in a moment
    for cls in sorted((folder / "val").iterdir()):
        (small / "val" / cls.name).mkdir(parents=True)
        shutil.copy(sorted(cls.iterdir())[0], small / "val" / cls.name)
    cli = shared_cli()
    common = ["--stitch_config", tiny.config, *FAST, "--eval", "--resume", tiny.ckpt, "--output", tmp_path,
              "--experiment", "ev", "--save-predictions", "none"]
    code, _, err = cli.call("train", [small, *common])
    assert code == 0, err
    before = (tmp_path / "ev" / "stitches_res.txt").read_text()
    code, _, err = cli.call("train", [wds, "--dataset", "wds/digits", *common])
    lines = err.strip().splitlines()  # after the shard check's progress line
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert "holds results of another data source ('folder:" in lines[-1] and "this run evaluates 'wds:" in err
    assert (tmp_path / "ev" / "stitches_res.txt").read_text() == before


@pytest.mark.slow
def test_the_same_shards_command_again_finishes_a_killed_run_or_does_nothing(demo, tmp_path):
    """`snnet shards` killed (kill -9) mid-way left shards without _info.json, and the same command again was refused
    (OUT not empty). Now the same command finishes the job: the output is byte for byte a whole run's; run once more
    it is a no-op (nothing rewritten). Another request into that OUT is still refused (test above)."""
    import signal
    import time
    folder, _ = demo
    cmd = [sys.executable, "-m", "snnet.cli", "shards", folder, None, "--shard-size", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    whole = tmp_path / "whole"
    # the runs that are not killed: forked from helpers.run's server (a process of their own, without the seconds of
    # importing the library); the killed one is started afresh, as the user did
    r = run([*cmd[:5], whole, *cmd[6:]])
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen([str(c) for c in cmd[:5]] + [str(out)] + cmd[6:], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while not (out / "train-000010.tar").exists() and time.monotonic() < end and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -9 and not (out / "_info.json").exists()  # killed mid-way, as the user did
    r = run([*cmd[:5], out, *cmd[6:]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tree(out) == _tree(whole)  # finished: the same bytes as a run that was never killed
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    r = run([*cmd[:5], out, *cmd[6:]])
    assert r.returncode == 0 and "1437 images" in r.stdout, r.stderr[-2000:]
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps  # complete: nothing written again


def test_shard_class_options_refused_before_any_shard_is_read(bad_shards, monkeypatch, capsys):
    """--num-classes below _info.json's classes and --class-map are decided by _info.json alone: refused before the
    shards are scanned (their progress line came first: a second line, after logging started)."""
    from snnet.data import shards

    def no_reading(*a, **kw):
        raise AssertionError("a shard was read")
    monkeypatch.setattr(shards, "iter_shard", no_reading)
    assert_refused(*preflight(capsys, bad_shards, "--num-classes", "5"), "--num-classes 5 is smaller than the 10")
    assert_refused(*preflight(capsys, bad_shards, "--class-map", str(bad_shards / "_info.json")), "--class-map",
                   "does not apply to shards")


def test_training_skips_an_unreadable_shard_image_in_one_warning_and_evaluation_stops(demo, tmp_path, caplog):
    """A corrupt or over-large (decompression-bomb) image inside a training shard is skipped with one warning naming
    the sample and its shard, the next readable sample taking its place (the epoch keeps its length), as a corrupt
    image in a folder is; evaluation stops on it, naming it (it stopped training mid-epoch with 4 stderr lines)."""
    from test_input_catalogue import bomb_png

    from snnet.data.datasets import EvalStream, ShardSubset, TrainStream
    from snnet.data.shards import ShardError, find_split
    wds = tmp_path / "wds"
    shutil.copytree(demo[1], wds)
    shard = wds / "train-000000.tar"
    names = [name for name, _ in shard_members(shard) if name.endswith(".png")]
    rewrite_member(shard, names[3], b"\x89PNG truncated")
    rewrite_member(shard, names[7], bomb_png())
    split = find_split(str(wds), "train")
    stream = TrainStream(split, seed=0, rank=0, world_size=1, batch_size=16, buffer=8)
    with caplog.at_level(logging.WARNING):
        got = list(stream)
    assert len(got) == len(stream)
    skipped = sorted(r.getMessage() for r in caplog.records if "skipped training image" in r.getMessage())
    assert len(skipped) == 2, skipped
    for name, why in ((names[3], "(UnidentifiedImageError)"),
                      (names[7], "(too large for PIL: 196,000,000 pixels, over its limit of 178,956,970; downscale")):
        assert any(f"sample {name.rsplit('.', 1)[0]!r} of shard {str(shard)!r} {why}" in m for m in skipped), skipped
    with pytest.raises(ShardError, match=f"sample {names[3].rsplit('.', 1)[0]!r} of shard .* cannot be read"):
        list(EvalStream(find_split(str(wds), "train"), 0, 1, 16))
    caplog.clear()  # the LS init's images from the training shards: skipped the same way
    with caplog.at_level(logging.WARNING):
        drawn = [ShardSubset(split, [3, 4, 7])[i] for i in range(3)]  # 3 -> 4; 4; 7 -> 3 -> 4
    assert all(np.array_equal(np.asarray(img), np.asarray(drawn[1][0])) and label == drawn[1][1]
               for img, label in drawn)
    assert sum("skipped training image" in r.getMessage() for r in caplog.records) == 3


def test_resuming_on_shards_of_other_classes_is_refused(demo):
    """A resumed checkpoint's recorded class names against the shards' _info.json classes: shards fixed their class
    indices when written, so another class, or the same classes in another order, is refused naming them."""
    from snnet.data.checks import DataError, check_data
    from snnet.data.options import DataOptions
    _, wds = demo
    data = DataOptions(data_dir=str(wds), dataset="wds/digits", seed=0, batch_size=32)
    digits = [str(i) for i in range(10)]
    check_data(data, need_train=False, world_size=1, trained=(digits, "ok.pth.tar"))
    with pytest.raises(DataError, match=r"missing 'ten'; not trained on '9'\): its shards number their classes"):
        check_data(data, need_train=False, world_size=1, trained=([*digits[:9], "ten"], "other.pth.tar"))
    with pytest.raises(DataError, match=r"\(the same classes in another order\)"):
        check_data(data, need_train=False, world_size=1, trained=(digits[::-1], "other.pth.tar"))
