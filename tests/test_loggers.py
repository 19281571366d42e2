"""--log-tensorboard DIR and --log-wandb (snnet/train/loggers.py): a short train.py run on the digits fixture, read back
with each package's own reader; both packages are optional (requirements-extras.txt), and a missing one is refused
at startup in one line naming the pip command."""
import json
import math
import struct
import sys
from pathlib import Path

import pytest
from helpers import FAST, run

from snnet.train.args import UsageError

PY = sys.executable
PANEL = [f"top1@{c}" for c in range(12)]  # --val-stitches all: the tiny SN-Net's 12 stitches


def train(tmp_path, digits_folder, tiny_config, *flags, env=None):
    r = run([PY, "train.py", digits_folder, "--stitch_config", tiny_config, "--epochs", "2", "--val-stitches", "all",
             "--output", tmp_path / "out", "--experiment", "logged", *FAST, *flags], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "out" / "logged", r


def check_epochs(scalars: dict[str, list[tuple[int, float]]]) -> None:
    """Per epoch: train loss and LR, the panel's means, each stitch's top-1 and the front's hypervolume."""
    for tag in ["train/loss", "train/lr", "eval/loss", "eval/top1", "eval/top5", "eval/front_hv",
                *[f"eval/{k}" for k in PANEL]]:
        assert [step for step, _ in scalars[tag]] == [0, 1], tag
    assert all(0 < v < 10 for _, v in scalars["train/loss"])  # cross-entropy of 10 classes starts near ln 10
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([1e-3, 5e-4])  # cosine over 2 epochs, no warmup
    for k in ["top1", "top5", *PANEL]:
        assert all(0 <= v <= 100 for _, v in scalars[f"eval/{k}"]), k
    assert all(math.isfinite(v) and v >= 0 for _, v in scalars["eval/front_hv"])


def check_summary_agrees(run_dir: Path, scalars) -> None:
    """The logged values are the run's own: summary.csv holds the same epoch metrics."""
    import csv
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([v for _, v in scalars["train/loss"]])
    assert [float(r["eval_top1@3"]) for r in rows] == pytest.approx([v for _, v in scalars["eval/top1@3"]])


# ------------------------------------------------------------------------------------------------------ TensorBoard
@pytest.mark.slow
def test_tensorboard_run_reads_back(tmp_path, digits_folder, tiny_config):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -r requirements-extras.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, r = train(tmp_path, digits_folder, tiny_config, "--log-tensorboard", tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb" / "logged"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    check_epochs(scalars)
    check_summary_agrees(run_dir, scalars)
    # the final front: its hypervolume, the markdown table and the Pareto figure (what snnet pareto writes)
    assert [s for s, _ in scalars["front/hypervolume"]] == [2] and scalars["front/hypervolume"][0][1] > 0
    table = events.Tensors("front/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| cfg_id | route |" in table and table == (run_dir / "pareto_flops.md").read_text()
    image = events.Images("front/figure")[0]
    assert image.step == 2 and image.width > 100 and image.height > 100
    assert (run_dir / "pareto_flops.png").exists()


# ------------------------------------------------------------------------------------------------------ wandb
def wandb_records(path: Path):
    """The records of a .wandb file, decoded with wandb's own protobuf schema (wandb_internal_pb2.Record).

    The file is a LevelDB-style log (W&B's 7-byte header, 32 KiB blocks of chunks: crc32c, length, type FULL=1,
    FIRST=2, MIDDLE=3, LAST=4); wandb >= 0.30 reads it only from its Go core, so the framing is unwrapped here."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, chunks, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of a block
            pos += block - pos % block if pos % block else 0
            continue
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
    return out


@pytest.mark.slow
def test_wandb_offline_run_reads_back(tmp_path, digits_folder, tiny_config):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -r requirements-extras.txt)")
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    run_dir, r = train(tmp_path, digits_folder, tiny_config, "--log-wandb", "--wandb-project", "snnet-test", env=env)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run_dir / "wandb").rglob("*"))
    records = wandb_records(files[0])
    kinds = [rec.WhichOneof("record_type") for rec in records]
    assert "run" in kinds and "exit" in kinds  # a complete run: started and finished
    run_record = records[kinds.index("run")].run
    assert run_record.project == "snnet-test" and run_record.display_name == "logged"
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in rec.history.item})
    scalars = {}
    for row in history:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not k.startswith("_"):
                scalars.setdefault(k, []).append((row["_step"], float(v)))
    check_epochs(scalars)
    check_summary_agrees(run_dir, scalars)
    final = [row for row in history if row["_step"] == 2]
    assert scalars["front/hypervolume"][0][0] == 2 and scalars["front/hypervolume"][0][1] > 0
    logged = {k: v for row in final for k, v in row.items()}
    assert logged["front/table/_type"] == "table-file" and logged["front/figure/_type"] == "image-file"
    media = files[0].parent / "files"
    table = json.loads((media / logged["front/table/path"]).read_text())
    assert table["columns"] == ["cfg_id", "route", "flops", "params", "acc1", "acc5"]
    front = json.loads((run_dir / "pareto_flops.json").read_text())["files"][0]["front"]
    assert [row[0] for row in table["data"]] == front
    assert (media / logged["front/figure/path"]).stat().st_size > 1000


# ------------------------------------------------------------------------------------------------------ missing
@pytest.mark.parametrize("flags, package", [(["--log-tensorboard", "tb"], "tensorboard"), (["--log-wandb"], "wandb")])
def test_missing_package_refused_in_one_line(flags, package, monkeypatch):
    from snnet.train import loggers
    from snnet.train.args import parse_args
    from snnet.train.options import RunOptions
    args, _ = parse_args(["/d", "--model", "resnet18", *flags])
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name == package else
                        real(name, *a))
    with pytest.raises(UsageError) as e:
        loggers.check_loggers(RunOptions.from_values(vars(args)).logging)  # as main checks them
    message = str(e.value)
    assert "\n" not in message and f"pip install {package}" in message and flags[0] in message


def test_missing_package_stops_train_py_at_startup(tmp_path, digits_folder, tiny_config):
    # train.py as run from the command line, with wandb hidden from the import system
    code = ("import importlib.util as u, runpy, sys\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'wandb' else real(name, *a)\n"
            f"sys.argv = ['train.py'] + {json.dumps([str(digits_folder), '--stitch_config', str(tiny_config)])} + "
            f"{json.dumps(['--output', str(tmp_path / 'out'), '--log-wandb', *FAST])}\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    r = run([PY, "-c", code])  # forked from the test's server, as a fresh `python -c` would run it
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "pip install wandb" in r.stderr and "--log-wandb" in r.stderr
    assert not (tmp_path / "out").exists()
