"""Class names end to end: read from the data (an ImageFolder's folder names, a shard folder's
_info.json, a Hugging Face ClassLabel through timm's reader), recorded in the checkpoint's arguments (JSON), written
into an export's model.json and beside stitches_res.txt, and returned by the Python API (``label`` beside
``class``). train.py recording them from a folder runs in tests/test_docs.py's own-data guide test."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import IMG, vit
from PIL import Image

import snnet
from snnet.data.datasets import class_names_of
from snnet.deploy.export import labelled, load_exported, load_snnet, recorded_class_names
from snnet.results.records import classes_path, read_class_names, write_class_names
from snnet.stitching.config import parse_stitch_config
from snnet.utils.checkpoint import save_checkpoint

NAMES = ["cat", "dog", "zebra"]


def _folder(root, names=NAMES, per_class=4):
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            px = np.full((IMG, IMG, 3), 40 * i + k, np.uint8)
            Image.fromarray(px).save(root / name / f"{k}.png")
    return root


def test_an_image_folder_names_its_classes_in_index_order(tmp_path):
    from timm.data import create_dataset
    ds = create_dataset("", root=str(_folder(tmp_path / "val", ["zebra", "cat", "dog"])), is_training=False)
    assert class_names_of(ds) == ["cat", "dog", "zebra"]  # timm's order: sorted, as the indices are
    assert [ds.reader.class_to_idx[n] for n in class_names_of(ds)] == [0, 1, 2]


def test_shards_and_a_hugging_face_reader_name_their_classes(tmp_path):
    from snnet.data.datasets import ShardDataset, write_folder_shards
    from snnet.data.shards import find_split, read_info
    _folder(tmp_path / "imgs" / "train")
    _folder(tmp_path / "imgs" / "val")
    write_folder_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), 5)
    assert read_info(str(tmp_path / "shards"))["classes"] == NAMES
    split = find_split(str(tmp_path / "shards"), "val")
    assert class_names_of(ShardDataset(split)) == NAMES
    # timm's Hugging Face reader: class_to_idx from the ClassLabel feature's names
    hf = SimpleNamespace(reader=SimpleNamespace(class_to_idx={"b": 1, "a": 0}))
    assert class_names_of(hf) == ["a", "b"]
    gaps = SimpleNamespace(reader=SimpleNamespace(class_to_idx={"a": 0, "b": 5}))  # a --class-map with gaps
    assert class_names_of(gaps) is None
    assert class_names_of(SimpleNamespace()) is None


def test_the_results_sidecar(tmp_path):
    results = tmp_path / "stitches_res.txt"
    write_class_names(results, None)
    assert not classes_path(results).exists() and read_class_names(results) is None
    write_class_names(results, NAMES)
    assert classes_path(results).name == "stitches_res.classes.json"
    assert read_class_names(results) == NAMES and read_class_names(tmp_path) == NAMES  # the folder means its file
    classes_path(results).write_text("[1, 2]")
    with pytest.raises(snnet.utils.errors.SNNetError, match="not a class-names file"):
        read_class_names(results)
    write_class_names(results, None)  # evaluated again on data without names: the earlier names do not stay
    assert not classes_path(results).exists()


@pytest.fixture(scope="module")
def named_ckpt(tmp_path_factory):
    """A checkpoint whose recorded arguments name its 3 classes (as train.py records them)."""
    root = tmp_path_factory.mktemp("named")
    raw = {"anchors": [vit(8), vit(16)]}
    (root / "cfg.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    net = snnet.build_snnet(parse_stitch_config(raw), pretrained=False, num_classes=3, img_size=IMG)
    args = {"num_classes": 3, "img_size": IMG, "model_kwargs": {}, "class_names": NAMES}
    save_checkpoint(root / "last.pth.tar", {"state_dict": net.state_dict(), "epoch": 0, "args": json.dumps(args)})
    return root


def test_names_go_from_the_checkpoint_to_the_export_and_the_api(named_ckpt, tmp_path):
    loaded = load_snnet(named_ckpt / "last.pth.tar", named_ckpt / "cfg.json")
    assert loaded.class_names == NAMES and loaded.net.class_names == NAMES
    assert snnet.load(named_ckpt / "last.pth.tar", named_ckpt / "cfg.json").class_names == NAMES
    spec = snnet.export(named_ckpt / "last.pth.tar", 1, tmp_path / "cfg1", named_ckpt / "cfg.json", formats=[])
    assert spec["class_names"] == NAMES
    assert json.loads((tmp_path / "cfg1" / "model.json").read_text())["class_names"] == NAMES
    exported = load_exported(tmp_path / "cfg1")
    assert exported.class_names == NAMES
    x = torch.randn(2, 3, IMG, IMG)
    answers = snnet.predict(tmp_path / "cfg1", x, top_k=2)
    expected = exported(x).argmax(-1).tolist()
    assert [a["class"] for a in answers] == expected
    assert [a["label"] for a in answers] == [NAMES[c] for c in expected]
    assert all(a["top_k_labels"] == [NAMES[i] for i, _ in a["top_k"]] for a in answers)
    # the SN-Net itself, stitch 1: the same answers as its export
    assert snnet.predict(loaded.net, x, cfg_id=1, top_k=2) == answers
    with pytest.raises(snnet.api.ApiError, match="needs a cfg_id"):
        snnet.predict(loaded.net, x)


def test_a_checkpoint_without_names_or_with_another_head_labels_nothing():
    assert recorded_class_names({"class_names": NAMES}, 3) == NAMES
    assert recorded_class_names({"class_names": NAMES}, 5) is None  # 3 names for a 5-class head: none, not wrong ones
    assert recorded_class_names({}, 3) is None and recorded_class_names({"class_names": "cat"}, None) is None
    answers = labelled(torch.tensor([[0.0, 2.0, 1.0]]), None, top_k=2)
    assert answers == [{"class": 1, "label": None, "top_k": [[1, 0.665241], [2, 0.244728]],
                        "top_k_labels": [None, None]}]


def test_api_evaluate_writes_the_folders_names_beside_its_results(named_ckpt, tmp_path):
    net = snnet.load(named_ckpt / "last.pth.tar", named_ckpt / "cfg.json")
    out = tmp_path / "res" / "stitches_res.txt"
    snnet.evaluate(net, _folder(tmp_path / "val"), cfg_ids=[0], out=out)
    assert read_class_names(out) == NAMES


def test_api_evaluate_refuses_a_folder_of_other_classes(named_ckpt, tmp_path):
    """A folder missing one of the trained classes numbers the rest one lower (timm counts the folders it finds),
    and more classes than outputs index past the classifier: both refused, naming the classes, before any image is
    scored against the wrong label."""
    net = snnet.load(named_ckpt / "last.pth.tar", named_ckpt / "cfg.json")
    with pytest.raises(snnet.api.ApiError, match=r"has classes \['cat', 'zebra'\], the network was trained on "
                                                 r"\['cat', 'dog', 'zebra'\] \('dog' in only one of them\)"):
        snnet.evaluate(net, _folder(tmp_path / "two", ["cat", "zebra"]), cfg_ids=[0])
    with pytest.raises(snnet.api.ApiError, match="has 4 classes but the network has 3 outputs"):
        snnet.evaluate(net, _folder(tmp_path / "four", [*NAMES, "yak"]), cfg_ids=[0])


@pytest.mark.slow  # ~6-10 s: one SN-Net trained for an epoch on 12 images and every stitch evaluated
def test_train_py_records_the_folders_names(tiny_config, tmp_path):
    """train.py on an ImageFolder: the folder names go into the checkpoint's recorded arguments (JSON text, read
    back without pickles) and beside its stitches_res.txt."""
    import sys

    from helpers import FAST, run

    from snnet.utils.checkpoint import json_field, load_checkpoint
    _folder(tmp_path / "data" / "train")
    _folder(tmp_path / "data" / "val")
    done = run([sys.executable, "train.py", str(tmp_path / "data"), "--stitch_config", str(tiny_config), *FAST,
                "--epochs", "1", "-b", "4", "--output", str(tmp_path / "out"), "--experiment", "named"])
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "out" / "named"
    assert json_field(load_checkpoint(folder / "last.pth.tar"), "args")["class_names"] == NAMES
    assert read_class_names(folder / "stitches_res.txt") == NAMES
