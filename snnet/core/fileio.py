"""Files that are either complete or absent: atomic writes (temp file, fsync, rename)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from snnet.core.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        os.replace(tmp, path)
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)



def save_figure(fig, path, **savefig_kwargs) -> None:
    """A matplotlib figure as a PNG, written atomically (tight layout), then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    plt.close(fig)


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be made or written: an existing file, or a folder
    (the nearest existing one) without write permission. Later failures (a full disk) still end in one line."""
    out = Path(path)
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():
        what = "is a file" if base == out else f"is under {str(base)!r}, a file"
        raise UsageError(f"{flag} {str(out)!r} {what}, not a folder; pass another {flag} folder")
    if base.exists() and not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(out)!r}: folder {str(base)!r} is not writable; pass another {flag} folder")
    return out
