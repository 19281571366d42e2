"""Infrastructure under the method: user errors, the option declarations, atomic file I/O, progress lines,
checkpoint files, Slurm and the process group. Imports nothing of snnet above it."""

__all__ = ["checkpoint", "distributed", "errors", "fileio", "options", "progress", "slurm"]
