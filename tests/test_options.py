"""Typed options instead of train.py's namespace: each option declared once (its field holds its flag), train.py's
parser derived from the declarations, train.py builds the options from its resolved arguments, and no
library module below the entry points takes an argparse namespace."""
from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snnet.data.options import LoaderOptions
from snnet.train.args import build_parser
from snnet.train.options import NetworkOptions, TrainOptions

ROOT = Path(__file__).resolve().parents[1]
#: the entry points and train.py's argument parser and its resolution: the only modules that may take a namespace
EDGE = {"snnet/cli.py", "snnet/demo.py", "snnet/train/args.py"}
#: functions below the entry points allowed to take a namespace: none (train.py's program passes the typed RunOptions
#: down, and what a run records, args.yaml and checkpoints, is a read-only mapping)
EDGE_FUNCTIONS: dict[str, set[str]] = {}


def _is_namespace(node: ast.AST | None) -> bool:
    if node is None:
        return False
    text = ast.unparse(node)
    return "Namespace" in text


def namespace_takers(path: Path) -> list[str]:
    """Functions (and dataclass fields) of a module whose parameter, return or field annotation is a namespace."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                      *filter(None, [node.args.vararg, node.args.kwarg])]
            if any(_is_namespace(a.annotation) for a in params) or _is_namespace(node.returns):
                found.append(f"{node.name} (line {node.lineno})")
        elif isinstance(node, ast.AnnAssign) and _is_namespace(node.annotation):
            found.append(f"{ast.unparse(node.target)} (line {node.lineno})")
    return found


def test_no_library_module_takes_a_namespace():
    takers = {}
    for path in sorted((ROOT / "snnet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = EDGE_FUNCTIONS.get(rel, set())
        found = [f for f in namespace_takers(path) if f.split()[0] not in allowed]
        if found and rel not in EDGE:
            takers[rel] = found
    assert not takers, f"modules below the entry points take an argparse namespace; take typed options: {takers}"
    for rel, names in EDGE_FUNCTIONS.items():  # the allowance names functions that exist and take one
        taking = {f.split()[0] for f in namespace_takers(ROOT / rel)}
        assert names <= taking, f"{rel}: no longer take a namespace, drop from EDGE_FUNCTIONS: {names - taking}"


def test_train_help_is_printed_without_importing_torch_or_timm():
    """`train.py --help` is what a newcomer types first: its parser alone, in a fraction of a second, not after the
    seconds torch and timm take to import; a --stitch_config's values show in it as before."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--stitch_config", "configs/deit_ti_s_b.json",
                        "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--stitch_config" in r.stdout and "stitch_deit_ti_s_b" in r.stdout, r.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert imported and not imported & {"torch", "timm"}, sorted(imported)
    # through the launcher too: the help, not a launch (PYTHONPROFILEIMPORTTIME: the launcher's and train.py's)
    r = subprocess.run(["./distributed_train.sh", "8", "/data", "--stitch_config", "configs/deit_ti_s_b.json",
                        "--help"], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0 and "stitch_deit_ti_s_b" in r.stdout, r.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "snnet.train" in imported and not imported & {"torch", "timm"}, sorted(imported)


@pytest.mark.slow  # fresh interpreters
def test_a_mistyped_data_folder_or_config_is_refused_before_torch_is_imported(tmp_path):
    """train.py and its launcher refuse a data folder that is not there (or a file), a stitch config that is not
    there and a bad flag value in one line, before torch and timm are imported (seconds); a dry run, resolved for
    any machine, does not look for its data folder."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    cfg = "configs/deit_ti_s_b.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    for argv, words in [([tmp_path / "nope", "--stitch_config", cfg], f"data folder '{tmp_path / 'nope'}' does "
                         "not exist; give the dataset root"),
                        (["README.md", "--stitch_config", cfg], "data folder 'README.md' is a file, not a folder"),
                        ([tmp_path, "--stitch_config", tmp_path / "none.json"], "stitch config"),
                        ([tmp_path, "--stitch_config", cfg, "--lr", "abc"], "argument --lr: 'abc' is not a number")]:
        for launch in ([sys.executable, "train.py"], ["./distributed_train.sh", "2"]):
            r = subprocess.run([*launch, *map(str, argv)], cwd=root, capture_output=True, text=True, timeout=120,
                               env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
            said = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
            imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
            assert r.returncode == 2 and len(said) == 1 and words in said[0], (launch, argv, said)
            assert "snnet.train.args" in imported and not imported & {"torch", "timm"}, (launch, argv)
    from snnet.train.args import refused_before_torch
    assert refused_before_torch([str(tmp_path / "nope"), "--stitch_config", cfg, "--dry-run"]) == 0


@pytest.mark.slow
def test_the_training_path_does_not_climb_back_to_the_entry_layer():
    """train.py's path is a straight line, parse -> resolve -> check -> build -> fit. benchmarks/trace_rooms.py runs
    a one-epoch demo run up to its fit under a profile hook and lists every call into main.py or args.py made from a
    lower module: none (the walk's own call of main, from whatever ran the walk, is the path's start, not a
    climb)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("trace_rooms", ROOT / "benchmarks" / "trace_rooms.py")
    assert spec is not None and spec.loader is not None
    trace_rooms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_rooms)
    rooms, climbs = trace_rooms.demo_walk()
    for reached in ("snnet/train/preflight.py", "snnet/train/network.py", "snnet/train/sampler.py"):
        assert reached in rooms, f"the walk did not reach {reached}"  # it went through the checks and the build
    assert climbs == [], f"lower modules call back up into the entry layer: {climbs}"


def test_the_scan_finds_a_namespace(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import argparse\nfrom dataclasses import dataclass\n"
                   "def f(a: int, args: argparse.Namespace) -> None: ...\n"
                   "def g(x) -> argparse.Namespace: ...\n"
                   "@dataclass\nclass P:\n    args: argparse.Namespace\n"
                   "def h(data: 'DataOptions') -> None: ...\n")
    assert [s.split()[0] for s in namespace_takers(src)] == ["f", "g", "args"]


def test_an_option_is_declared_once():
    """The parser is derived from the declarations: an option two classes declare separately is refused (declare
    it once and share it with `shared`), and a shared one is one flag."""
    from snnet.utils.options import MODEL, flag_fields, option, shared
    SIZE = option(3, "--size", group=MODEL, help="a size")

    @dataclasses.dataclass(frozen=True)
    class A:
        size: int = SIZE

    @dataclasses.dataclass(frozen=True)
    class B:
        size: int = shared(SIZE)

    @dataclasses.dataclass(frozen=True)
    class C:
        size: int = option(3, "--size", group=MODEL, help="a size")

    assert [f.name for _, f, _ in flag_fields([A, B])] == ["size"] and B().size == 3
    with pytest.raises(TypeError, match="'size' is declared in A and again in C"):
        list(flag_fields([A, C]))


def _option_calls(path: Path) -> Iterator[ast.Call]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option":
            yield node


def test_each_default_is_written_once():
    """grep finds each option's default in one place: every train.py flag is one option() declaration in the modules
    that declare train.py's options, snnet/stitching/config.py's `ConfigFlags` (the flags a stitch config sets) included
    (the `snnet` commands' own options, in snnet/cli.py, are checked below)."""
    import sys

    from snnet.stitching.config import ConfigFlags
    from snnet.train.options import FLAG_OPTIONS
    modules = sorted({Path(str(sys.modules[cls.__module__].__file__)) for cls in [*FLAG_OPTIONS, ConfigFlags]})
    declared: dict[str, list[str]] = {}
    for path in modules:
        for node in _option_calls(path):
            names = [a.value for a in node.args[1:] if isinstance(a, ast.Constant)]
            declared.setdefault(names[0] if names else "DIR", []).append(path.relative_to(ROOT).as_posix())
    twice = {k: v for k, v in declared.items() if len(v) > 1}
    assert not twice, f"options declared more than once: {twice}"
    flags = {a.option_strings[0] if a.option_strings else "DIR" for a in build_parser()._actions} - {"-h"}
    assert flags == set(declared)


def test_a_snnet_commands_option_is_declared_once():
    """Two commands' options that say the same (flag, help) are one declaration, copied with shared()."""
    seen: dict[tuple[str, str], int] = {}
    for node in _option_calls(ROOT / "snnet" / "cli.py"):
        names = tuple(a.value for a in node.args[1:] if isinstance(a, ast.Constant))
        text = ast.unparse(next((k.value for k in node.keywords if k.arg == "help"), ast.Constant("")))
        key = (names[0] if names else "positional", text)
        assert key not in seen, f"{key[0]} is declared on lines {seen[key]} and {node.lineno}; declare it once"
        seen[key] = node.lineno


def test_every_snnet_commands_flag_has_help():
    """`snnet CMD --help` explains every flag: an empty help string leaves a user guessing at its default."""
    import argparse

    from snnet.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [(name, a.option_strings[0]) for name, sub in commands.items() for a in sub._actions
            if a.option_strings and not (a.help or "").strip()]
    assert bare == []
    assert "the CNN anchors' deep stages, 2 3" in " ".join(commands["quickstart"].format_help().split())


def test_the_parser_and_options_by_key_refuse_by_the_same_rule():
    """One rule per option: train.py's parser and a keyword caller (stitch-train's sweep) refuse the same value."""
    from snnet.train.options import OptionError, options_by_key
    from snnet.utils.errors import UsageError
    for flag, key, value, message in (("--drop", "drop", "1.5", "1.5 is not a probability in [0, 1]"),
                                      ("-b", "batch_size", "0", "0 is not >= 1"),
                                      ("--dist-bn", "dist_bn", "sync", "'sync'.*'', 'reduce', 'broadcast'")):
        with pytest.raises(UsageError, match=message.replace(" [", r" \[").replace("1]", r"1\]")):
            build_parser().parse_args(["folder", flag, value])
        typed = float(value) if key == "drop" else int(value) if key == "batch_size" else value
        with pytest.raises(OptionError, match=message.replace(" [", r" \[").replace("1]", r"1\]")):
            options_by_key([NetworkOptions, TrainOptions, LoaderOptions], {key: typed}, "x")


def test_run_options_read_the_flags_and_refuse_unknown_fields():
    """train.py's arguments become its typed options once (`RunOptions.from_values`, as main does); `replaced` sets
    an option in every section that has it and refuses a name no section has."""
    from snnet.train.options import RunOptions
    args = build_parser().parse_args(["folder", "-b", "7", "--scale", "0.5", "1.0", "--workers", "0"])
    args.data_dir = "folder"
    options = RunOptions.from_values(vars(args))
    loader = options.loader
    assert (loader.batch_size, loader.scale, loader.workers) == (7, (0.5, 1.0), 0)
    assert options.replaced(seed=3).data.seed == 3 and options.replaced(seed=3).train.seed == 3
    assert loader.with_batch_size(64).batch_size == 64 and loader.batch_size == 7
    with pytest.raises(TypeError, match="no option"):
        options.replaced(nonsense=1)


@pytest.mark.parametrize("flag,value,message", [
    ("--warmup-epochs", "-2", "argument --warmup-epochs: -2 is not >= 0"),
    ("--aug-splits", "-1", "argument --aug-splits: -1 is not >= 0"),
    ("--distillation-tau", "-3", "argument --distillation-tau: -3 is not > 0"),
    ("--crop-pct", "0", "argument --crop-pct: 0 is not in (0, 1]"),
    ("--aug-repeats", "2.5", "argument --aug-repeats: 2.5 is not a whole number >= 0"),
    ("--train-interpolation", "cubic", "argument --train-interpolation: 'cubic' is not one of 'nearest'"),
    ("--eval-metric", "top2", "argument --eval-metric: 'top2' is not a metric of the validation panel"),
    ("--save-predictions", "anchors;9", "argument --save-predictions: 'anchors;9' is not anchors, all, none or"),
    ("--val-stitches", "-1", "argument --val-stitches: -1 is not >= 0"),
])
def test_a_single_value_is_refused_by_its_fields_rule_at_parse_time(flag, value, message):
    """A check of one option's value is the rule or choices of its field, so the parser refuses it (and
    a -c YAML, a stitch config or stitch-train's `train` mapping by the same rule), in one line."""
    from snnet.train.args import parse_args
    from snnet.train.options import FLAG_OPTIONS
    from snnet.utils.errors import UsageError
    from snnet.utils.options import OptionError, options_by_key
    with pytest.raises(UsageError) as e:
        parse_args(["folder", "--model", "resnet18", flag, value])
    assert message in str(e.value) and "\n" not in str(e.value)
    key = flag.lstrip("-").replace("-", "_")
    typed = (value if key in ("train_interpolation", "eval_metric", "save_predictions") else
             (int(value),) if key == "val_stitches" else float(value))
    with pytest.raises(OptionError, match=f"key '{key}'"):
        options_by_key([c for c in FLAG_OPTIONS if key in {f.name for f in dataclasses.fields(c)}], {key: typed},
                       "the sweep's train", data_dir="folder")


def test_what_was_typed_comes_from_the_parser():
    """Whether an option was typed is the parser's answer, every spelling included, not a match on argv's text."""
    from snnet.train.args import typed_dests
    assert typed_dests(["folder", "-j4", "--warmup-epochs=3", "--model", "m"]) == {"data", "workers", "warmup_epochs",
                                                                                  "model"}
    assert typed_dests(["folder", "--workers", "2", "--dr", "0.5"]) == {"data", "workers", "decay_rate"}
    assert typed_dests([]) == set()


def test_the_learning_rates_are_resolved_in_one_place():
    """The global batch and the LRs come from one function (`optim.resolve_lrs`), which `resolve` calls once for the
    options the preflight, --dry-run and the trainer read; no other module multiplies the batch by the
    world size."""
    from snnet.train.args import parse_args
    from snnet.train.optim import resolve_lrs
    from snnet.train.options import RunOptions

    def lrs(*flags: str, world_size: int = 4):
        return resolve_lrs(RunOptions.from_values(vars(parse_args(["folder", "--model", "resnet18", *flags])[0])),
                           world_size)
    assert lrs("-b", "32", "--grad-accum-steps", "2", "--lr-base", "0.1") == (256, 0.1, 1e-5, 0.0)
    assert lrs("-b", "64", "--lr-base", "0.1") == pytest.approx((256, 0.1, 1e-5, 0.0))
    assert lrs("-b", "128", "--lr-base", "0.1", "--opt", "adamw")[1] == pytest.approx(0.1 * 2 ** 0.5)  # sqrt rule
    assert lrs("-b", "128", "--lr", "0.3", "--scale-warmup-min-lr").lr == 0.3  # an absolute --lr is not scaled
    scaled = lrs("-b", "128", "--lr-base", "0.1", "--min-lr", "1e-6", "--scale-warmup-min-lr")
    assert scaled == pytest.approx((512, 0.2, 2e-5, 2e-6))
    multiplying = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "snnet").rglob("*.py"))
                   if "* world_size" in p.read_text() or "world_size *" in p.read_text()]
    assert multiplying == ["snnet/train/optim.py"]


def test_what_options_say_together_is_checked_once_in_the_preflight():
    """Parsing checks each value by its field's rule; what several options say together is one function
    over the typed options (`preflight.check_combinations`), which the launcher's check, train.py and --dry-run
    call first."""
    from snnet.train.args import parse_args
    from snnet.train.options import RunOptions
    from snnet.train.preflight import check_combinations
    from snnet.utils.errors import UsageError

    def options(*flags: str) -> RunOptions:
        return RunOptions.from_values(vars(parse_args(["folder", "--model", "resnet18", *flags])[0]))
    check_combinations(options("--split-bn", "--resplit", "--epochs", "3", "--start-epoch", "2"))
    for flags, message in ((("--split-bn",), "--split-bn needs --aug-splits > 1 or --resplit"),
                           (("--epochs", "2", "--start-epoch", "2"), "leaves no epoch to train of --epochs 2"),
                           (("--distillation-type", "soft"), "needs --teacher NAME"),
                           (("--freeze-anchors",), "leaves nothing to train")):
        typed = options(*flags)  # parsing takes each value alone
        with pytest.raises(UsageError, match=message):
            check_combinations(typed)


def test_add_options_derives_a_commands_parser():
    """A `snnet` command's options: a positional, a required flag, a help group, its own value parser, a repeated
    flag and values that add up, a tuple default (the parser's list); `add_options` is the one derivation."""
    import argparse

    from snnet.utils.options import add_options, option

    def even(text: str) -> int:
        if int(text) % 2:
            raise argparse.ArgumentTypeError(f"{text!r} is not even")
        return int(text)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Command:
        src: str = option(dataclasses.MISSING, metavar="SRC", help="the input")
        out: str = option(dataclasses.MISSING, "--out", required=True, metavar="DIR", help="the output")
        size: int = option(2, "--size", parse=even, group="Sizes", help="an even size")
        batch: tuple[int, ...] | None = option(None, "--batch", parse=int, action="append", group="Sizes", help="b")
        pair: tuple[str, ...] = option((), "--pair", nargs="+", action="extend", help="pairs")
        depths: tuple[int, ...] = option((4, 4), "--depths", parse=int, nargs=2, help="depths")
        fast: bool = option(False, "--fast", help="go fast")

    p = argparse.ArgumentParser(prog="cmd", exit_on_error=False)
    add_options(p, [Command])
    got = vars(p.parse_args(["a", "--out", "o", "--size", "4", "--batch", "1", "--batch", "3", "--pair", "x",
                             "--pair", "y", "z", "--fast"]))
    assert got == {"src": "a", "out": "o", "size": 4, "batch": [1, 3], "pair": ["x", "y", "z"], "depths": [4, 4],
                   "fast": True}
    assert vars(p.parse_args(["a", "--out", "o"]))["depths"] == [4, 4]
    assert "Sizes:" in p.format_help()
    with pytest.raises(argparse.ArgumentError, match="'3' is not even"):
        p.parse_args(["a", "--out", "o", "--size", "3"])
    with pytest.raises(ValueError, match="positional"):
        option(None, help="a positional", required=True)


def test_train_pys_parser_is_derived_by_add_options():
    """train.py's parser (`snnet.train.args.build_parser`) is `add_options` over FLAG_OPTIONS, in GROUPS' order: the
    help groups in that order, the values typed, and the refusals it gave when it had its own derivation (the
    messages below were that derivation's, word for word)."""
    from snnet.utils.errors import UsageError
    from snnet.utils.options import GROUPS

    parser = build_parser()
    titles = [g.title for g in parser._action_groups if g.title in GROUPS]
    assert titles == list(GROUPS)
    good = ["data", "--model", "m", "--lr", "0.1", "--model-kwargs", "a=1", "b=x", "--model-kwargs", "c=[1]",
            "--val-stitches", "all", "3", "--opt-betas", "0.9", "0.99", "--scale", "0.5", "1", "--torchcompile"]
    got = vars(parser.parse_args(good))
    assert (got["lr"], got["model_kwargs"], got["val_stitches"], got["opt_betas"], got["scale"], got["torchcompile"]) \
        == (0.1, {"a": 1, "b": "x", "c": [1]}, ["all", 3], [0.9, 0.99], [0.5, 1.0], "inductor")
    refusals = {("--lr", "nan"): "argument --lr: 'nan' is not a finite number",
                ("--epochs", "x"): "argument --epochs: 'x' is not an integer",
                ("--val-stitches", "-1"): "argument --val-stitches: -1 is not >= 0",
                ("--interpolation", "cubic"): "argument --interpolation: 'cubic' is not one of '', 'nearest', "
                                              "'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'",
                ("--model-kwargs", "depth"): "--model-kwargs 'depth': write key=value, e.g. depth=6",
                ("--std", "0"): "argument --std: 0 is not > 0",
                ("--stitch_config",): "argument --stitch_config/--stitch-config: expected one argument"}
    for bad, message in refusals.items():
        with pytest.raises(UsageError) as refused:
            parser.parse_args(list(bad))
        assert str(refused.value) == message, bad


def test_add_argument_is_written_only_where_a_parser_is_derived():
    """Every parser in snnet/ (train.py's, every `snnet` command's, the demo's) is derived from option()
    dataclasses; an argument is added to a parser only by the one derivation, snnet.utils.options.add_options."""
    derivations = {"snnet/utils/options.py"}
    found = {}
    for path in sorted((ROOT / "snnet").rglob("*.py")):
        n = path.read_text().count(".add_argument(")
        if n:
            found[path.relative_to(ROOT).as_posix()] = n
    assert set(found) <= derivations, f"add_argument outside the derivation of parsers: {found}; declare the " \
                                      f"option as an option() field and derive the parser (add_options)"


def test_quickstarts_flags_make_its_options():
    """`snnet quickstart`'s flags (snnet.cli.QuickstartCommand: snnet.quickstart imports torch, which `snnet --help`
    must not) are QuickstartOptions' fields with their defaults, so the parsed values make the typed options."""
    from snnet.cli import QuickstartCommand
    from snnet.quickstart import QuickstartOptions

    def defaults(cls: type) -> dict[str, object]:
        return {f.name: f.default for f in dataclasses.fields(cls)}
    assert defaults(QuickstartCommand) == defaults(QuickstartOptions)


def test_a_stitch_config_field_that_sets_a_flag_points_at_its_declaration():
    """A stitch config's field that sets a train.py flag (lr, epochs, input_size, ...) is not typed again:
    its type, rule, choices and meaning are the flag's one declaration (`snnet.stitching.config.ConfigFlags`), the same
    declaration train.py's option objects copy, so the config and the parser cannot disagree."""
    from snnet.stitching.config import ARG_DESTS, CONFIG_FLAGS, FIELDS
    from snnet.train.options import FLAG_OPTIONS
    from snnet.utils.options import flag_fields, flag_of

    train = {f.name: flag for _, f, flag in flag_fields(FLAG_OPTIONS)}
    assert set(ARG_DESTS.values()) == set(CONFIG_FLAGS)
    for name, dest in ARG_DESTS.items():
        field = FIELDS[name]
        assert field.flag is flag_of(CONFIG_FLAGS[dest]) is train[dest], name
        assert field.meaning == train[dest].help, name
    assert FIELDS["lr"].types == (int, float) and FIELDS["input_size"].types == (int,)
    assert (FIELDS["ls_mode"].default, FIELDS["stitch_init_bs"].default, FIELDS["batch_size"].default) == \
        ("joint", 100, None)  # the config's own fallback where it has one; else the flag's default applies
