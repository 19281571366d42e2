"""Files that are either complete or absent: atomic writes (temp file, fsync, rename); a full disk said in one
line; one process per folder (`FolderLock`); the paths a command reads, checked before it imports torch."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickletools
import socket
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from snnet.utils.errors import SNNetError, UsageError


class DiskFullError(SNNetError):
    """A write stopped by a full disk (or quota): the folder, what was written and what is free."""


class FolderBusyError(SNNetError):
    """Another live process holds the folder's lock."""


#: below this many free bytes after a failed write, the failure is taken for a full disk (torch.save and
#: safetensors report a short write as RuntimeError or their own error, without the errno)
_NEARLY_FULL = 1 << 20


def shown_path(path: str | os.PathLike) -> str:
    """A path as the results and the console show it: relative to the working folder when inside it (a committed
    result names no machine's home), else absolute (never ``../../tmp/...``)."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def free_bytes(folder: str | os.PathLike) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether `exc`, raised while writing into `folder`, is a full disk (or quota) rather than a bug."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (KeyboardInterrupt, SystemExit, SNNetError)):
        return False
    try:
        return free_bytes(folder) < _NEARLY_FULL
    except OSError:
        return False


def disk_full_error(folder: str | os.PathLike, what: str, written: int, need: int | None = None) -> DiskFullError:
    """The one message of a full disk: the folder, the bytes needed (known, or at least those written when it
    stopped) and free; nothing torn was left (the caller's temporary file is gone)."""
    try:
        free = f"{free_bytes(folder):,} bytes free"
    except OSError:
        free = "free space unknown"
    needed = f"about {need:,} bytes" if need else f"more than {written:,} bytes" if written else "more space"
    return DiskFullError(f"disk full: writing {what} into folder {str(folder)!r} needs {needed} ({free} there); "
                         f"nothing was left half-written: free space there or write into another folder")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a file written under a temporary name (mkstemp's, a library's 0600) the mode open() would have given it
    (0666 less the umask), before it is renamed into place beside files written the ordinary way."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed onto `path`. A full disk
    ends in `DiskFullError` (the folder, `need` bytes when the caller knows them, what is free), the temporary file
    removed."""
    path = Path(path)
    if path.is_dir():  # said of the target, before a temporary file exists (os.replace would name the temporary)
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file: give a file path in it or another path",
                                str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        if is_disk_full(e, path.parent):
            raise disk_full_error(path.parent, repr(path.name), 0, need) from None
        raise
    os.close(fd)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException as e:  # the writer's own error type (torch, safetensors, numpy): classified here once
            if is_disk_full(e, path.parent):
                written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
                raise disk_full_error(path.parent, repr(path.name), written, need) from None
            raise
        give_default_mode(tmp)  # mkstemp makes 0600; the file gets the mode open() would give it
        os.replace(tmp, path)
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """`text` into `path` atomically; `newline` as open()'s ("" writes line endings exactly as given)."""
    with atomic_path(path, need=len(text.encode())) as tmp:
        with open(tmp, "w", newline=newline) as f:
            f.write(text)


def save_figure(fig, path, **savefig_kwargs) -> None:
    """A matplotlib figure as a PNG, written atomically (tight layout), then closed."""
    import matplotlib.pyplot as plt  # heavy (~0.5 s): only a figure needs it
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    plt.close(fig)


def unwritable(path: str | os.PathLike) -> str | None:
    """Why the folder `path` cannot be made or written, or None when it can. Its nearest existing ancestor must be
    a folder this user may write, and making and removing a temporary folder there must work, which also refuses
    what permission bits cannot tell (/proc, a read-only mount, root's writes where the kernel allows none). A
    folder below one this user cannot enter counts as missing (os.path.exists: pathlib raises PermissionError
    there). Nothing is left behind."""
    base = Path(path)
    while not os.path.exists(base) and base != base.parent:
        base = base.parent
    if os.path.exists(base) and not os.path.isdir(base):
        return "is a file, not a folder" if base == Path(path) else f"cannot be made: {str(base)!r} is a file"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"is not writable ({str(base)!r} does not allow it)"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".snnet-probe-", dir=base))
    except OSError as e:
        return f"cannot be written: making a folder in {str(base)!r} fails ({e.strerror or type(e).__name__})"
    return None


#: what a folder given for a checkpoint file is searched for
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def checkpoint_path(path: str | os.PathLike, what: str, error: type[SNNetError] = UsageError) -> Path:
    """`path` if it is a file with content, else `error` naming it and the fix: a folder (with the checkpoint files
    in it to choose from), nothing there, or an empty file (an interrupted copy). Needs no torch: a command checks
    its checkpoint before it imports torch, and loading checks it again."""
    path = Path(path)
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.name.endswith(CHECKPOINT_SUFFIXES) and p.is_file())
        except OSError:
            inside = []
        pick = f" (it holds {', '.join(repr(str(path / n)) for n in inside[:3])})" if inside else \
            f", e.g. {str(path / 'last.pth.tar')!r}"
        raise error(f"{what} {str(path)!r} is a folder, not a checkpoint file; give the path of the file{pick}")
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist; give the path of an existing file")
    if path.stat().st_size == 0:
        raise error(f"{what} {str(path)!r} is empty (an interrupted copy?); use another file")
    return path


#: an export folder's files (snnet export): the network's spec and its weights; the spec's format and version
EXPORT_SPEC, EXPORT_WEIGHTS = "model.json", "model.safetensors"
EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "snnet-stitch", 1


def export_folder(path: str | os.PathLike, error: type[SNNetError] = UsageError) -> Path:
    """`path` if it holds an export's spec and weights, else `error` naming it and the fix. Needs no torch, as
    `checkpoint_path`: snnet serve --exported checks its folders before it imports torch, and loading checks again."""
    folder = Path(path)
    if not (folder / EXPORT_SPEC).is_file() or not (folder / EXPORT_WEIGHTS).is_file():
        raise error(f"{str(folder)!r} is not an export folder (needs {EXPORT_SPEC} and {EXPORT_WEIGHTS}); create one "
                    f"with snnet export CKPT --stitch_config CFG --cfg-id N --out DIR")
    return folder


def export_out(path: str | os.PathLike, files: tuple[str, ...] = (EXPORT_SPEC, EXPORT_WEIGHTS),
               error: type[SNNetError] = UsageError) -> None:
    """Refuse an export's output folder `path` that holds any of `files` (what an export writes or replaces there)
    when no earlier export wrote them (its model.json is no spec of this format): they would be lost. An earlier
    export's folder is replaced, as a rerun should. Needs no torch: snnet export checks --out at once."""
    folder = Path(path)
    found = [name for name in files if (folder / name).exists()]
    if not found:
        return
    try:
        ours = json.loads((folder / EXPORT_SPEC).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        ours = False
    if not ours:
        them = "it" if len(found) == 1 else "them"
        raise error(f"--out {str(folder)!r} holds {', '.join(found)}, which no snnet export wrote: exporting would "
                    f"replace {them}; give another --out, or remove {them} first")


def export_spec(path: str | os.PathLike, error: type[SNNetError] = UsageError) -> dict[str, Any]:
    """The spec (model.json) of the export folder `path`, checked to be one this version writes, else `error`
    naming the file and the fix. Needs no torch: snnet serve --exported reads its folders' stitches before it
    imports torch, and loading reads them again."""
    spec_file = export_folder(path, error) / EXPORT_SPEC
    try:
        spec = json.loads(spec_file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise error(f"{str(spec_file)!r} is not valid JSON; export again") from None
    if not isinstance(spec, dict) or spec.get("format") != EXPORT_FORMAT or \
            spec.get("format_version") != EXPORT_FORMAT_VERSION:
        raise error(f"{str(spec_file)!r} is not a {EXPORT_FORMAT} v{EXPORT_FORMAT_VERSION} spec; export again with "
                    f"this version of snnet")
    return spec


#: the first bytes of what torch.save writes: its zip archive, or (before torch 1.6) a pickle of protocol 2 or more
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def release_paths(src: str | os.PathLike, dst: str | os.PathLike, error: type[SNNetError] = UsageError) -> None:
    """snnet convert's paths: refuse, before anything is read or trusted, a `src` that is no torch file and a `dst`
    that cannot take the result (a folder, `src` itself, or in a folder that cannot be made or written). Needs no
    torch, as `checkpoint_path`: the command checks them before it imports torch, and converting checks again."""
    if not os.path.isfile(src):
        what = "is a folder" if os.path.isdir(src) else "does not exist"
        raise error(f"SN-Net checkpoint {str(src)!r} {what}; give the downloaded .pth file")
    with open(src, "rb") as f:
        head = f.read(9)
    if not head.startswith(TORCH_FILE_MAGIC) and head[8:9] == b"{":  # safetensors: an 8-byte length, then JSON
        raise error(f"{str(src)!r} is a safetensors file, which needs no conversion (it holds no pickle): give it as "
                    f"an anchor's \"checkpoint\" in the stitch config")
    if not head.startswith(TORCH_FILE_MAGIC):
        raise error(f"{str(src)!r} is not a file torch.save wrote (neither its zip archive nor a pickle); give the "
                    f".pth SN-Net published")
    if os.path.isdir(dst):
        stem = Path(src).name.removesuffix(".tar").removesuffix(".pth").removesuffix(".pt")
        raise error(f"output {str(dst)!r} is a folder; give a file path, e.g. "
                    f"{os.path.join(str(dst), stem + '.pth.tar')!r}")
    reason = unwritable(Path(dst).parent)  # the folder, or the first existing one above it, takes a write
    if reason:
        raise error(f"output {str(dst)!r}: folder {str(Path(dst).parent)!r} {reason}; give another output path")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise error(f"{str(dst)!r} is the release being converted: writing there would replace it; give another "
                    f"output path")
    if os.path.exists(dst) and not any(arg == CONVERTED_FROM for _, arg in pickle_ops(dst)):
        raise error(f"output {str(dst)!r} exists and is no earlier snnet convert output (a trained checkpoint?): "
                    f"converting would replace it; give another output path, or remove it first")


#: the key of a converted checkpoint that records its release (snnet convert): a rerun may replace such a file
CONVERTED_FROM = "converted_from"


def pickle_ops(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """(opcode name, argument) of the pickle in a torch file (its zip archive's data.pkl, or the file itself), parsed
    by pickletools, which executes nothing; [] for a file that holds no readable pickle (garbage, JSON,
    safetensors, a truncated file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    except Exception:
        return []


def data_folder(path: str | os.PathLike, what: str, layout: str, error: type[SNNetError] = UsageError) -> Path:
    """`path` if it is a folder, else `error` naming it and the fix (`layout`: what to give instead): nothing there,
    an archive to unpack first (zip, tar), or another file. Needs no torch, as `checkpoint_path`."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise error(f"{what} {str(path)!r} does not exist; give {layout}")
    kind = "zip" if zipfile.is_zipfile(path) else "tar" if tarfile.is_tarfile(path) else None
    if kind:
        unpack = f"unzip {path} -d DIR" if kind == "zip" else f"mkdir DIR && tar xf {path} -C DIR"
        raise error(f"{what} {str(path)!r} is a {kind} archive; unpack it ({unpack}) and give the folder of images "
                    f"it holds")
    raise error(f"{what} {str(path)!r} is a file, not a folder; give {layout}")


def replaceable_image_folder(path: str | os.PathLike, names: Collection[str], error: type[SNNetError] = UsageError
                             ) -> None:
    """Refuse an image folder that a writer replaces as a whole (benchmarks' data writers) unless it is missing,
    empty or holds only what such a writer writes: folders named in `names` and PNG files. Anything else in it
    (another program's files, a user's data) would be removed with it."""
    folder = Path(path)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise error(f"{str(folder)!r} is a file, not an image folder; pass another folder")
    theirs = [p for p in folder.rglob("*") if (p.name not in names if p.is_dir() else p.suffix != ".png")]
    if theirs:
        raise error(f"{str(folder)!r} holds {str(theirs[0].relative_to(folder))!r}, which this writer does not "
                    f"write, and is replaced as a whole; pass another folder, or remove it first")


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be made or written (`unwritable`). Later failures (a
    full disk) still end in one line."""
    reason = unwritable(path)
    if reason:
        raise UsageError(f"{flag} {str(path)!r} {reason}; pass another {flag} folder")
    return Path(path)


class FolderLock:
    """One process at a time in a folder: a POSIX lock (fcntl.lockf) on `<folder>/.snnet.lock`, which the kernel
    releases when the holder dies (kill -9 included), so a crashed run never leaves it stuck. POSIX locks belong to
    the process, not to the file descriptor, so forked children (data-loader workers) do not hold it. The file says
    who holds it (pid, host, start time) for the refusal; it is removed on release, and so is the folder when the
    lock created it and nothing else was written there (a run refused later leaves no trace)."""

    NAME = ".snnet.lock"

    def __init__(self, folder: str | os.PathLike, flag: str = "--output/--experiment"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / self.NAME
        self.fd: int | None = None
        self.made: list[Path] = []

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        missing = []
        p = self.folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.made = missing  # innermost first: removed in this order when left empty
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:  # a full disk (or quota) where the lock file is made or written: one line, no trace
            if self.fd is not None:  # our lock file, empty or torn: removed while still locked
                self.path.unlink(missing_ok=True)
                os.close(self.fd)
                self.fd = None
            if not is_disk_full(e, p):
                raise
            error = disk_full_error(self.folder if self.folder.exists() else p, f"the lock file {self.NAME!r}", 0,
                                    len(self._holder_text()))
            self._remove_made()
            raise error from None

    def _holder_text(self) -> str:
        return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"

    def _lock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderBusyError(f"folder {str(self.folder)!r} is in use by another run ({holder}); wait for "
                                      f"it to end or pass another {self.flag}") from None
            try:  # a holder that released (and removed the file) between our open and lock: lock the new file
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, self._holder_text().encode())

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: the next holder locks a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for d in self.made:
            try:
                d.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `FolderLock(folder)` ("pid N on HOST since T"), or None when no live process does. Only for
    another process's lock: closing the probe releases the caller's own POSIX lock on that file."""
    path = Path(folder) / FolderLock.NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # closing releases a lock we took (POSIX locks)
