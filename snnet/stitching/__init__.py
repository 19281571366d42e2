"""SN-Net's method: the stitch plan, the stitching layers, the network that routes a cfg_id through anchors and
stitching layers, the least-squares init, the route tree of one-pass evaluation and the cost model.

Imports only `snnet.utils` below it. Nothing is imported here, so importing one module costs only that module; a
name with a leading underscore is its module's own (tests/test_layers.py)."""

__all__ = ["adapter", "build", "cka", "config", "cost", "cut", "layers", "ls_init", "lstsq", "maps", "model", "plan",
           "route_tree", "steps", "weights"]
