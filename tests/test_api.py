"""The Python API (snnet/api.py, docs/python_api.md) and the image size a config records: the demo configs build
at their 16 px without anyone typing it, and a wrong guess names the size to use. The API's examples themselves
run in tests/test_docs.py."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from helpers import vit

import snnet
from snnet.results.select import model_img_size
from snnet.stitching.adapter import AnchorError
from snnet.train.main import main
from snnet.utils.checkpoint import save_checkpoint

DEMO = "configs/demo_digits.json"


def test_demo_config_builds_at_its_recorded_size_and_classes():
    torch.manual_seed(0)
    net = snnet.create_snnet(DEMO, pretrained=False)
    assert model_img_size(net) == (16, 16) and net.num_configs == 23
    assert net(torch.randn(2, 3, 16, 16), 14).shape == (2, 10)
    assert net.describe(14) == "w32[..b0] -(1.0)-> w64[b1..]"  # random anchors keep the config's labels
    assert model_img_size(snnet.create_snnet(DEMO, pretrained=False, img_size=32)) == (32, 32)  # given wins


def test_a_cnn_sn_net_keeps_the_size_it_was_built_for():
    """CNN anchors have no image size of their own: the SN-Net keeps the size it was built at (the config's
    input_size, or img_size), so data_config and evaluate preprocess at it and cost FLOPs at it. Before, a
    `snnet quickstart` SN-Net (CNNs trained at 64 px) came back from snnet.load preprocessing at timm's 224 px: top-1
    18.67 % through the API where its results file said 97.33 %."""
    cnn = {"anchors": [{"name": "resnet18", "label": f"c{w}", "model_kwargs": {"channels": [w, 2 * w, 4 * w, 8 * w],
                                                                              "stem_width": w}} for w in (4, 8)],
           "num_classes": 3, "input_size": 48}
    net = snnet.create_snnet(cnn, pretrained=False)
    assert model_img_size(net) == (48, 48) and snnet.data_config(net)["input_size"] == (3, 48, 48)
    assert model_img_size(snnet.create_snnet(cnn, pretrained=False, img_size=32)) == (32, 32)  # given wins
    cnn.pop("input_size")
    assert model_img_size(snnet.create_snnet(cnn, pretrained=False)) == (224, 224)  # none: timm's default


def test_train_py_takes_the_demo_config_size(capsys, monkeypatch, tmp_path):
    """`train.py --dry-run` (and so --eval) on the demo config resolves --img-size 16 and 10 classes untyped."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert main([str(tmp_path), "--stitch_config", DEMO, "--dry-run"]) == 0
    run = yaml.safe_load(capsys.readouterr().out)
    assert run["img_size"] == 16 and run["num_classes"] == 10


@pytest.fixture(scope="module")
def anchor_at_16(tmp_path_factory):
    """A config whose one anchor checkpoint was trained at 16 px, and which does not record the size."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    spec = vit(16)
    model = snnet.create_anchor(snnet.stitching.config.AnchorSpec(spec["name"], None, spec["model_kwargs"]),
                                pretrained=False, num_classes=10, img_size=16)
    save_checkpoint(root / "w16.pth.tar", {"state_dict": model.state_dict()})
    other = vit(32)
    torch.manual_seed(1)
    wide = snnet.create_anchor(snnet.stitching.config.AnchorSpec(other["name"], None, other["model_kwargs"]),
                               pretrained=False, num_classes=10, img_size=16)
    save_checkpoint(root / "w32.pth.tar", {"state_dict": wide.state_dict()})
    return {"anchors": [{**spec, "checkpoint": str(root / "w16.pth.tar")},
                        {**other, "checkpoint": str(root / "w32.pth.tar")}], "num_classes": 10,
            "skip_final_norm": False}


@pytest.mark.parametrize("img_size, built", [(32, 32), (None, 224)])
def test_a_wrong_image_size_names_the_size_to_use(anchor_at_16, img_size, built):
    with pytest.raises(AnchorError) as e:
        snnet.create_snnet(anchor_at_16, img_size=img_size)
    message = str(e.value)
    assert f"trained at image size 16, the network built for {built}: use img_size=16" in message, message
    assert '"input_size": 16' in message and "\n" not in message


def test_the_recorded_size_fits(anchor_at_16):
    net = snnet.create_snnet({**anchor_at_16, "input_size": 16})
    assert model_img_size(net) == (16, 16)


def test_ls_init_and_evaluation_from_tensors(digits_images, tmp_path):
    """A tensor of images and a dataset of tensors work as well as folders; `out` writes stitches_res.txt."""
    x, y = digits_images
    x = torch.nn.functional.interpolate(x[:120], size=16)
    torch.manual_seed(0)
    net = snnet.create_snnet({"anchors": [vit(8), vit(16)], "input_size": 16, "num_classes": 10}, pretrained=False)
    reports = snnet.ls_init_from_images(net, x[:64], batch_size=32)
    assert reports and all(r.rel_error < 1 for r in reports)
    data = torch.utils.data.TensorDataset(x[64:], y[64:120])
    records = snnet.evaluate(net, data, cfg_ids=[0, 1, 3], batch_size=20)
    assert [r["cfg_id"] for r in records] == [0, 1, 3] and all(r["samples"] == 56 for r in records)
    assert snnet.stitch_for(net, records, max_flops=records[1]["flops"]) in (0, 1, 3)
    out = tmp_path / "stitches_res.txt"  # the file stands for its records
    snnet.evaluate(net, data, cfg_ids=[0, 1, 3], batch_size=20, out=out)
    assert snnet.stitch_for(net, out, max_flops=records[1]["flops"]) == \
        snnet.stitch_for(net, records, max_flops=records[1]["flops"])


def test_bad_arguments_are_one_clear_line(tmp_path):
    with pytest.raises(snnet.api.ApiError, match="not a stitch config"):
        snnet.create_snnet(42)
    net = snnet.create_snnet({"anchors": [vit(8), vit(16)], "input_size": 16}, pretrained=False)
    with pytest.raises(snnet.api.ApiError, match="does not exist; pass a folder of class subfolders"):
        snnet.evaluate(net, tmp_path / "missing")
    with pytest.raises(snnet.api.ApiError, match="ls mode 'best'"):
        snnet.ls_init_from_images(net, torch.zeros(4, 3, 16, 16), mode="best")
    assert json.dumps(snnet.__all__)  # the API names are listed
    x = torch.randn(2, 3, 16, 16)
    for images, words in ((x[0], "add the batch dimension, images.unsqueeze(0)"), (x.numpy(), "got a ndarray"),
                          ((x * 255).to(torch.uint8), "got a torch.uint8 tensor"), (x[:, :1], "have 1 channel(s)")):
        with pytest.raises(snnet.api.ApiError, match=re.escape(words)):
            snnet.predict(net, images, cfg_id=1)
    assert snnet.predict(net, x.half(), cfg_id=1)[0]["class"] == snnet.predict(net, x, cfg_id=1)[0]["class"]
    with pytest.raises(snnet.api.ApiError, match=re.escape("got a torch.uint8 tensor of shape (2, 3, 16, 16)")):
        snnet.ls_init_from_images(net, [(x * 255).to(torch.uint8)])
    with pytest.raises(snnet.api.ApiError, match="evaluate needs labels: pass an image folder"):
        snnet.evaluate(net, x)
    with pytest.raises(snnet.api.ApiError, match="top_k 0 gives no classes"):
        snnet.predict(net, x, cfg_id=1, top_k=0)
    with pytest.raises(snnet.api.ApiError, match="batch_size 0 is not a positive number of images"):
        snnet.evaluate(net, tmp_path, batch_size=0)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(snnet.api.ApiError, match="holds no images timm reads"):
        snnet.evaluate(net, tmp_path / "empty")


def test_train_py_resume_at_a_wrong_image_size_names_the_size(tiny, digits_folder, capsys):
    """train.py --eval --resume of an SN-Net trained at 16 px, typed --img-size 32: one line naming 16."""
    from helpers import assert_refused
    rc = main([str(digits_folder), "--stitch_config", str(tiny.config), "--eval", "--resume", str(tiny.ckpt),
               "--img-size", "32", "--no-pretrained", "-j", "0", "--num-classes", "10",
               "--output", str(tiny.root / "out")])
    assert_refused(rc, capsys.readouterr().err, "trained at image size 16", "use img_size=16")


def test_evaluate_refuses_an_unreadable_image_as_train_py_does(digits_folder, tmp_path):
    """snnet.evaluate reads a folder as train.py's evaluation does: an unreadable image is an error naming it (timm's
    dataset replaced it by the next image, so the counts were silently wrong)."""
    import shutil

    from snnet.data.checks import DataError
    shutil.copytree(digits_folder / "val", tmp_path / "val")
    victim = sorted((tmp_path / "val").rglob("*.png"))[5]
    victim.write_bytes(b"\x89PNG truncated")
    net = snnet.create_snnet({"anchors": [vit(8), vit(16)], "input_size": 16, "num_classes": 10}, pretrained=False)
    with pytest.raises(DataError, match="cannot be read") as e:
        snnet.evaluate(net, tmp_path / "val", cfg_ids=[0], batch_size=20)
    assert str(victim) in str(e.value)
