"""Options declared once: each option is a dataclass field whose metadata holds its flag (spellings, help, group,
value rule, choices, nargs). From these fields train.py's parser is derived (`snnet.train.args.build_parser`) and
every `snnet` subcommand's (`add_options`, the one place an argument is added to a parser for the library), the
typed option objects are the dataclasses themselves, `options_by_key` checks a keyword value by the same rule, and
the docs' option reference is generated from them. A field several option objects share (the batch size the loader,
the data checks and the loop all read) is declared once, as a module constant, and copied with `shared`.

The rules are plain functions of a value; `add_options` wraps them as the parser's type functions."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, dataclass
from typing import Any

from snnet.utils.errors import UsageError

__all__ = ["AUGMENT", "BATCH_NORM", "DATASET", "DEVICE", "EMA", "FILES", "MODEL", "OPTIMIZER", "OUTPUT", "SCHEDULE",
           "STITCHING", "GROUPS", "Flag", "KwargsAction", "OptionError", "add_options", "checked_name",
           "checked_number", "checked_stitch_id", "checked_value", "flag_fields", "flag_of", "option", "options_by_key",
           "rule_violation", "shared"]

#: train.py's help groups, in --help order (each option names its group)
GROUPS = ("Configuration files", "Dataset", "Model", "Stitching", "Optimizer", "Learning rate schedule",
          "Augmentation and regularization", "Model exponential moving average", "Batch norm",
          "Device, precision, distributed", "Output and logging")
FILES, DATASET, MODEL, STITCHING, OPTIMIZER, SCHEDULE, AUGMENT, EMA, BATCH_NORM, DEVICE, OUTPUT = GROUPS
#: value rules: "positive" (>= 1 for an integer, > 0 for a number), "non_negative", "probability" (in [0, 1]),
#: "fraction" (in (0, 1]: a part of something, never none of it), "count" (a whole number >= 0, in a float field);
#: for a name: "interpolation" (a resize interpolation timm's transforms know, '' for the model's) and
#: "train_interpolation" (one of them or 'random'). A name's rule, unlike choices, leaves the parser's surface (and
#: --help) as timm's: its flag takes any text and the rule refuses what is not one of them. For a text of a form:
#: "metric" (a validation-panel metric) and "stitches" (a set of stitches by name or cfg_id)
RULES = ("positive", "non_negative", "probability", "fraction", "count", "interpolation", "train_interpolation",
         "metric", "stitches")
#: resize interpolations timm's transforms know
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_NAMES = {"interpolation": ("", *INTERPOLATIONS), "train_interpolation": (*INTERPOLATIONS, "random")}
#: rule -> (the form a text must have, what it is)
_FORMS = {"metric": (r"top1|top5|loss|top1@\d+", "a metric of the validation panel; use top1, top5, loss (means "
                                                  "over the panel) or top1@<cfg_id> (one stitch of the panel)"),
          "stitches": (r"none|all|(anchors|\d+)(,(anchors|\d+))*", "anchors, all, none or comma-separated cfg_ids "
                                                                  "(e.g. anchors,9)")}


@dataclass(frozen=True)
class Flag:
    """How an option is typed on a command line (train.py's or a `snnet` subcommand's)."""
    names: tuple[str, ...]          # option strings, timm's spellings first; () for a positional (the field's name)
    help: str                       # "": none
    group: str                      # train.py's: one of GROUPS; a subcommand's: a help group's title, "" for none
    rule: str | None = None         # one of RULES
    choices: tuple[Any, ...] | None = None
    nargs: int | str | None = None  # as argparse's (a tuple field needs one)
    const: Any = None               # the value of a bare flag whose value is optional (nargs "?")
    metavar: str | None = None
    kind: str | None = None         # the parser of a value where the annotation does not say it: "float",
    #                                 "stitch_id" (a cfg_id or 'all'), "kwargs" (k=v pairs)
    required: bool = False          # a flag that must be typed (a positional always is, unless its nargs says not)
    parse: Callable[[str], Any] | None = None  # the parser's type function of a value whose form neither the
    #                                 annotation nor a rule says (a budget with a K/M/G suffix, key=value)
    action: str | None = None       # "append" (the flag repeated) or "extend" (its values added up)

    def __post_init__(self) -> None:
        if not self.names and (self.required or self.action is not None):
            raise ValueError(f"flag {self.help!r}: a positional (no names) has neither required nor an action; "
                             f"its nargs says whether it may be left out")
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"flag {self.names}: rule {self.rule!r} is not one of {RULES}")


def option(default: Any = MISSING, *names: str, help: str, group: str = "", rule: str | None = None,
           choices: tuple[Any, ...] | None = None, nargs: int | str | None = None, const: Any = None,
           metavar: str | None = None, kind: str | None = None, required: bool = False,
           parse: Callable[[str], Any] | None = None, action: str | None = None) -> Any:
    """A dataclass field declaring an option: its default and its flag. A dict default is a fresh copy per
    instance; MISSING: a field every caller gives (the flag's own default is then None). No names: a positional
    argument, named by the field."""
    flag = Flag(tuple(names), help, group, rule, choices, nargs, const, metavar, kind, required, parse, action)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"flag": flag})
    return dataclasses.field(default=default, metadata={"flag": flag})


def shared(declared: Any) -> Any:
    """The same option (default and flag) for a second option object: `batch_size: int = shared(BATCH_SIZE)`."""
    if not isinstance(declared, dataclasses.Field):
        raise TypeError(f"shared() takes a field made by option(), not {declared!r}")
    return dataclasses.field(default=declared.default, default_factory=declared.default_factory,
                             metadata=declared.metadata)


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def flag_fields(classes: Iterable[type]) -> Iterator[tuple[type, dataclasses.Field, Flag]]:
    """(class, field, flag) of every option field of `classes`, each option once (the first class that has it);
    an option two classes declare differently is a TypeError (declare it once and use `shared`)."""
    seen: dict[str, tuple[type, Flag]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            flag = flag_of(f)
            if flag is None:
                continue
            if f.name in seen:
                first, first_flag = seen[f.name]
                if first_flag is not flag:
                    raise TypeError(f"option {f.name!r} is declared in {first.__name__} and again in "
                                    f"{cls.__name__}; declare it once and use shared()")
                continue
            seen[f.name] = (cls, flag)
            yield cls, f, flag


def rule_violation(rule: str | None, value: Any, text: str | None = None) -> str | None:
    """What is wrong with a number or a name under `rule` (None: nothing). `text`: the value as it was written."""
    if rule in _NAMES:
        names = _NAMES[rule]
        return None if value in names else f"{value!r} is not one of {', '.join(map(repr, names))}"
    if rule in _FORMS:
        form, what = _FORMS[rule]
        return None if isinstance(value, str) and re.fullmatch(form, value) else f"{value!r} is not {what}"
    if rule is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    shown = value if text is None else text
    if not math.isfinite(value):
        return f"{shown!r} is not a finite number"
    if rule == "positive" and isinstance(value, int):
        return None if value >= 1 else f"{value} is not >= 1"
    if rule == "positive":
        return None if value > 0 else f"{shown} is not > 0"
    if rule == "non_negative":
        return None if value >= 0 else f"{shown} is not >= 0"
    if rule == "probability":
        return None if 0 <= value <= 1 else f"{shown} is not a probability in [0, 1]"
    if rule == "fraction":
        return None if 0 < value <= 1 else f"{shown} is not in (0, 1]"
    if rule == "count":
        return None if value >= 0 and value == int(value) else f"{shown} is not a whole number >= 0"
    return None


class OptionError(UsageError):
    """A key no option object has, or a value of the wrong type (the message names both and the fix)."""


def _broken(flag: Flag | None, value: Any) -> str | None:
    if flag is None or value is None:
        return None
    if flag.choices is not None:
        return None if value in flag.choices else f"{value!r} is not one of {', '.join(map(repr, flag.choices))}"
    return rule_violation(flag.rule, value)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list"}


def _allowed(hint: Any) -> tuple[Any, ...]:
    """The concrete types a field's annotation admits (NoneType included for an optional field)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _allowed(a))
    return (typing.get_origin(hint) or hint,)


def checked_value(field: dataclasses.Field, value: Any, hint: Any, where: str) -> Any:
    """`value` as the type the field's annotation `hint` says (an int for a float field, a YAML list for a tuple
    and a numeric string for a number are taken as they are meant) and within its flag's rule or choices; anything
    else is an `OptionError` naming the key, the value and what it must be."""
    key = field.name
    value = _typed(key, value, hint, where)
    items = value if isinstance(value, tuple) else (value,)
    wrong = next(filter(None, (_broken(flag_of(field), v) for v in items)), None)
    if wrong is not None:
        raise OptionError(f"{where} key {key!r}: {wrong} (as for train.py's --{key.replace('_', '-')}); fix the value")
    return value


def _typed(key: str, value: Any, hint: Any, where: str) -> Any:
    allowed = _allowed(hint)
    if Any in allowed:
        return value
    if value is None:
        if type(None) in allowed:
            return None
    elif isinstance(value, bool):  # before int: a bool is an int to Python, not to a reader
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value if int in allowed else float(value)
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, (list, tuple)) and tuple in allowed:
        return tuple(value)
    elif isinstance(value, str):
        if str in allowed:
            return value
        for kind in (int, float):  # a number written as a string (YAML 1.1 reads 1e-3 as one)
            if kind in allowed:
                try:
                    return kind(value)
                except ValueError:
                    pass
    words = " or ".join(_TYPE_WORDS.get(t, "null" if t is type(None) else getattr(t, "__name__", str(t)))
                        for t in allowed)
    raise OptionError(f"{where} key {key!r}: {value!r} is not {words}; give {key} {words}")


def options_by_key(classes: Iterable[type], values: dict[str, Any], where: str,
                   **given: Any) -> dict[type, Any]:
    """{class: instance} of option dataclasses from keyword `values` (train.py's flag names): each key goes to
    every class with a field of its name, checked against that field's type and its flag's rule; a key no class
    has is an `OptionError` naming it (with the closest names). `given`: values the tool sets itself (not checked,
    and passed only to classes with that field)."""
    classes = list(classes)
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "use one of train.py's flags (dashes as underscores)"
        raise OptionError(f"{where}: unknown key {unknown[0]!r}; {hint}")
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out[cls] = cls(**{k: checked_value(fields[k], v, hints[k], where) for k, v in values.items() if k in fields},
                       **{k: v for k, v in given.items() if k in fields})
    return out


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):  # float() takes 'nan' and 'inf', which no flag means
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _refuse(wrong: str | None) -> None:
    if wrong is not None:
        raise argparse.ArgumentTypeError(wrong)


def checked_number(kind: type, rule: str | None) -> Callable[[str], Any]:
    """The parser's type function of a number option: the text as `kind`, within the option's rule (one rule
    function, `rule_violation`, for the parser and for `options_by_key`)."""
    def convert(text: str) -> Any:
        value = _number(text, kind)
        _refuse(rule_violation(rule, value, text if kind is float else None))
        return value
    convert.__name__ = f"{rule or ''}_{kind.__name__}".lstrip("_")
    return convert


def checked_name(rule: str) -> Callable[[str], str]:
    """The parser's type function of a name option with a rule (`rule_violation`: one of the names it allows)."""
    def convert(text: str) -> str:
        _refuse(rule_violation(rule, text))
        return text
    convert.__name__ = rule
    return convert


def checked_stitch_id(rule: str | None) -> Callable[[str], int | str]:
    """The parser's type function of a cfg_id option: 'all' or a cfg_id, within the option's rule."""
    def convert(text: str) -> int | str:
        if text == "all":
            return text
        value = _number(text, int)
        _refuse(rule_violation(rule, value))
        return value
    convert.__name__ = "stitch_id"
    return convert


class KwargsAction(argparse.Action):
    """k=v pairs with Python-literal values (timm's ParseKwargs, with an error that names the bad pair): an option
    of kind "kwargs"."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        import ast
        # the flag given twice on one command line adds up (the later value of a key wins); a file's default is
        # replaced, as every typed flag replaces its default
        repeated = getattr(self, "_parsing", None) is namespace
        self._parsing = namespace
        out = dict(getattr(namespace, self.dest) or {}) if repeated else {}
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise UsageError(f"{option_string} {item!r}: write key=value, e.g. depth=6")
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
        setattr(namespace, self.dest, out)


class Switch(argparse.Action):
    """A switch with its negation: ``--amp`` sets True, ``--no-amp`` False, so that a value a config file set (a
    recipe card's ``"amp": true``) can be turned off on the command line."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = False, required: bool = False,
                 help: str | None = None):
        negations = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__([*option_strings, *negations], dest, nargs=0, const=True, default=default,
                         required=required, help=help)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def _value_type(hint: Any) -> Any:
    """The type of one value of an annotation: int for `int | None`, str for `tuple[str, ...]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _value_type(args[0]) if len(args) == 1 else hint
    if typing.get_origin(hint) in (tuple, list):
        return _value_type(args[0])
    return hint


def _value_parser(flag: Flag, kind: Any) -> Callable[[str], Any] | None:
    """The type function of one value: the flag's own parser, else by its kind, annotation and rule."""
    if flag.parse is not None:
        return flag.parse
    if flag.kind == "stitch_id":
        return checked_stitch_id(flag.rule)
    if flag.kind == "float" or kind in (int, float):
        return checked_number(float if flag.kind == "float" else kind, flag.rule)
    if kind is str and flag.rule is not None:
        return checked_name(flag.rule)
    return None


def add_options(parser: argparse.ArgumentParser, classes: Iterable[type], groups: Iterable[str] = (),
                only_group: str | None = None, negatable: bool = False) -> None:
    """The arguments of `parser` derived from the option fields of `classes` (each option once, in field order): a
    field's flag gives the spellings (none: a positional named by the field), the help, the help group ("": the
    parser's own; `groups`: titles made first, in that order, the others on first use), metavar, nargs, const,
    choices, required and the action; the value's type function is the flag's `parse`, else its kind's or the
    annotation's number type within the flag's rule (a name with a rule: the rule's names); a bool is a switch and
    a "kwargs" option k=v pairs. A tuple default is the parser's list. `only_group`: only the options of that help
    group (train.py's pre-parser: the configuration files), a name rather than a predicate so that this module calls
    no function of its callers (the training path does not climb back up: tests/test_options.py). `negatable`: each
    switch also gets its ``--no-`` form (`Switch`), unless it is negative itself or that name is another option's."""
    made = {title: parser.add_argument_group(title) for title in groups}
    classes = list(classes)
    taken = {name for _, _, flag in flag_fields(classes) for name in flag.names}
    for cls, field, flag in flag_fields(classes):
        if only_group is not None and flag.group != only_group:
            continue
        if flag.group and flag.group not in made:
            made[flag.group] = parser.add_argument_group(flag.group)
        container = made[flag.group] if flag.group else parser
        default = None if field.default is MISSING and field.default_factory is MISSING \
            else field.default_factory() if field.default_factory is not MISSING else field.default
        kw: dict[str, Any] = {"default": list(default) if isinstance(default, tuple) else default, "help": flag.help}
        if flag.metavar is not None:
            kw["metavar"] = flag.metavar
        kind = _value_type(typing.get_type_hints(cls)[field.name])
        if flag.kind == "kwargs":
            kw.update(nargs=flag.nargs, action=KwargsAction)
        elif kind is bool and flag.parse is None:
            long = [n for n in flag.names if n.startswith("--")]
            kw["action"] = Switch if negatable and long and not any(
                n.startswith("--no-") or f"--no-{n[2:]}" in taken for n in long) else "store_true"
        else:
            for key in ("nargs", "const", "choices", "action"):
                if getattr(flag, key) is not None:
                    kw[key] = getattr(flag, key)
            convert = _value_parser(flag, kind)
            if convert is not None:
                kw["type"] = convert
        if flag.names:
            container.add_argument(*flag.names, dest=field.name, required=flag.required, **kw)
        else:
            container.add_argument(field.name, **kw)
