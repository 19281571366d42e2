"""`snnet serve`: one trained SN-Net behind an HTTP endpoint that picks the stitch per request.

    policy.py   the stitch for a request's budget (latency ms or FLOPs) and the current load: `StitchMenu`
    batcher.py  dynamic batching, one queue per stitch: `StitchBatcher`
    handler.py  the engine-free request path (body -> checked request -> stitch -> batch -> JSON): `ServeCore`
    app.py      the Ray Serve deployment around `ServeCore`, and `serve` (what `snnet serve` runs)

The layer sits beside deploy/ (it may import core, results, train and deploy; only the CLI imports it).
docs/serving.md has the commands, the request format and the measured numbers.
"""
