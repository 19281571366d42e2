"""Walk train.py's path from argv to the training loop and count how often it climbs back to the entry layer.

The training path is a straight line: parse -> resolve -> check -> build -> fit, each step called once, with no
lower module calling back up. This tool checks it. It runs `snnet.train.main.main(argv)` (the digits demo's card on
generated digits, one process, CPU) under a profile hook up to the start of the fit (`Trainer.fit`), so what it
measures is the set-up, not the epochs. A *climb back* is a call into the entry layer (`snnet/train/main.py`,
`args.py`) made by a function of another module of this repository: after the path has left the entry layer,
something below calls up into it again (the entry layer calling itself, or calling down, is the straight line).
tests/test_options.py holds the count at 0.

    .venv/bin/python benchmarks/trace_rooms.py            # the count, and each climb (caller -> entry function)
    .venv/bin/python benchmarks/trace_rooms.py --rooms    # and every module entered, in order
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENTRY = ("snnet/train/main.py", "snnet/train/args.py")


class _FitReached(BaseException):
    """Raised by the stand-in for the fit: the walk ends where the epochs would begin."""


def walk(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The rooms (repository modules, relative paths) that `main(argv)` enters, in order, up to the fit; and the
    climbs back: (caller module:function, entry module:function) for each call into the entry layer from below."""
    import snnet.train.main as train_main
    from snnet.train.trainer import Trainer

    rooms: list[str] = []
    climbs: list[tuple[str, str]] = []
    prefix = str(ROOT) + os.sep
    me = str(Path(__file__).resolve())

    def ours(path: str) -> bool:
        return path.startswith(prefix) and "/.venv/" not in path and path != me

    def hook(frame, event, _arg):
        if event != "call" or not ours(frame.f_code.co_filename):
            return
        room = frame.f_code.co_filename[len(prefix):]
        if not rooms or rooms[-1] != room:
            rooms.append(room)
        if room in ENTRY:
            caller = frame.f_back
            while caller is not None and not ours(caller.f_code.co_filename):
                if caller.f_code.co_filename == me:  # the walk's own call of main: where the path starts, whoever
                    caller = None                    # called the walk (a test, another tool)
                    break
                caller = caller.f_back  # through library frames (functools, dataclasses) to our caller
            if caller is not None:
                where = caller.f_code.co_filename[len(prefix):]
                if where not in ENTRY:
                    climbs.append((f"{where}:{caller.f_code.co_name}", f"{room}:{frame.f_code.co_name}"))

    def fit(*_args, **_kwargs):
        raise _FitReached

    real_fit = Trainer.fit
    Trainer.fit = fit  # type: ignore[method-assign]
    sys.setprofile(hook)
    try:
        train_main.main(argv)
    except _FitReached:
        pass
    else:
        raise SystemExit("the run ended before its fit started: pass a training run's arguments")
    finally:
        sys.setprofile(None)
        Trainer.fit = real_fit  # type: ignore[method-assign]
    return rooms, climbs


def demo_walk() -> tuple[list[str], list[tuple[str, str]]]:
    """`walk` of a one-epoch run of the digits demo's card on generated digits (CPU, one process), with random
    anchors: the card's anchor checkpoints are dropped (they exist only after `make demo`), so it runs on a clean
    checkout."""
    from snnet.demo import write_digits
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits")
        card = json.loads((ROOT / "configs" / "demo_digits.json").read_text())
        card["anchors"] = [{k: v for k, v in a.items() if k != "checkpoint"} for a in card["anchors"]]
        card_path = Path(tmp) / "demo_random.json"
        card_path.write_text(json.dumps(card))
        return walk([str(data), "--stitch_config", str(card_path), "--no-pretrained", "--epochs", "1",
                     "--output", str(Path(tmp) / "out"), "--device", "cpu", "-j", "0"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", action="store_true", help="print every module entered, in order")
    args = p.parse_args()
    rooms, climbs = demo_walk()
    if args.rooms:
        for i, room in enumerate(rooms):
            print(f"{i:4d} {'*' if room in ENTRY else ' '} {room}")
    for caller, callee in climbs:
        print(f"climb back: {caller} -> {callee}")
    print(f"modules entered {len(rooms)} times ({len(set(rooms))} distinct) up to the fit; climbs back into the "
          f"entry layer ({', '.join(Path(e).name for e in ENTRY)}): {len(climbs)}")


if __name__ == "__main__":
    main()
