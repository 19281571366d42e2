"""`snnet serve`: one trained SN-Net behind an HTTP endpoint that picks the stitch per request.

    policy.py     the served stitches, their ranking (select's rule) and batch latencies: `StitchMenu`
    scheduler.py  deadline-ordered batching with late binding (the stitch chosen at dispatch): `DeadlineScheduler`
    handler.py    the engine-free request path (body -> checked request -> scheduler -> JSON): `ServeCore`
    local.py      the one-machine engine (aiohttp in one process; `snnet serve`'s default)
    app.py        the Ray Serve deployment around `ServeCore` (`--engine ray`: replicas, clusters)

The layer sits beside deploy/ (it may import core, results, train and deploy; only the CLI imports it).
docs/serving.md has the commands, the request format and the measured numbers.
"""
