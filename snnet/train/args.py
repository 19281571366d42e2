"""Command line of train.py: timm train.py's flag names and meanings, plus the SN-Net flags.

Precedence, lowest first: built-in defaults < ``-c`` YAML < ``--stitch_config`` JSON < flags on the command line
(SN-Net let its JSON override the command line; here what the user typed wins). One mechanism, timm's two-stage
parse: a pre-parser finds the two files, their values become ``parser.set_defaults`` (YAML first, then the stitch
config over it), and the command line is parsed last. File values pass the same type and choice checks as typed ones.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from snnet.data.options import DATA_ROOT
from snnet.stitching.config import ARG_DESTS, ConfigError, StitchConfig, load_stitch_config
from snnet.train.options import FLAG_OPTIONS, JobOptions
from snnet.utils.errors import OneLineParser, SNNetError, UsageError, one_line
from snnet.utils.fileio import data_folder
from snnet.utils.options import FILES, GROUPS, KwargsAction, add_options


class _HelpFormatter(argparse.HelpFormatter):
    """Every help line ends with the flag's default, as with timm's '(default: ...)'. None and False mean 'not set';
    for those the help text says what happens instead. Run with -c/--stitch_config, --help shows their values."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)r)"


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser, derived from the option declarations (`snnet.train.options.FLAG_OPTIONS`): each option's
    flag spellings, default, help, type and rule, choices and nargs are its field's."""
    p = OneLineParser(prog="train.py", raises=True, allow_abbrev=False, formatter_class=_HelpFormatter,
                      description="Train and evaluate stitchable neural networks (SN-Net) over timm models, with timm "
                      "train.py's flags. Precedence: defaults < -c YAML < --stitch_config < typed flags.")
    add_options(p, FLAG_OPTIONS, groups=GROUPS, negatable=True)  # --amp / --no-amp: a card's switch can be undone
    return p


def parse_args(argv: Sequence[str] | None = None, fit: bool = True) -> tuple[argparse.Namespace, StitchConfig | None]:
    """train.py's arguments and stitch config, by timm's two-stage parse: a pre-parser reads -c and --stitch_config;
    the YAML's keys, then the stitch config's fields become parser defaults (each replacing the last); the command
    line is parsed last, so what is typed wins. `fit`: fit the defaults that would misfit the run (`_fit_short_run`,
    which imports torch; without it the parse imports neither torch nor timm)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = OneLineParser(add_help=False, allow_abbrev=False, raises=True)
    add_options(pre, [JobOptions], only_group=FILES)  # -c and --stitch_config, read first
    files, _ = pre.parse_known_args(argv)
    origin: dict[str, str] = {}  # dest -> the file that set its default (the last one wins, as in set_defaults)
    if files.config:
        source = f"-c/--config {files.config!r}"
        defaults = _checked_defaults(parser, source, "key", _yaml_entries(files.config))
        parser.set_defaults(**defaults)
        origin.update(dict.fromkeys(defaults, source))
    stitch_path = files.stitch_config or parser.get_default("stitch_config")  # a YAML may name the stitch config
    stitch_cfg = load_stitch_config(stitch_path) if stitch_path else None
    if stitch_cfg is not None:
        source = f"stitch config {stitch_path!r}"
        defaults = _checked_defaults(parser, source, "field", _stitch_entries(stitch_cfg))
        parser.set_defaults(**defaults)
        origin.update(dict.fromkeys(defaults, source))
    args = parser.parse_args(argv)
    typed = typed_dests(argv)
    _ORIGIN.clear()
    _ORIGIN.update({dest: source for dest, source in origin.items() if dest not in typed})
    if stitch_cfg is None and args.model is None:
        raise UsageError("give --stitch_config FILE (an SN-Net) or --model NAME (one plain timm model)")
    if stitch_cfg is not None and args.model:
        raise UsageError(f"--model {args.model!r} and --stitch_config are exclusive: the config names the anchors")
    if args.snnet_compat and args.ls_mode is None:  # SN-Net's init unless a mode was chosen
        args.ls_mode = "snnet"
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UsageError("no dataset: give the dataset folder as the first argument (e.g. train.py /data/imagenet)")
    if fit:
        _fit_short_run(args, typed, origin)
    return args, stitch_cfg


def refused_before_torch(argv: Sequence[str]) -> int:
    """Where train.py and its launcher start: the command line, its files (-c, --stitch_config) and a folder
    dataset's root checked before torch and timm are imported (seconds), so that a typo is refused at once, in one
    line; its exit code (0: go on to the run's own checks). A dry run resolves a run for any machine: its data folder
    is not checked."""
    try:
        args, _ = parse_args(argv, fit=False)
        if not args.dry_run and not args.dataset:
            data_folder(args.data_dir, "data folder", DATA_ROOT)
    except SNNetError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    return 0


#: the lines saying which defaults the last parse fitted to the run (`fitted_notes`)
_FITTED: list[str] = []
#: dest -> the file whose value the last parse kept for it (the command line did not type it): `set_by`
_ORIGIN: dict[str, str] = {}


def set_by(dest: str) -> str:
    """Where the last `parse_args` took option `dest`'s value from: the file that set it (e.g. "stitch config
    'configs/deit3_s_l_v2.json'"), else "the command line" (typed, or the built-in default)."""
    return _ORIGIN.get(dest, "the command line")


def fitted_notes() -> list[str]:
    """The lines saying which defaults the last `parse_args` fitted to the run: logged once the run's inputs passed
    their checks (a refused run prints its one line and nothing else)."""
    return list(_FITTED)


def typed_dests(argv: Sequence[str]) -> set[str]:
    """The options `argv` types (their dests), as train.py's parser reads it, every spelling included (-j4,
    --workers=4): `argv` parsed by the parser with each default suppressed, so only what was typed is set."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    typed, _ = parser.parse_known_args(list(argv))
    return set(vars(typed))


def _fit_short_run(args: argparse.Namespace, typed: set[str], origin: dict[str, str]) -> None:
    """Defaults that would misfit this run, fitted: a warm-up not shorter than the run
    (`snnet.train.optim.fit_warmup`), more loader workers than cores (`snnet.data.loaders.default_workers`); each
    with one line (`fitted_notes`) naming where the fitted value came from (`origin`: dest -> file; else timm's
    default)."""
    # imported here: parsing alone (snnet --help) imports neither timm nor torch
    from snnet.data.loaders import TIMM_WORKERS, default_workers
    from snnet.train.optim import fit_warmup
    notes = []
    args.warmup_epochs, note = fit_warmup(args.warmup_epochs, args.epochs, "warmup_epochs" in typed,
                                          origin.get("warmup_epochs", "timm's default"))
    notes.append(note)
    if "workers" not in typed and args.workers == TIMM_WORKERS:  # timm's (a config's other number is its choice)
        args.workers, note = default_workers()
        notes.append(note)
    _FITTED[:] = [n for n in notes if n]


#: SN-Net's untagged teacher name meant DeiT's RegNetY-16GF (timm's default tag for it is now another checkpoint)
_SNNET_TEACHER = {"regnety_160": "regnety_160.deit_in1k"}


def _stitch_entries(cfg: StitchConfig) -> list[tuple[str, str, Any]]:
    """(field, dest, value) for the stitch config's fields that are flags (config.FIELDS' dest column), then its
    "recipe" entries (flag names); a flag set by both is refused, so a recipe card reads one way."""
    entries = []
    for name, value in cfg.values.items():
        if name not in ARG_DESTS:
            continue
        if name == "data_set" and value.upper() == "IMNET":  # SN-Net's ImageNet loader = timm's folder dataset ''
            value = ""
        if name == "teacher_model":  # docs/snnet_compat.md, C19
            value = _SNNET_TEACHER.get(value, value)
        entries.append((name, ARG_DESTS[name], value))
    if "lr" in cfg.values:  # SN-Net's lr is per 512 images of global batch, scaled linearly (docs/snnet_compat.md, C16)
        entries += [("lr", "lr_base_size", 512), ("lr", "lr_base_scale", "linear")]
    fields = {dest: name for name, dest, _ in entries}
    for key, value in (cfg.get("recipe") or {}).items():
        dest = str(key).replace("-", "_")
        if dest in fields:
            raise UsageError(f"stitch config {cfg.path!r}: recipe entry {key!r} sets what field {fields[dest]!r} "
                              f"already sets; keep one of them")
        entries.append((f"recipe.{key}", dest, value))
    return entries


#: parser dests that a file cannot set: -c names the YAML itself and is not followed from inside one
_NOT_FILE_KEYS = {"help", "config"}


def _checked_defaults(parser: argparse.ArgumentParser, source: str, noun: str,
                      entries: Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """{dest: value} for parser.set_defaults from a file's (key, dest, value) triples. set_defaults skips type= and
    choices=, so each value is checked here as strictly as if it had been typed."""
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FILE_KEYS}
    out = {}
    for key, dest, value in entries:
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"{source}: unknown {noun} {key!r}; keys are train.py flag names")
        try:
            out[dest] = _coerce(action, value)
        except argparse.ArgumentTypeError as e:
            flag = "/".join(action.option_strings) or action.metavar
            raise UsageError(f"{source}: {noun} {key!r}: {e} (as for {flag}); fix the value in the file") from None
    return out


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A file's value for `action`, converted and checked like the typed flag (nargs, type, choices)."""
    if value is None and action.default is None:  # null = 'not set', valid where that is the built-in default
        return None
    if action.nargs == 0:  # store_true: a YAML 1 or 'yes' string would be a typo, not a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"{value!r} is not true or false")
        return value
    if isinstance(action, KwargsAction):
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise argparse.ArgumentTypeError(f"{value!r} is not a mapping of argument names to values, e.g. "
                                             f"{{depth: 6}}")
        return dict(value)
    if action.nargs in (None, "?"):
        return _coerce_one(action, value)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{value!r} is not a list; write a list, e.g. [{value!r}]")
    n = action.nargs
    if (n == "+" and not value) or (isinstance(n, int) and len(value) != n):
        raise argparse.ArgumentTypeError(f"{value!r} has {len(value)} item(s); give {'at least 1' if n == '+' else n}")
    return [_coerce_one(action, v) for v in value]


def _coerce_one(action: argparse.Action, value: Any) -> Any:
    if value is None:
        raise argparse.ArgumentTypeError("null is not allowed here; give a value or delete the entry")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a single {'number' if action.type else 'value'}")
    # through the text form, so that a file's 2.5 for an integer flag fails exactly as a typed 2.5 does
    convert: Any = action.type or str  # argparse types it as a str or a callable
    v = convert(str(value))
    if action.choices is not None and v not in action.choices:
        raise argparse.ArgumentTypeError(f"{v!r} is not one of {', '.join(map(repr, action.choices))}")
    return v


def unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; keep one",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return Loader


def _yaml_entries(path: str) -> list[tuple[str, str, Any]]:
    """(key, dest, value) of a -c YAML file: keys are flag names, with - or _ (batch-size or batch_size)."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"-c/--config {path!r} does not exist; give an existing YAML file")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"-c/--config {path!r} is not valid YAML ({' '.join(str(e).split())[:200]}); fix the "
                         f"file") from None
    if not isinstance(data, dict):
        raise UsageError(f"-c/--config {path!r} must hold a mapping of flag names to values")
    return [(str(k), str(k).replace("-", "_"), v) for k, v in data.items()]


__all__ = ["build_parser", "parse_args", "typed_dests", "UsageError", "ConfigError"]
