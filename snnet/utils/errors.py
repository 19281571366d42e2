"""One error type for everything that is the user's input, not a bug.

Every error a user can cause (a bad flag, config, data folder, checkpoint, results file, budget, sweep ...) is a
subclass of `SNNetError`. Each entry point (`train.py`, `python -m snnet.train.preflight`, the `snnet` command with all
its subcommands) catches `SNNetError` once, prints its message on one line and exits with its `exit_code`; anything
else is a bug and keeps its traceback. A subclass names the area in its class name only: the message itself names
the bad value and the fix.
"""
from __future__ import annotations

import argparse


class SNNetError(ValueError):
    """The user's input cannot be used; the message names the value and the fix. Exit code 2 (a usage error, as
    argparse's)."""
    exit_code = 2


class UsageError(SNNetError):
    """A flag or argument that cannot be used."""


def one_line(e: BaseException) -> str:
    """The message of a user error on one line; errors re-raised from a DataLoader worker carry the worker's
    traceback text, whose last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


class OneLineParser(argparse.ArgumentParser):
    """argparse with a usage error on one line (the message and where the help is), exit code 2, no usage block:
    the parser of the `snnet` command, train.py's and the scripts' under benchmarks/. With ``raises=True`` the error
    is raised as a UsageError instead (train.py: its entry point says the one line once per launch, `say_refusal`)."""

    def __init__(self, *args, raises: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raises = raises

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.raises:
            raise UsageError(message)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
