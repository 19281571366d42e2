"""Export one stitch of a trained SN-Net as a standalone network, and load it back with one call.

The standalone network (`StitchedNetwork`) holds, for each anchor the route uses, a copy of that anchor with every
submodule no executed unit touches removed (unused blocks become ``nn.Identity``, unused stray parameters such as
the end anchor's ``cls_token`` become None), plus the route's stitching layers; it replays the route's steps. Its
parameter count therefore equals ``SNNet.params(cfg_id)``, which counts exactly the modules the route executes
(``Unit.modules``); `export_stitch` refuses to write anything otherwise.

An export folder holds:

    model.safetensors      the weights (safetensors, no pickle)
    model.json             how to rebuild: anchors (timm name, kwargs, the module names kept), stitching layers,
                           the route's steps, num_classes, image size, data config, FLOPs, params, provenance and
                           the logit differences measured at export time
    model.torchscript.pt   torch.jit.trace of the network (fixed image size, any batch)
    model.onnx             ONNX (TorchScript-based exporter, opset 17), input "images" (dynamic batch), output
                           "logits"; checked in onnxruntime against the SN-Net when onnxruntime is installed

    net = snnet.deploy.export.load_exported("DIR")   # nn.Module in eval mode; net(images) -> logits
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from snnet.results.records import file_sha256
from snnet.stitching.adapter import Unit, adapter_for
from snnet.stitching.build import build_snnet, create_anchor
from snnet.stitching.config import (
    AnchorSpec,
    ConfigError,
    StitchConfig,
    check_same_network,
    load_stitch_config,
    recorded_stitch_config,
)
from snnet.stitching.cost import cost_table
from snnet.stitching.layers import stitch_layer_from_spec
from snnet.stitching.model import SNNet
from snnet.stitching.steps import StitchStep, UnitStep, as_step, stitch_step, unit_step
from snnet.utils.checkpoint import (
    CheckpointError,
    StateDictMismatch,
    json_field,
    load_checkpoint,
    tensor_bytes,
)
from snnet.utils.errors import SNNetError
from snnet.utils.fileio import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_SPEC,
    EXPORT_WEIGHTS,
    FolderLock,
    disk_full_error,
    export_out,
    export_spec,
    give_default_mode,
    is_disk_full,
    lock_holder,
)
from snnet.utils.progress import Progress

FORMAT, FORMAT_VERSION = EXPORT_FORMAT, EXPORT_FORMAT_VERSION
SPEC, WEIGHTS, TORCHSCRIPT, ONNX = EXPORT_SPEC, EXPORT_WEIGHTS, "model.torchscript.pt", "model.onnx"
ONNX_OPSET = 17


class ExportError(SNNetError):
    """An export that cannot be made or loaded; the message names the value and the fix."""


# ------------------------------------------------------------------------------------------- SN-Net from a checkpoint
@dataclass
class Loaded:
    """An SN-Net rebuilt from a training checkpoint, with what it was built from."""
    net: SNNet
    anchors: list[AnchorSpec]
    checkpoint: str
    stitch_config: str | None
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int | None
    create_kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs given to every anchor
    data_config: dict[str, Any] = field(default_factory=dict)
    epoch: Any = None
    class_names: list[str] | None = None  # the training data's name of each class index, where it named them


def _config_from_checkpoint(state: dict, checkpoint: str) -> StitchConfig:
    """The stitch config a checkpoint recorded (train.py stores anchors and config fields as JSON text)."""
    try:
        cfg = recorded_stitch_config(state, repr(checkpoint))
    except ConfigError as e:
        raise ExportError(f"{e}; pass --stitch_config FILE") from None
    if cfg is None:
        raise ExportError(f"checkpoint {checkpoint!r} records no stitch config; pass --stitch_config FILE (the "
                          f"config it was trained with)")
    return cfg


def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    *_, h, w = (int(s) for s in size)
    return h, w


def load_snnet(checkpoint: str | os.PathLike, stitch_config: str | os.PathLike | None = None,
               img_size: int | None = None, num_classes: int | None = None) -> Loaded:
    """The SN-Net of a training checkpoint: anchors built from the config with ``pretrained=False`` (their own
    checkpoint files are not read: the SN-Net checkpoint's weights replace everything), state dict loaded strictly.

    num_classes, image size and timm kwargs come from the checkpoint's recorded arguments unless given.
    """
    checkpoint = str(checkpoint)
    state = load_checkpoint(checkpoint)
    args = json_field(state, "args") or {}
    ident = json_field(state, "config") or {}
    args = args if isinstance(args, dict) else {}
    ident = ident if isinstance(ident, dict) else {}
    cfg = load_stitch_config(stitch_config) if stitch_config else _config_from_checkpoint(state, checkpoint)
    if stitch_config:  # a config that builds another network than the trained one is refused, not exported
        check_same_network(cfg, state, checkpoint, str(stitch_config),
                           "pass the config it was trained with, or none (the recorded one is used)")
    loaded_from = str(stitch_config) if stitch_config else "recorded in the checkpoint"
    cfg = cfg.with_model_kwargs(dict(args.get("model_kwargs") or {}))  # as train.py built them
    cfg.anchors = [AnchorSpec(a.name, None, a.model_kwargs, a.label) for a in cfg.anchors]
    classes = num_classes or args.get("num_classes") or ident.get("num_classes") or cfg.get("num_classes")
    # what the anchors were created with in train.py; a checkpoint without recorded arguments (a bare state dict):
    # the config's input_size, as build_snnet builds it, so the export's rebuild and preprocessing use it too
    build_size = img_size or args.get("img_size") or cfg.get("input_size")
    kwargs: dict[str, Any] = {}
    if build_size:
        kwargs["img_size"] = build_size
    if args.get("in_chans"):
        kwargs["in_chans"] = args["in_chans"]
    net = build_snnet(cfg, pretrained=False, num_classes=classes, **kwargs)
    # split-BN's auxiliary BatchNorms only run on augmented training halves; eval uses the main ones
    sd = {k: v for k, v in state["state_dict"].items() if ".aux_bn." not in k}
    try:
        net.load_checkpoint_state(sd)
    except StateDictMismatch as e:
        used = f"config {loaded_from!r}, img_size {build_size or 'timm default'}, num_classes {classes}"
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit this SN-Net ({e}; this build: {used}); "
                              f"--stitch_config, --img-size and --num-classes override") from None
    net.eval()
    size = _pair(build_size) or _pair(ident.get("input_size")) or _pair(cfg.get("input_size")) or \
        _pair(net.pretrained_cfg.get("input_size")) or (224, 224)
    in_chans = int(kwargs.get("in_chans") or (ident.get("input_size") or [3])[0])
    data_config = _data_config(args, net)
    if img_size or not (args.get("img_size") or args.get("input_size")):  # the size built, not timm's default
        data_config["input_size"] = [in_chans, *size]
    create_kwargs = {k: v for k, v in {**kwargs, "num_classes": classes}.items() if v is not None}
    names = recorded_class_names(args, classes)
    net.class_names = names  # snnet.load's SN-Net names its classes too
    return Loaded(net, cfg.anchors, checkpoint, str(stitch_config) if stitch_config else None, size, in_chans, classes,
                  create_kwargs, data_config, state.get("epoch"), names)


def recorded_class_names(args: dict, num_classes: int | None) -> list[str] | None:
    """The class names train.py recorded from the training data (folder names, ClassLabel names, _info.json's
    classes), when they fit the network's classifier (not when --num-classes overrode the head); else None."""
    names = args.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names if num_classes is None or len(names) == num_classes else None


def labelled(logits: torch.Tensor, class_names: Sequence[str] | None = None, top_k: int = 5) -> list[dict[str, Any]]:
    """Per image of `logits` (N, classes): the predicted class index, its name (``label``: None where the data named
    no classes) and the top-k as [index, probability] pairs with their names (``top_k_labels``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, min(int(top_k), probs.shape[-1]), dim=-1)
    name = (lambda i: class_names[i] if class_names is not None and i < len(class_names) else None)
    out = []
    for p, idx in zip(top.values.tolist(), top.indices.tolist()):
        out.append({"class": idx[0], "label": name(idx[0]), "top_k": [[i, round(q, 6)] for i, q in zip(idx, p)],
                    "top_k_labels": [name(i) for i in idx]})
    return out


def _data_config(args: dict, net: SNNet) -> dict[str, Any]:
    """The eval preprocessing train.py used: timm's resolve_data_config over the recorded arguments."""
    try:
        cfg = resolve_data_config(dict(args), model=net)
    except Exception:  # arguments of another shape (hand-made checkpoints): the model's own defaults
        cfg = resolve_data_config({}, model=net)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def check_cfg_id(net: SNNet, cfg_id: int, source: str) -> int:
    if isinstance(cfg_id, bool) or not isinstance(cfg_id, int) or not 0 <= cfg_id < net.num_configs:
        raise ExportError(f"cfg_id {cfg_id!r} is not in {source!r}: its SN-Net has cfg_ids 0..{net.num_configs - 1}; "
                          f"pick one from its stitches_res.txt (snnet select / snnet pareto)")
    return cfg_id


# ------------------------------------------------------------------------------------------- the standalone network
def _under(name: str, keep: Sequence[str]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep)


def _holds(name: str, keep: Sequence[str]) -> bool:
    """Something kept lives inside module `name`."""
    return any(k.startswith(name + ".") for k in keep)


def prune_anchor(model: nn.Module, keep: Sequence[str], prefix: str = "") -> nn.Module:
    """Remove, in place, every parameter of `model` outside the submodule/parameter names `keep`.

    Unused submodules become ``nn.Identity`` (so indices such as ``blocks.5`` still address the same block, and
    units looking modules up by name keep working); unused parameters of kept modules become None.
    """
    for pname, p in list(model._parameters.items()):
        if p is not None and not _under(prefix + pname, keep):
            model._parameters[pname] = None
    for cname, child in list(model._modules.items()):
        full = prefix + cname
        if child is None or _under(full, keep):
            continue
        if _holds(full, keep):
            prune_anchor(child, keep, full + ".")
        elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            setattr(model, cname, nn.Identity())
    return model


def _layer_key(address: Sequence[int]) -> str:
    return "_".join(str(i) for i in address)


class StitchedNetwork(nn.Module):
    """One route of an SN-Net as a plain network: pruned anchor copies + the route's stitching layers.

    ``steps`` are the SN-Net's route steps with stitching-layer addresses turned into keys of ``stitch_layers``:
    `UnitStep`s and `StitchStep`s (`snnet.stitching.steps`; plain tuples ``("unit", anchor, unit_index)`` or
    ``("stitch", "1_2")`` as read from a file are taken too).
    """

    def __init__(self, anchors: dict[int, nn.Module], units: dict[int, list[Unit]],
                 stitch_layers: dict[str, nn.Module], steps: Sequence[tuple]):
        super().__init__()
        self.anchors = nn.ModuleDict({str(a): m for a, m in sorted(anchors.items())})
        self.stitch_layers = nn.ModuleDict(stitch_layers)
        self.units = units  # plain data: units own no modules, they call the anchor's
        self.steps = tuple(as_step(s) for s in steps)
        self.class_names: list[str] | None = None  # load_exported sets model.json's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            if isinstance(step, UnitStep):
                x = self.units[step.anchor][step.unit].run(self.anchors[str(step.anchor)], x)
            else:
                x = self.stitch_layers[step.address](x)
        return x


def _kept_modules(net: SNNet, steps: Sequence[tuple], anchor: int) -> list[str]:
    keep: list[str] = []
    for s in steps:
        if isinstance(s, UnitStep) and s.anchor == anchor:
            keep += [m for m in net.units[anchor][s.unit].modules if m not in keep]
    return keep


def _standalone_layer(layer: nn.Module) -> nn.Module:
    """A copy of a stitching layer for export; a type with ``merged()`` (e.g. ``lora``) exports its equivalent plain
    layer (one linear map), so the export folder holds, and rebuilds, that type."""
    return layer.merged() if callable(getattr(layer, "merged", None)) else copy.deepcopy(layer)


def stitched_network(net: SNNet, cfg_id: int) -> tuple[StitchedNetwork, dict[int, list[str]]]:
    """The standalone network of route `cfg_id` (copies; the SN-Net is untouched; stitching layers with ``merged()``
    merged) and the names kept per anchor."""
    steps = net.routes[net.check_cfg_id(cfg_id)]
    used = sorted({s.anchor for s in steps if isinstance(s, UnitStep)})
    keep = {a: _kept_modules(net, steps, a) for a in used}
    anchors = {a: prune_anchor(copy.deepcopy(net.anchors[a]), keep[a]) for a in used}
    for s in steps:  # "per_stitch": the route's BatchNorm statistics become the copies' own
        if isinstance(s, UnitStep) and s.stats is not None and net.bn_stats is not None:
            model = anchors[s.anchor]
            for name, _, mean, var in net.bn_stats.of(net, s):
                bn = model.get_submodule(name)
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    layers = {_layer_key(s.address): _standalone_layer(net.stitch_layer(s.address)) for s in steps
              if isinstance(s, StitchStep)}
    local = [unit_step(s.anchor, s.unit) if isinstance(s, UnitStep) else stitch_step(_layer_key(s.address))
             for s in steps]
    return StitchedNetwork(anchors, {a: net.units[a] for a in used}, layers, local).eval(), keep


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- spec and loading
def _spec(loaded: Loaded, cfg_id: int, module: StitchedNetwork, keep: dict[int, list[str]]) -> dict[str, Any]:
    net = loaded.net
    anchors = [{"index": a, "label": net.names[a], "name": loaded.anchors[a].name,
                "model_kwargs": dict(loaded.anchors[a].model_kwargs), "keep": names,
                "units": [u.name for u in net.units[a]]} for a, names in keep.items()]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "cfg_id": cfg_id, "route": net.describe(cfg_id),
        "params": count_params(module), "num_classes": loaded.num_classes, "class_names": loaded.class_names,
        "img_size": list(loaded.img_size),
        "in_chans": loaded.in_chans, "create_kwargs": loaded.create_kwargs, "anchors": anchors,
        "stitch_layers": {k: v.spec() for k, v in module.stitch_layers.items()},
        "steps": [list(s) for s in module.steps], "data_config": loaded.data_config,
        "source": {"checkpoint": loaded.checkpoint, "stitch_config": loaded.stitch_config, "epoch": loaded.epoch},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def load_exported(path: str | os.PathLike) -> StitchedNetwork:
    """Rebuild an exported stitch from its folder (model.json + model.safetensors); returns it in eval mode, its
    ``class_names`` attribute the training data's class names (model.json's; None where the data named none)."""
    spec = export_spec(path, ExportError)
    spec_file, weights = Path(path) / SPEC, Path(path) / WEIGHTS
    anchors, units = {}, {}
    for a in spec["anchors"]:
        model = create_anchor(AnchorSpec(a["name"], None, a["model_kwargs"]), pretrained=False,
                              **spec["create_kwargs"])
        units[a["index"]] = adapter_for(model, a["name"]).units(model)
        if [u.name for u in units[a["index"]]] != a["units"]:
            raise ExportError(f"{str(spec_file)!r}: anchor {a['label']!r} now cuts into other units than at export "
                              f"time (timm or snnet changed); export again with the installed versions")
        anchors[a["index"]] = prune_anchor(model, a["keep"])
    layers = {k: stitch_layer_from_spec(v) for k, v in spec["stitch_layers"].items()}
    net = StitchedNetwork(anchors, units, layers, spec["steps"])
    names = spec.get("class_names")
    net.class_names = names if isinstance(names, list) else None
    try:
        safetensors.torch.load_model(net, str(weights), strict=True)
    except Exception as e:  # missing/unexpected keys or shapes: the files do not belong together
        raise ExportError(f"{str(weights)!r} does not fit {str(spec_file)!r} ({str(e).splitlines()[0][:200]}); "
                          f"export again") from None
    return net.eval()


# ------------------------------------------------------------------------------------------- exporting
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _example(loaded: Loaded, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)  # fixed inputs: reruns report the same differences
    return torch.randn(batch, loaded.in_chans, *loaded.img_size, generator=g)


def _check(what: str, diff: float, ref: torch.Tensor, fix: str) -> None:
    # float32 reassociation (fused kernels, ONNX Runtime's graph optimisations) moves logits by ~1e-6 relative
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    if not diff <= tol:
        raise ExportError(f"the {what} differs from the SN-Net by {diff:.3g} (tolerance {tol:.3g}); {fix}")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str
    what: str  # in messages, e.g. "TorchScript network"
    fix: str   # what to do when its logits differ
    write: Callable[..., Callable[[torch.Tensor], torch.Tensor] | None]


_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, filename: str, what: str, fix: str):
    """Decorator: ``write(module, example, path, **options)`` writes the network to `path` (traced with `example`)
    and returns a callable giving its logits (checked against the SN-Net), or None when that cannot be run here."""
    def add(write):
        _FORMATS[name] = ExportFormat(name, filename, what, fix, write)
        return write
    return add


def export_formats() -> list[str]:
    return list(_FORMATS)


@register_export_format("torchscript", TORCHSCRIPT, "TorchScript network", "pass --no-torchscript")
def _save_torchscript(module: nn.Module, x: torch.Tensor, path: Path, **options) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values are expected for timm models
        traced = torch.jit.trace(module, x, check_trace=False)
        torch.jit.save(traced, str(path))  # torch.jit is deprecated in favour of torch.export, still supported
        return torch.jit.load(str(path))


def onnx_opsets() -> tuple[int, int]:
    """The opsets the installed torch's TorchScript-based ONNX exporter (the one used here) supports, inclusive.

    torch keeps the range in `torch.onnx._constants`: ONNX_MIN_OPSET and ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET (older
    torch: ONNX_MAX_OPSET). Below the minimum it writes a file of that opset with only a warning, above the maximum
    it warns or fails; so a value outside is refused before any work. Without those constants: 7..ONNX_OPSET.
    """
    try:
        from torch.onnx import _constants as c  # private, and not in every torch: read only when asked
        return int(c.ONNX_MIN_OPSET), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):
        return 7, ONNX_OPSET


def check_opset(opset: Any) -> int:
    """`opset` if the ONNX exporter supports it, else an ExportError naming the supported range and the fix."""
    lo, hi = onnx_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ExportError(f"--opset {opset!r} is not supported by the TorchScript ONNX exporter of torch "
                          f"{torch.__version__} (opsets {lo}..{hi}); pass --opset {min(max(ONNX_OPSET, lo), hi)} "
                          f"(the default) or --no-onnx")
    return opset


@register_export_format("onnx", ONNX, "ONNX network (onnxruntime)", "pass --no-onnx or another --opset")
def _save_onnx(module: nn.Module, x: torch.Tensor, path: Path, opset: int = ONNX_OPSET, **options):
    # the TorchScript-based exporter: no onnxscript needed, and ~20x faster than the dynamo one on small models
    try:
        import onnx  # noqa: F401  (the exporter serialises through it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install -r requirements.txt (or pass "
                          "--no-onnx)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    try:
        import onnxruntime as ort  # optional: without it the export is written, its check is skipped
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda t: torch.from_numpy(session.run(None, {"images": t.numpy()})[0])


def _write_formats(module: nn.Module, loaded: Loaded, formats: Sequence[str], folder: Path, x: torch.Tensor,
                   ref: torch.Tensor, diffs: dict, options: dict, progress: Progress | None = None) -> dict[str, str]:
    """Write each requested format into `folder`, checking its logits on `x` against the SN-Net's `ref`; `progress`
    advances by one step per format."""
    files = {"weights": WEIGHTS}
    for name in formats:
        if name not in _FORMATS:
            raise ExportError(f"export format {name!r} is not known; use one of {', '.join(export_formats())}")
        fmt = _FORMATS[name]
        files[name] = fmt.filename
        run = fmt.write(module, _example(loaded, 2), folder / fmt.filename, **options)
        diffs[name] = None if run is None else _max_diff(run(x), ref)
        if run is not None:
            _check(fmt.what, diffs[name], ref, fmt.fix)
        if progress is not None:
            progress.advance(extra=f"{name} written" + ("" if run is None else f" and checked ({diffs[name]:.2g})"))
    return files


def _publish(tmp: Path, out_dir: Path, files: dict[str, str]) -> None:
    """Move the checked files into `out_dir`; stale files of other formats go; the spec comes last, so a folder
    with a spec is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt in _FORMATS.values():
        if fmt.filename not in files.values() and (out_dir / fmt.filename).exists():
            (out_dir / fmt.filename).unlink()
    for name in [*files.values(), SPEC]:
        give_default_mode(tmp / name)  # safetensors' writer leaves 0600 where the other files get the umask's mode
        os.replace(tmp / name, out_dir / name)


@torch.no_grad()
def export_stitch(loaded: Loaded, cfg_id: int, out_dir: str | os.PathLike,
                  formats: Sequence[str] = ("torchscript", "onnx"), opset: int = ONNX_OPSET) -> dict[str, Any]:
    """Write stitch `cfg_id` of `loaded` to `out_dir` (see the module docstring); returns the written spec.

    Everything is built and checked in a temporary folder next to `out_dir` first (parameter count, logits of the
    module, of the reloaded export and of every format vs. the SN-Net on a batch of 3); files are moved into
    `out_dir` only when every check passed, so a failed export leaves no partial output.
    """

    if "onnx" in formats:
        check_opset(opset)
    # what the export writes there, and the other formats' files it removes: another program's files are kept
    export_out(out_dir, (SPEC, WEIGHTS, *(f.filename for f in _FORMATS.values())), ExportError)
    net = loaded.net.eval()
    cfg_id = check_cfg_id(net, cfg_id, loaded.checkpoint)
    module, keep = stitched_network(net, cfg_id)
    steps = net.routes[cfg_id]
    merged = {i: module.stitch_layers[_layer_key(s.address)] for i, s in enumerate(steps)
              if isinstance(s, StitchStep) and callable(getattr(net.stitch_layer(s.address), "merged", None))}
    # merged stitching layers hold fewer parameters than the SN-Net's (W + s·B·A instead of W, A, B)
    expected = net.params(cfg_id) - sum(count_params(net.stitch_layer(steps[i][1])) - count_params(m)
                                        for i, m in merged.items())
    if count_params(module) != expected:
        raise ExportError(f"the pruned network of cfg_id {cfg_id} has {count_params(module)} parameters but the "
                          f"route executes {expected}; a unit's `modules` list is incomplete (adapter bug)")
    spec = _spec(loaded, cfg_id, module, keep)
    # the cost model counts a layer with merged() as its merged linear map: the FLOPs of this export
    spec["flops"] = cost_table(net, loaded.img_size, loaded.in_chans).route_flops(steps)
    spec["source"]["checkpoint_sha256"] = file_sha256(loaded.checkpoint)
    x = _example(loaded, 3)
    ref = net(x, cfg_id)
    # one line per check: pruned network, weights, each format, the reloaded export
    progress = Progress(f"Export cfg_id {cfg_id}: step", 3 + len(formats), every=1, unit=None)
    pruned = _max_diff(module(x), ref)
    diffs: dict[str, float | None] = {"module": pruned}
    _check("pruned network", pruned, ref, "a unit runs a module it does not list (adapter bug)")
    progress.advance(extra=f"pruned network checked ({diffs['module']:.2g})")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=str(out_dir.parent)))
    lock = FolderLock(tmp)  # a live export's folder: the next export leaves it alone, a killed one's it removes
    try:
        lock.acquire()
        _build_export(module, loaded, formats, tmp, x, ref, diffs, opset, spec, progress)
        _publish(tmp, out_dir, spec["files"])
    except BaseException as e:
        if is_disk_full(e, tmp):
            written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file() and f.name != FolderLock.NAME)
            # the weights at least (each format holds them once more)
            raise disk_full_error(out_dir.parent, f"the export of cfg_id {cfg_id}", written,
                                  tensor_bytes(module.state_dict())) from None
        raise
    finally:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
    return spec


#: a temporary export folder without a lock file younger than this may be one whose export is taking its lock
_YOUNG_S = 60.0


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary folders that killed exports into `out_dir` left beside it (no live process holds
    their lock); returns them."""
    gone = []
    for d in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.tmp"):
        if not d.is_dir() or lock_holder(d) is not None:
            continue
        if not (d / FolderLock.NAME).exists() and time.time() - d.stat().st_mtime < _YOUNG_S:
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _build_export(module: nn.Module, loaded: Loaded, formats: Sequence[str], tmp: Path, x: torch.Tensor,
                  ref: torch.Tensor, diffs: dict[str, float | None], opset: int, spec: dict[str, Any],
                  progress: Progress) -> None:
    """Every file of the export written and checked in `tmp`."""
    safetensors.torch.save_model(module, str(tmp / WEIGHTS), metadata={"format": "pt", "snnet": FORMAT})
    progress.advance(extra="weights written")
    spec["files"] = _write_formats(module, loaded, formats, tmp, x, ref, diffs, {"opset": opset}, progress)
    spec["max_abs_diff_vs_snnet"] = diffs
    (tmp / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    diffs["reloaded"] = reloaded = _max_diff(load_exported(tmp)(x), ref)
    _check("reloaded export", reloaded, ref, "report this bug")
    progress.advance(extra=f"reloaded export checked ({diffs['reloaded']:.2g})")
    (tmp / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
