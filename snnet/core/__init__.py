"""The mechanisms, once each (the bottom layer: imports nothing of snnet above it).

The layer's public surface is its modules below (each module's own ``__all__`` or public names); a
name with a leading underscore is its module's own and is never imported by another module
(tests/test_layers.py). Nothing is imported here, so importing one module costs only that module."""

__all__ = ["adapter", "build", "checkpoint", "cka", "config", "cost", "cut", "distributed", "errors", "fileio",
           "layers", "ls_init", "lstsq", "maps", "model", "options", "plan", "progress", "route_tree", "slurm",
           "steps", "weights"]
