"""The Python API: an SN-Net from a stitch config, its least-squares init, every stitch evaluated, the stitch for a
budget, one stitch exported (docs/python_api.md). Each function is a thin front over the library function that
train.py and the `snnet` command use, so a number from here is the number they give:

==========================  ===========================================================================
`create_snnet`              snnet.stitching.build.build_snnet (image size from the config's ``input_size``)
`ls_init_from_images`       snnet.stitching.ls_init.ls_init (``ls_mode`` from the config)
`evaluate`                  snnet.train.evaluator.evaluate_stitches + snnet.results.records (stitches_res.txt)
`stitch_for`                snnet.results.select.stitch_for (the rule of ``snnet select``)
`load`                      snnet.deploy.export.load_snnet (an SN-Net from a training checkpoint)
`export`                    snnet.deploy.export.export_stitch (``snnet export``)
`predict`                   snnet.deploy.export.labelled (class index, its name, top-k)
==========================  ===========================================================================

Switching stitches needs no function: ``net(x, cfg_id)`` runs stitch `cfg_id` on the same weights.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, resolve_data_config

from snnet.data.datasets import class_names_of
from snnet.data.loaders import StrictImages
from snnet.data.ls_images import clean_images
from snnet.data.transforms import eval_transform
from snnet.deploy.export import export_stitch, labelled, load_exported, load_snnet
from snnet.results.records import stitch_record, write_class_names, write_results
from snnet.results.select import model_img_size, stitch_for
from snnet.stitching.build import build_snnet
from snnet.stitching.config import AnchorSpec, StitchConfig, load_stitch_config, parse_stitch_config
from snnet.stitching.cost import cost_table
from snnet.stitching.ls_init import FitReport, ls_init
from snnet.stitching.model import SNNet
from snnet.train.evaluator import evaluate_stitches
from snnet.utils.errors import SNNetError

__all__ = ["create_snnet", "ls_init_from_images", "evaluate", "stitch_for", "load", "export", "predict",
           "data_config"]


class ApiError(SNNetError):
    """An argument of the Python API that cannot be used; the message names the value and the fix."""


def _config(config: str | os.PathLike | dict | StitchConfig) -> StitchConfig:
    if isinstance(config, StitchConfig):
        return config
    if isinstance(config, dict):
        return parse_stitch_config(config, "stitch config (dict)")
    if isinstance(config, (str, os.PathLike)):
        return load_stitch_config(Path(config))
    raise ApiError(f"config {config!r} is not a stitch config; pass a JSON file path, a dict or a StitchConfig")


def create_snnet(config: str | os.PathLike | dict | StitchConfig, pretrained: bool = True,
                 img_size: int | None = None, num_classes: int | None = None, **model_kwargs: Any) -> SNNet:
    """The SN-Net of a stitch config, not yet least-squares initialised (`ls_init_from_images`).

    `pretrained`: timm's pretrained weights, or each anchor's ``checkpoint`` when the config names one; False builds
    random anchors, reading no weights at all (seed first: they take torch's global RNG). `img_size`: default the
    config's ``input_size`` (the demo configs record 16), else the anchors' timm default. Other keyword arguments go
    to every anchor's ``timm.create_model`` (as train.py's ``--model-kwargs``)."""
    cfg = _config(config)
    if not pretrained:  # random anchors: neither timm's weights nor the config's checkpoint files
        cfg = StitchConfig([AnchorSpec(a.name, None, a.model_kwargs, a.label) for a in cfg.anchors], dict(cfg.values),
                           cfg.path)
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    return build_snnet(cfg, pretrained=pretrained, num_classes=num_classes, **model_kwargs)


def data_config(net: SNNet) -> dict[str, Any]:
    """The evaluation preprocessing train.py uses for `net` (timm's resolve_data_config on the SN-Net, at the image
    size its anchors were built for): input_size, interpolation, mean, std, crop_pct."""
    return resolve_data_config({"img_size": model_img_size(net)[0]}, model=net)


def _dataset(data: str | os.PathLike | torch.utils.data.Dataset, net: SNNet) -> torch.utils.data.Dataset:
    if not isinstance(data, (str, os.PathLike)):
        return data
    root = Path(data)
    if not root.is_dir():
        raise ApiError(f"image folder {str(root)!r} does not exist; pass a folder of class subfolders (e.g. "
                       f"output/demo/digits/val)")
    try:
        return create_dataset("", root=str(root), is_training=False, transform=eval_transform(data_config(net)))
    except RuntimeError as e:  # timm's reader: no image in any class folder
        raise ApiError(f"image folder {str(root)!r} holds no images timm reads ({e}); pass a folder of class "
                       f"subfolders (e.g. output/demo/digits/val)") from None


def _same_classes(dataset: torch.utils.data.Dataset, net: SNNet, data: Any) -> None:
    """Refuses data whose class indices would not mean the network's classes: more classes than its classifier
    has outputs, or other class names than it was trained on (a folder missing one class numbers the rest one
    lower, and every prediction would be scored against the wrong label)."""
    names, outputs = class_names_of(dataset), getattr(net.anchors[-1], "num_classes", None)
    trained = getattr(net, "class_names", None)
    if names is not None and outputs is not None and len(names) > outputs:
        raise ApiError(f"{str(data)!r} has {len(names)} classes but the network has {outputs} outputs; evaluate on "
                       f"data of the classes it was trained on")
    if names is not None and trained is not None and names != trained:
        other = sorted(set(names) ^ set(trained))
        diff = f"{', '.join(map(repr, other[:3]))} in only one of them" if other else "another order"
        raise ApiError(f"{str(data)!r} has classes {names[:4]}{'...' if len(names) > 4 else ''}, the network "
                       f"was trained on {trained[:4]}{'...' if len(trained) > 4 else ''} ({diff}); a class index "
                       f"would name another class: evaluate on a folder of the same classes")


def _checked(images: Any, net: torch.nn.Module) -> torch.Tensor:
    """`images` when they are a float (N, C, H, W) tensor of the SN-Net's channels, else an ApiError saying what came
    and the fix."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        got = f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else \
            f"a {type(images).__name__}"
        one = isinstance(images, torch.Tensor) and images.ndim == 3
        raise ApiError(f"images must be a float tensor (N, C, H, W), preprocessed as snnet.data_config(net) says; got "
                       f"{got}{' (one image: add the batch dimension, images.unsqueeze(0))' if one else ''}")
    if isinstance(net, SNNet):
        want = tuple(data_config(net)["input_size"])
        if images.shape[1] != want[0]:
            raise ApiError(f"images of shape {tuple(images.shape)} have {images.shape[1]} channel(s), this SN-Net's "
                           f"input {want[0]} (its input_size {want}); preprocess them as snnet.data_config(net) says")
    return images


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int, net: SNNet) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return list(_checked(images, net).split(batch_size))
    return (_checked(batch, net) for batch in images)


def ls_init_from_images(net: SNNet, images: torch.Tensor | Iterable[torch.Tensor] | str | os.PathLike,
                        mode: str | None = None, count: int | None = None, batch_size: int = 50,
                        seed: int = 0) -> list[FitReport]:
    """Least-squares init of every stitching layer of `net` from clean images; returns one report per layer.

    `images`: a tensor (N, C, H, W) preprocessed as for evaluation, an iterable of such batches, or an image folder
    (``count`` images drawn with `seed`, default the config's ``stitch_init_bs``, read with `data_config`). `mode`:
    joint, average or snnet; default the config's ``ls_mode`` (joint)."""
    cfg = getattr(net, "stitch_config", None)
    mode = mode or (cfg.get("ls_mode") if cfg is not None else "joint")
    batches: Iterable[torch.Tensor]
    if isinstance(images, (str, os.PathLike)):  # drawn as train.py's LS init draws them
        count = count or (cfg.get("stitch_init_bs") if cfg is not None else 100)
        batches = clean_images(_dataset(images, net), data_config(net), count, seed, batch_size=batch_size)
    else:
        batches = _batches(images, batch_size, net)
    try:
        return ls_init(net, batches, mode=mode)
    except ValueError as e:
        raise ApiError(f"{e}") from None


def evaluate(net: SNNet, data: str | os.PathLike | torch.utils.data.Dataset, cfg_ids: Sequence[int] | None = None,
             batch_size: int = 100, out: str | os.PathLike | None = None,
             device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Every stitch of `net` (or `cfg_ids`) on `data` in one pass: the records train.py writes (cfg_id, flops,
    params, acc1, acc5, loss, route, samples, img_size), in cfg_id order. `data`: an image folder (read with
    `data_config`) or a dataset of (image tensor, label). With `out`, the records are also written to that file
    (stitches_res.txt: atomically; `snnet pareto` and `snnet select` read it), and the folder's class names beside
    it (stitches_res.classes.json)."""
    if isinstance(data, torch.Tensor):
        raise ApiError("evaluate needs labels: pass an image folder (class sub-folders) or a dataset of (image, "
                       "label); for a tensor of images, snnet.predict gives each one's class")
    if batch_size < 1:
        raise ApiError(f"batch_size {batch_size} is not a positive number of images; pass e.g. 100")
    device = torch.device(device)
    dataset = _dataset(data, net)
    _same_classes(dataset, net, data)
    # train.py's strict reading: an unreadable image is an error naming it, never replaced by another one
    loader = torch.utils.data.DataLoader(StrictImages(dataset), batch_size=batch_size, shuffle=False)
    ids = list(range(net.num_configs)) if cfg_ids is None else [net.check_cfg_id(c) for c in cfg_ids]
    size = model_img_size(net)
    net.to(device)
    metrics = evaluate_stitches(net, loader, ids, device)
    table = cost_table(net, size)
    records = [stitch_record(net, c, m, table.route_flops(net.routes[c]), size) for c, m in metrics.items()]
    if out is not None:
        write_results(out, records)
        write_class_names(out, class_names_of(dataset))
    return records


def load(checkpoint: str | os.PathLike, stitch_config: str | os.PathLike | None = None,
         img_size: int | None = None, num_classes: int | None = None) -> SNNet:
    """The SN-Net of a training checkpoint (train.py's ``last.pth.tar``), in eval mode: built from `stitch_config`
    (default: the config the checkpoint recorded), weights loaded strictly; image size and classes as trained, and
    ``net.class_names`` the training data's class names (None where the data named none)."""
    return load_snnet(checkpoint, stitch_config, img_size, num_classes).net


def export(checkpoint: str | os.PathLike, cfg_id: int, out: str | os.PathLike,
           stitch_config: str | os.PathLike | None = None, img_size: int | None = None,
           formats: Sequence[str] = ("torchscript", "onnx")) -> dict[str, Any]:
    """Stitch `cfg_id` of a training checkpoint as a standalone network in folder `out` (``snnet export``:
    model.safetensors, model.json and `formats`, each checked against the SN-Net's logits before anything is moved
    into `out`). Returns model.json's content; ``snnet.deploy.export.load_exported(out)`` loads it."""
    return export_stitch(load_snnet(checkpoint, stitch_config, img_size), cfg_id, out, formats)


def predict(net: torch.nn.Module | str | os.PathLike, images: torch.Tensor, cfg_id: int | None = None,
            top_k: int = 5) -> list[dict[str, Any]]:
    """What `net` predicts for each image of `images` (N, C, H, W, preprocessed as `data_config` says): one dict per
    image, ``{"class": index, "label": its name, "top_k": [[index, probability], ...], "top_k_labels": [...]}``
    (``label`` None where the training data named no classes). `net`: an SN-Net (`load`; then `cfg_id` picks the
    stitch), an exported stitch, or an export folder (``snnet export``'s). `images` go to the network's device and
    float type; anything but a float (N, C, H, W) tensor of the SN-Net's channels is an ApiError saying why."""
    if top_k < 1:
        raise ApiError(f"top_k {top_k} gives no classes; pass 1 or more (e.g. 5)")
    if isinstance(net, (str, os.PathLike)):
        net = load_exported(net)
    _checked(images, net)
    if isinstance(net, SNNet):
        if cfg_id is None:
            raise ApiError(f"predict needs a cfg_id for an SN-Net of {net.num_configs} stitches; pick one with "
                           f"snnet.stitch_for(net, records, ...) or pass an export folder")
        run = lambda x: net(x, net.check_cfg_id(cfg_id))  # noqa: E731
    else:
        run = net
    weight = next(net.parameters(), None)  # the network's device and float type
    with torch.no_grad():
        logits = run(images if weight is None else images.to(weight.device, weight.dtype))
    return labelled(logits, getattr(net, "class_names", None), top_k)
