"""Deployment: a stitch exported as a standalone network (pruned to exactly its params, every format checked
against the SN-Net), measured latency in the results file, and their refusals."""
import json

import pytest
import torch
from helpers import IMG, assert_refused, run_cli, vit

from snnet.deploy.export import count_params, export_stitch, load_exported, load_snnet, stitched_network
from snnet.results.records import read_results
from snnet.results.select import model_img_size
from snnet.stitching.build import build_snnet
from snnet.stitching.config import parse_stitch_config
from snnet.utils.checkpoint import save_checkpoint


# --------------------------------------------------------------------------------------------------- export
def test_every_route_prunes_to_exactly_its_params(tiny):
    net, x = tiny.net, torch.randn(2, 3, IMG, IMG)
    for c in range(net.num_configs):
        module, _ = stitched_network(net, c)
        assert count_params(module) == net.params(c), c
        with torch.no_grad():
            assert torch.equal(module(x), net(x, c)), c
    assert count_params(stitched_network(net, 5)[0]) < sum(p.numel() for p in net.anchors.parameters())


FAMILIES = {
    "swin": ({"anchors": [{"name": n, "model_kwargs": {"embed_dim": 24, "num_heads": [1, 2, 4, 8]}} for n in
                          ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")]}, 32),
    "resnet": ({"anchors": ["resnet18", "resnet34"]}, 64),
    "levit": ({"anchors": ["levit_128s", "levit_128"]}, 64),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_pruning_is_family_agnostic(family):
    raw, size = FAMILIES[family]
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config(raw), pretrained=False, num_classes=10, img_size=size).eval()
    if family != "resnet":  # CNNs take any size and record none (timm's default 224 applies)
        assert model_img_size(net) == (size, size)  # Swin: patch_embed.img_size; LeViT: timm's _model_args
    x = torch.randn(2, 3, size, size)
    for c in range(net.num_configs):
        module, _ = stitched_network(net, c)
        assert count_params(module) == net.params(c), (family, c)
        with torch.no_grad():
            torch.testing.assert_close(module(x), net(x, c), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_cli_round_trip(tiny, tmp_path, capsys):
    import onnxruntime as ort
    out, cfg_id = tmp_path / "export", 7  # ViT#0 blocks 0-2 -> ViT#1 blocks 1-3
    rc, stdout, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", cfg_id,
                          "--out", out, "--img-size", IMG, "--no-pretrained")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.safetensors",
                                                      "model.torchscript.pt"]
    assert f"params {tiny.net.params(cfg_id):,} (= SNNet.params({cfg_id}))" in stdout
    spec = json.loads((out / "model.json").read_text())
    assert spec["params"] == tiny.net.params(cfg_id) and spec["flops"] == tiny.records[cfg_id]["flops"]
    assert [a["name"] for a in spec["anchors"]] == ["deit_tiny_patch16_224"] * 2
    assert spec["num_classes"] == 10 and spec["img_size"] == [IMG, IMG] and spec["route"] == tiny.net.describe(cfg_id)
    assert ["stitch", "0_1"] in spec["steps"]

    net = load_exported(out)  # one call
    assert not net.training and count_params(net) == tiny.net.params(cfg_id)
    front, end = net.anchors["0"], net.anchors["1"]
    assert isinstance(front.blocks[3], torch.nn.Identity) and isinstance(front.head, torch.nn.Identity)
    assert end.cls_token is None and isinstance(end.patch_embed, torch.nn.Identity)
    x = torch.randn(5, 3, IMG, IMG)  # another batch size than exported with: the ONNX batch axis is dynamic
    with torch.no_grad():
        ref = tiny.net(x, cfg_id)
        assert torch.equal(net(x), ref)
        torch.testing.assert_close(torch.jit.load(str(out / "model.torchscript.pt"))(x), ref, rtol=0, atol=1e-6)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(onnx_logits, ref, rtol=1e-4, atol=1e-5)


def test_export_uses_the_config_the_checkpoint_recorded(tiny, tmp_path):
    # train.py records anchors and config fields as JSON text; without --stitch_config that is used
    ident = {"anchors": [{"name": a["name"], "checkpoint": None, "model_kwargs": a["model_kwargs"]}
                         for a in (vit(8), vit(16))], "stitch_config": {}, "input_size": [3, IMG, IMG],
             "num_classes": 10}
    ckpt = tmp_path / "recorded.pth.tar"
    save_checkpoint(ckpt, {"state_dict": tiny.net.state_dict(), "epoch": 3, "config": json.dumps(ident)})
    loaded = load_snnet(ckpt, img_size=IMG)
    assert loaded.net.num_configs == tiny.net.num_configs and loaded.num_classes == 10
    spec = export_stitch(loaded, 1, tmp_path / "anchor1", formats=())
    assert spec["route"] == tiny.net.describe(1) and sorted(spec["files"]) == ["weights"]
    assert count_params(load_exported(tmp_path / "anchor1")) == tiny.net.params(1)


def test_a_bare_state_dict_exports_at_the_configs_input_size(tmp_path):
    """A checkpoint without recorded arguments (only a state dict) is built, exported and preprocessed at the
    config's input_size (16 for the demo config), not timm's 224: the export's reload check passes and model.json
    says 16."""
    cfg_path = tmp_path / "demo.json"
    raw = json.loads(open("configs/demo_digits.json").read())
    raw["anchors"] = [{k: v for k, v in a.items() if k != "checkpoint"} for a in raw["anchors"]]
    cfg_path.write_text(json.dumps(raw))
    net = build_snnet(parse_stitch_config(raw), pretrained=False)
    ckpt = tmp_path / "bare.pth.tar"
    save_checkpoint(ckpt, {"state_dict": net.state_dict()})
    loaded = load_snnet(ckpt, cfg_path)
    assert loaded.img_size == (16, 16) and loaded.data_config["input_size"] == [3, 16, 16]
    spec = export_stitch(loaded, 3, tmp_path / "cfg3", formats=())
    assert json.loads((tmp_path / "cfg3" / "model.json").read_text())["data_config"]["input_size"] == [3, 16, 16]
    assert spec["route"] == net.describe(3)


def test_export_refusals(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 99, "--out", out)
    assert_refused(rc, err, "cfg_id 99", "0..11", "snnet select")
    rc, _, err = run_cli(capsys, "export", tmp_path / "missing.pth.tar", "--stitch_config", tiny.config, "--cfg-id", 1,
                     "--out", out)
    assert_refused(rc, err, "missing.pth.tar", "does not exist")
    rc, _, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", "x", "--out", out)
    assert_refused(rc, err, "'x'", "--cfg-id 5")
    rc, _, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 1, "--out", out,
                     "--img-size", 32)  # the checkpoint's position embeddings are for 16x16
    assert_refused(rc, err, "does not fit", "img_size 32", "--img-size")
    rc, _, err = run_cli(capsys, "export", tiny.ckpt, "--cfg-id", 1, "--out", out)
    assert_refused(rc, err, "records no stitch config", "--stitch_config")
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    with pytest.raises(Exception, match="not an export folder"):
        load_exported(tmp_path)


# --------------------------------------------------------------------------------------------------- latency
def test_latency_added_to_results(tiny, tmp_path, capsys):
    results = tmp_path / "stitches_res.txt"
    results.write_text(tiny.results.read_text())
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--batch", 1, "--batch", 4,
                       "--warmup", 1, "--repeats", 3, "--results", results, "--threads", 1)
    assert rc == 0, err
    assert f"updated {len(tiny.records)} records" in out and "| ms @ b1 | ms @ b4 |" in out
    records = read_results(results)
    assert [r["cfg_id"] for r in records] == [r["cfg_id"] for r in tiny.records]
    for r, old in zip(records, tiny.records):
        assert r["latency_ms_b1"] > 0 and r["latency_ms_b4"] > 0 and r["latency_device"].startswith("cpu: ")
        assert {k: r[k] for k in old} == old  # the evaluation's keys are kept as they were
    rc, out, err = run_cli(capsys, "pareto", results, "--by", "latency", "--out", tmp_path / "lat")
    assert rc == 0 and (tmp_path / "lat" / "pareto_latency_ms_b1.png").exists() and "ms @ b4" in out
    slowest = max(r["latency_ms_b1"] for r in records)
    rc, out, _ = run_cli(capsys, "select", results, "--max-latency-ms", slowest * 2, "--json")
    assert rc == 0 and json.loads(out)["cfg_id"] == max(records, key=lambda r: r["acc1"])["cfg_id"]


def test_latency_refuses_another_snnets_results(tiny, tmp_path, capsys):
    results = tmp_path / "other.txt"
    text = "".join(json.dumps({**r, "route": r["route"].replace("#1", "#7")}) + "\n" for r in tiny.records)
    results.write_text(text)
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", results,
                       "--warmup", 0, "--repeats", 1)
    assert_refused(rc, err, "other.txt", "not of this SN-Net")
    assert results.read_text() == text and out == ""


def test_export_unwritable_out(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        rc, stdout, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 1,
                              "--out", out)
        assert_refused(rc, err, str(blocker), "--out")
        assert stdout == ""
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_replaces_only_an_earlier_export(tiny, tmp_path, capsys):
    """An --out folder holding files of an export's names that no export wrote (a model.json of its own, another
    program's model.safetensors or model.onnx, which the export would remove) is refused, and kept; an earlier
    export's folder is replaced by the next export."""
    from snnet.deploy.export import export_stitch, load_snnet
    from snnet.utils.errors import SNNetError
    theirs = {"own": ("model.json", '{"mine": 1}'), "hf": ("model.safetensors", "weights"), "onnx": ("model.onnx", "x")}
    for name, (file, text) in theirs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(text)
    for name, (file, _) in list(theirs.items())[:2]:  # the command: at once
        rc, stdout, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 1,
                                  "--out", tmp_path / name)
        assert_refused(rc, err, f"holds {file}, which no snnet export wrote", "--out")
    with pytest.raises(SNNetError, match="holds model.onnx, which no snnet export wrote"):  # the other formats too
        export_stitch(load_snnet(tiny.ckpt, tiny.config), 1, tmp_path / "onnx", formats=[])
    assert {n: (tmp_path / n / f).read_text() for n, (f, _) in theirs.items()} == {n: t for n, (_, t) in
                                                                                  theirs.items()}
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["model.json"]
    for cfg_id in (1, 2):  # again into its own folder: replaced
        rc, _, _ = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", cfg_id,
                           "--out", tmp_path / "ours", "--no-torchscript", "--no-onnx")
        assert rc == 0 and json.loads((tmp_path / "ours" / "model.json").read_text())["cfg_id"] == cfg_id


@pytest.mark.parametrize("opset", [5, 6, 21, 99])
def test_export_unsupported_opset_refused_up_front(tiny, tmp_path, capsys, opset):
    from torch.onnx import _constants
    lo, hi = _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    # refused before the checkpoint is loaded (a missing one is refused first, before torch is imported)
    rc, out, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 1, "--out",
                           tmp_path / "x", "--opset", opset)
    assert_refused(rc, err, f"--opset {opset}", f"{lo}..{hi}", "--no-onnx")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_export_supported_opset_range_edges(tiny, tmp_path, capfd):
    from torch.onnx import _constants
    for opset in (_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET):
        out = tmp_path / f"o{opset}"
        rc, stdout, err = run_cli(capfd, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 7,
                              "--out", out, "--no-torchscript", "--opset", opset)  # capfd: torch's C++ output too
        if rc == 0:
            assert (out / "model.onnx").exists()
        else:  # an op this opset cannot express (the ViT's expand at opset 7): one line, nothing written
            assert_refused(rc, err, f"--opset {opset}", "--no-onnx")
            assert stdout == "" and not out.exists() and not list(tmp_path.glob(f".o{opset}*"))


def _hashed_results(tiny, tmp_path, **changes):
    from snnet.results.records import file_sha256
    path = tmp_path / "stitches_res.txt"
    recs = [{**r, "checkpoint_sha256": file_sha256(tiny.ckpt), "config_sha256": "c" * 64} for r in tiny.records]
    recs = [{**r, **{k: (v(r) if callable(v) else v) for k, v in changes.items()}} for r in recs]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


LATENCY = ("--warmup", 0, "--repeats", 1, "--batch", 1)


def test_latency_accepts_its_own_checkpoints_results(tiny, tmp_path, capsys):
    path = _hashed_results(tiny, tmp_path)
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", path, *LATENCY)
    assert rc == 0, err
    assert all(r["latency_img_size"] == [IMG, IMG] for r in read_results(path))
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", path, *LATENCY)
    assert rc == 0, err  # measured again at the same size: fine


def test_latency_refuses_another_checkpoints_results(tiny, tmp_path, capsys):
    path = _hashed_results(tiny, tmp_path, checkpoint_sha256="0" * 64)
    before = path.read_bytes()
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", path, *LATENCY)
    assert_refused(rc, err, "stitches_res.txt", "0" * 12, "another checkpoint", str(tiny.ckpt))
    assert out == "" and path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_latency_refuses_another_image_size(tiny, tmp_path, capsys):
    path = _hashed_results(tiny, tmp_path, latency_img_size=[32, 32], latency_ms_b1=1.0)
    before = path.read_bytes()
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", path, *LATENCY)
    assert_refused(rc, err, "stitches_res.txt", "32x32", f"{IMG}x{IMG}", "--img-size")
    assert out == "" and path.read_bytes() == before
    # the evaluation's own image size, read from its FLOPs (our evaluator counts them at the size it ran at)
    path = _hashed_results(tiny, tmp_path, flops=lambda r: r["flops"] * 4)
    before = path.read_bytes()
    rc, out, err = run_cli(capsys, "latency", tiny.ckpt, "--stitch_config", tiny.config, "--results", path, *LATENCY)
    assert_refused(rc, err, "stitches_res.txt", "FLOPs", f"{IMG}x{IMG}", "--img-size")
    assert out == "" and path.read_bytes() == before



# ------------------------------------------------------------------------------------- faults: kill -9, full disk
def test_export_removes_what_a_killed_export_left(tiny, tmp_path):
    """A killed export leaves `.NAME.*.tmp` beside its output (its lock file unheld): the next export removes it;
    a folder of an export still starting (no lock file yet, just made) is left alone."""
    import os
    import time

    from snnet.utils.fileio import FolderLock
    killed = tmp_path / ".anchor1.k1ll3d.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    (killed / FolderLock.NAME).write_text("pid 1 on elsewhere since then")
    old = tmp_path / ".anchor1.0ld.tmp"  # an older version's leftover: no lock file, an hour old
    old.mkdir()
    os.utime(old, (time.time() - 3600,) * 2)
    starting = tmp_path / ".anchor1.n0w.tmp"
    starting.mkdir()
    other = tmp_path / ".anchor10.k1ll3d.tmp"  # another output's: not this export's to touch
    other.mkdir()
    (other / FolderLock.NAME).write_text("")
    export_stitch(load_snnet(tiny.ckpt, tiny.config, img_size=IMG), 1, tmp_path / "anchor1", formats=())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".anchor1.n0w.tmp", ".anchor10.k1ll3d.tmp", "anchor1"]


def test_export_full_disk(tiny, small_disk, capsys):
    """A real full disk under --out (safetensors' own error, no errno): one line, nothing left behind."""
    rc, out, err = run_cli(capsys, "export", tiny.ckpt, "--stitch_config", tiny.config, "--cfg-id", 1, "--out",
                           small_disk / "export", "--no-onnx")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"disk full: writing the export of cfg_id 1 into folder '{small_disk}' needs about " in err, err
    assert list(small_disk.iterdir()) == []


def test_export_full_disk_injected(tiny, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from snnet.utils.fileio import DiskFullError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(DiskFullError, match=f"into folder '{tmp_path}' needs about [\\d,]+ bytes"):
        export_stitch(load_snnet(tiny.ckpt, tiny.config, img_size=IMG), 1, tmp_path / "anchor1", formats=())
    assert list(tmp_path.iterdir()) == []
