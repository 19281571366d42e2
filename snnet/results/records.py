"""stitches_res.txt: the one owner of the results file (reading, validating, writing) and of the hashes that tie
records to the checkpoint and config that produced them."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snnet.utils.errors import SNNetError
from snnet.utils.fileio import write_text_atomic

if TYPE_CHECKING:
    from snnet.stitching.model import SNNet

_logger = logging.getLogger("snnet")
RESULTS_FILE = "stitches_res.txt"
EMA_RESULTS_FILE = "stitches_res_ema.txt"  # the same for the --model-ema weights


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, read once per version of the file in a process: a command's early check and its loader's
    ask for the same checkpoint (hundreds of MB). A version is the file's inode, size and modification time; the
    project's writers replace files by rename (a new inode), so a rewritten file is hashed again."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checkpoint_sha(records: list[dict[str, Any]], digest: str | None, what: str, source: str) -> None:
    """Refuse `records` of another checkpoint than the one whose sha256 is `digest` (`what` names it), naming the
    first record whose checkpoint_sha256 differs: their accuracies are not its own. Records without one are not
    compared, nor is anything when `digest` is None. Needs no torch: the commands check before they load a
    network (snnet latency, snnet serve)."""
    other = next((r for r in records if digest and r.get("checkpoint_sha256") not in (None, digest)), None)
    if other is not None:
        raise ResultsError(f"{source} holds results of another checkpoint (cfg_id {other['cfg_id']}: checkpoint_sha256 "
                           f"{str(other['checkpoint_sha256'])[:16]}..., {what} is {str(digest)[:16]}...); pass the "
                           f"checkpoint they were evaluated from, or evaluate this one (train.py --eval --resume)")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ResultsError(SNNetError):
    """A results file (or record) that cannot be used; the message names the file, the line and the fix."""


# ------------------------------------------------------------------------------------------------------ records
def stitch_record(net, index: int, metrics: dict[str, Any], flops: int, img_size: Sequence[int],
                  cfg_id: int | None = None, **extra: Any) -> dict[str, Any]:
    """The one results record of an evaluated network, whoever evaluated it (train.py's evaluation, `snnet search`,
    `snnet stitch-train`): cfg_id (default: `index`, the route's index in `net`), FLOPs, params (exactly what that
    route runs), top-1/top-5 (percent), mean loss, the route in words, the number of images evaluated and their
    size, then the tool's own fields (`extra`). `metrics` is the evaluator's dict (acc1, acc5, loss, samples)."""
    record = {"cfg_id": int(index if cfg_id is None else cfg_id), "flops": int(flops), "params": int(net.params(index)),
              "acc1": metrics["acc1"], "acc5": metrics["acc5"], "loss": metrics["loss"],
              "route": net.describe(index), "samples": int(metrics["samples"]),
              "img_size": [int(s) for s in img_size][-2:]}
    record.update(extra)
    return record


# ------------------------------------------------------------------------------------------------------ reading
_COST_KEY = re.compile(r"flops|params|latency_ms_b\d+")  # costs: finite and >= 0 when present
_PERCENT_KEY = ("acc1", "acc5")                           # accuracies: percent, 0..100


def is_number(value: Any) -> bool:
    """A finite int or float (JSON's NaN/Infinity and booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def results_path(path: str | os.PathLike) -> Path:
    """A results file, or an evaluation output folder meaning its stitches_res.txt."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def _checked(rec: Any, where: str) -> dict[str, Any]:
    """One record validated: integer cfg_id >= 0, acc1 (and acc5) in percent, costs finite and >= 0."""
    if not isinstance(rec, dict) or "cfg_id" not in rec or "acc1" not in rec:
        what = "a JSON list" if isinstance(rec, list) else "a record without cfg_id/acc1"
        raise ResultsError(f"{where} is {what}; a stitches_res.txt has one JSON object with cfg_id and acc1 per "
                           f"line")
    cfg_id = rec["cfg_id"]
    if not is_number(cfg_id) or cfg_id != int(cfg_id) or cfg_id < 0:
        raise ResultsError(f"{where}: cfg_id {cfg_id!r} must be an integer >= 0; fix or regenerate the file")
    for key, value in rec.items():
        if value is None:  # a missing number (SN-Net's files simply leave the key out)
            continue
        if key in _PERCENT_KEY and not (is_number(value) and 0 <= value <= 100):
            raise ResultsError(f"{where}: {key} {value!r} must be a top-1/top-5 in percent (0..100); fix or "
                               f"regenerate the file")
        if _COST_KEY.fullmatch(key) and not (is_number(value) and value >= 0):
            raise ResultsError(f"{where}: {key} {value!r} must be a finite number >= 0; fix or regenerate the file")
    if rec["acc1"] is None:
        raise ResultsError(f"{where}: acc1 is null; every record needs its top-1; fix or regenerate the file")
    if is_number(rec.get("acc5")) and rec["acc5"] < rec["acc1"]:
        raise ResultsError(f"{where}: acc5 {rec['acc5']!r} is below acc1 {rec['acc1']!r}, which no evaluation gives "
                           f"(top-5 counts every top-1 hit); fix or regenerate the file")
    if rec.get("flops") == 0:
        raise ResultsError(f"{where}: flops 0: every network costs something (a FLOPs count that failed?); fix or "
                           f"regenerate the file")
    rec["cfg_id"] = int(cfg_id)
    return rec


def parse_results(text: str, source: str, owner: Callable[[dict[str, Any]], None] | None = None
                  ) -> tuple[list[dict[str, Any]], int | None]:
    """The one line parser: validated records in file order, and the number of a dropped torn line (or None).

    Blank lines are skipped. A last line that is not JSON is a write cut short (a crash, or SN-Net's appending
    evaluation killed mid-line): it is dropped and that stitch counts as not evaluated. A non-JSON line anywhere
    else means the file is not a results file, and is refused. A cfg_id on two lines is refused too: our evaluator
    writes each stitch once (a rerun skips the completed ones), so a repeat means two evaluations (possibly of
    different checkpoints) were appended into one file, and letting one line silently win would rank stitches by
    numbers nobody can vouch for. `owner` (the evaluator's checkpoint/config check) sees each JSON object before
    its validation: a file of another run is refused as that, however malformed, since the fix is the same.
    """
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    torn: int | None = None
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                torn = n
                break
            raise ResultsError(f"{source} line {n} is not a JSON object; a stitches_res.txt has one JSON object "
                               f"per line (a CSV or a JSON list is not one)") from None
        if owner is not None and isinstance(rec, dict):
            owner(rec)
        rec = _checked(rec, f"{source} line {n}")
        if rec["cfg_id"] in seen:
            raise ResultsError(f"{source} line {n}: cfg_id {rec['cfg_id']} is also on line {seen[rec['cfg_id']]} "
                               f"(two evaluations in one file?); keep one of the two lines")
        seen[rec["cfg_id"]] = n
        records.append(rec)
    return records, torn


#: what one evaluation shares across its records: (key, what a difference means)
_ONE_EVALUATION = (("checkpoint_sha256", "checkpoints"), ("config_sha256", "stitch configs"),
                   ("samples", "numbers of evaluated images (other data)"), ("data", "data sources"))


def check_one_evaluation(records: Sequence[dict[str, Any]], source: str) -> None:
    """Refuse a file whose records come from several evaluations: different checkpoints, configs or evaluation
    sets (image counts), e.g. two files concatenated. Its front would rank networks by numbers that were never
    measured together. A key that no record has (SN-Net's files, a tool's records) is not compared; one that some
    records have and others lack counts as a difference."""
    for key, what in _ONE_EVALUATION:
        values: dict[str, Any] = {}
        for r in records:
            values.setdefault(json.dumps(r.get(key)), r["cfg_id"])
        if len(values) > 1:
            (a, ca), (b, cb) = list(values.items())[:2]
            raise ResultsError(f"{source} mixes {what}: cfg_id {ca} has {key} {_short(a)}, cfg_id {cb} has "
                               f"{_short(b)}; one front needs one evaluation: keep the lines of one run (or "
                               f"evaluate all stitches again with train.py --eval --resume CKPT)")


def _short(value: str) -> str:
    return "none" if value == "null" else value[:14] + "...\"" if len(value) > 16 else value


def check_same_evaluation_set(series: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> list[str]:
    """Files combined into one front must have been evaluated on the same images: refuse different image counts
    (other data: accuracies that cannot be compared); return notes for what is allowed but worth saying (records
    at different image sizes: each file's costs are measured at its own size)."""
    counts = {lab: recs[0].get("samples") for lab, recs in series if recs and recs[0].get("samples") is not None}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{lab!r}: {n}" for lab, n in counts.items())
        raise ResultsError(f"the files were evaluated on different numbers of images ({detail}): their accuracies "
                           f"are not comparable in one front; evaluate them on the same validation split")
    notes = []
    sizes = {lab: tuple(r["img_size"]) for lab, recs in series for r in recs[:1] if r.get("img_size")}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{lab!r}: {'x'.join(map(str, s))}" for lab, s in sizes.items())
        notes.append(f"note: the combined front mixes image sizes ({detail}); each network's cost is at its own "
                     f"size")
    return notes


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ResultsError(f"results file {str(path)!r} does not exist; pass a stitches_res.txt written by "
                           f"train.py --eval (or SN-Net's evaluation)")
    try:
        # utf-8-sig: a byte-order mark (Notepad's) is not part of the first record; CRLF is split by splitlines
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ResultsError(f"{str(path)!r} is not a text file; pass a stitches_res.txt (one JSON object per "
                           f"line)") from None


def _load(path: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """The records of a file in file order; refuses a file without any complete record."""
    path = results_path(path)
    records, torn = parse_results(_read_text(path), repr(str(path)))
    if not records and torn is not None:  # its only line is not JSON: not a results file rather than a torn one
        raise ResultsError(f"{str(path)!r} line {torn} is not a JSON object; a stitches_res.txt has one JSON "
                           f"object per line")
    if not records:
        raise ResultsError(f"results file {str(path)!r} is empty; evaluate the SN-Net first "
                           f"(train.py --eval --resume CKPT) or pass another file")
    check_one_evaluation(records, repr(str(path)))
    if torn is not None:  # said, not dropped silently: that stitch is missing from whatever is built from the file
        _logger.warning(f"note: {path}: line {torn} is incomplete (an interrupted evaluation?) and left out")
    return path, records


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Validated records of a results file (ours or SN-Net's, any key order), sorted by cfg_id."""
    return sorted(_load(path)[1], key=lambda r: r["cfg_id"])


# ------------------------------------------------------------------------------------------------------ writing
def write_results(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """The one writer: one JSON object per line, in one atomic write (the old file stays whole until replaced)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def classes_path(results: str | os.PathLike) -> Path:
    """The class names of a results file's evaluation set, beside it: stitches_res.txt -> stitches_res.classes.json
    (``{"class_names": [name of class 0, name of class 1, ...]}``)."""
    path = results_path(results)
    return path.with_name(path.stem + ".classes.json")


def write_class_names(results: str | os.PathLike, names: Sequence[str] | None) -> None:
    """Write the class-names sidecar of `results` (atomically); when the data names no classes, remove one an
    earlier evaluation left there."""
    if names:
        write_text_atomic(classes_path(results), json.dumps({"class_names": [str(n) for n in names]}) + "\n")
    else:
        classes_path(results).unlink(missing_ok=True)


def read_class_names(results: str | os.PathLike) -> list[str] | None:
    """The class names beside a results file, or None where none were written (data without names, older runs)."""
    path = classes_path(results)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text()).get("class_names")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ResultsError(f"{str(path)!r} is not a class-names file ({{\"class_names\": [...]}}); delete it or "
                           f"evaluate again") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ResultsError(f"{str(path)!r}: class_names is not a list of strings; delete it or evaluate again")
    return names


def update_results(path: str | os.PathLike, update: Callable[[dict[str, Any]], bool]) -> int:
    """Apply `update` to every record of a file (in place; True = changed) and rewrite it atomically.

    Lines keep their order and keys. The file is the user's: one with a torn last line is refused, not rewritten
    without it (only the evaluator drops a torn line of its own file, and evaluates that stitch again). Returns the
    number of records changed.
    """
    path = results_path(path)
    _, torn = parse_results(_read_text(path), repr(str(path)))
    if torn is not None:
        raise ResultsError(f"{str(path)!r}: line {torn} is incomplete (an interrupted evaluation?); rewriting the "
                           f"file would drop it: finish the evaluation (train.py --eval --resume continues it) or "
                           f"remove that line yourself; nothing was written")
    path, records = _load(path)
    changed = sum(1 for r in records if update(r))
    write_results(path, records)
    return changed


def check_routes(net: SNNet, records: Sequence[dict[str, Any]], source: str) -> None:
    """Refuse records of another SN-Net: a cfg_id it lacks, or a route that is not its route of that cfg_id.

    SN-Net's own files name no routes; their cfg_ids follow SN-Net's order, which ours keeps, so they pass.
    """
    fix = "use the results of the checkpoint and config that built this SN-Net"
    for r in records:
        c = r["cfg_id"]
        if c >= net.num_configs:
            raise ResultsError(f"{source} is not of this SN-Net: it has cfg_id {c}, this SN-Net has cfg_ids "
                               f"0..{net.num_configs - 1}; {fix}")
        if r.get("route", net.describe(c)) != net.describe(c):
            raise ResultsError(f"{source} is not of this SN-Net: its cfg_id {c} is {r['route']!r}, this SN-Net's "
                               f"is {net.describe(c)!r}; {fix}")


def same_data_source(a: str, b: str) -> bool:
    """Whether two records' "data" name one source ("folder:PATH", "wds:PATH split S (N shards)"). The path is
    relative to the working folder of the run that wrote it when inside it, so one folder evaluated from two working
    folders reads "folder:data/val" and "folder:/home/me/data/val": the same source."""
    if a == b:
        return True
    (ka, _, ra), (kb, _, rb) = a.partition(":"), b.partition(":")
    (pa, sep_a, ta), (pb, sep_b, tb) = ra.partition(" split "), rb.partition(" split ")
    if ka != kb or (sep_a + ta) != (sep_b + tb):
        return False
    fa, fb = os.path.abspath(pa), os.path.abspath(pb)
    if fa == fb:
        return True
    rel = pa if not os.path.isabs(pa) else pb if not os.path.isabs(pb) else None
    other = fb if rel is pa else fa
    return rel is not None and other.endswith(os.sep + os.path.normpath(rel))


class ResultsFile:
    """stitches_res.txt: one JSON object per stitch, written atomically once the pass over the data is done.

    Each record carries the hash of the checkpoint and of the config that produced it. A rerun skips the set of
    completed cfg_ids of the same checkpoint and config; a torn last line (crash mid-write) is dropped and redone;
    records of another checkpoint or config are never mixed into the file.
    """

    def __init__(self, path: str | os.PathLike, checkpoint_hash: str, config_hash: str, data: str | None = None):
        self.path = Path(path)
        self.checkpoint_hash, self.config_hash = checkpoint_hash, config_hash
        self.data = data  # the data source (records' "data"): records of another one are not this evaluation's

    def completed(self) -> dict[int, dict[str, Any]]:
        """The records already evaluated, by cfg_id; a torn last line is dropped from the file (and redone)."""
        if not self.path.exists():
            return {}
        records, torn = parse_results(_read_text(self.path), repr(str(self.path)), self._owned)
        if torn is not None:  # rewritten now, so that `extend` never appends after a half line
            _logger.warning(f"{self.path}: line {torn} is incomplete; that stitch will be evaluated again")
            write_results(self.path, records)
        return {r["cfg_id"]: r for r in records}

    def _owned(self, rec: dict[str, Any]) -> None:
        if (rec.get("checkpoint_sha256"), rec.get("config_sha256")) != (self.checkpoint_hash, self.config_hash):
            raise ResultsError(f"{str(self.path)!r} holds results of another checkpoint or config (cfg_id "
                               f"{rec.get('cfg_id')}); evaluate into another folder (--output/--experiment) or "
                               f"move the file away")
        if self.data is not None and rec.get("data") is not None and not same_data_source(rec["data"], self.data):
            raise ResultsError(f"{str(self.path)!r} holds results of another data source ({rec['data']!r}, this run "
                               f"evaluates {self.data!r}; cfg_id {rec.get('cfg_id')}); evaluate into another folder "
                               f"(--output/--experiment) or move the file away")

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Add records (stamped with the hashes) in one atomic write; a cfg_id evaluated again replaces its line."""
        stamp = {"checkpoint_sha256": self.checkpoint_hash, "config_sha256": self.config_hash}
        merged = {**self.completed(), **{r["cfg_id"]: {**r, **stamp} for r in records}}
        write_results(self.path, merged.values())
