"""train.py's layer: options and parser, the run resolved once, the preflight, the trainer and its loop, evaluation.

The layer's public surface is its modules below (each module's own ``__all__`` or public names); a
name with a leading underscore is its module's own and is never imported by another module
(tests/test_layers.py). Nothing is imported here, so importing one module costs only that module."""

__all__ = ["args", "describe", "device", "evaluator", "launch", "loggers", "losses", "ls_data", "main", "network",
           "optim", "options", "positions", "preempt", "preflight", "resolve", "resume", "sampler", "trainer"]
