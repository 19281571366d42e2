"""train.py's layer: options, parser, the resolved run's description, preflight, the trainer and its loops, evaluation.

The layer's public surface is its modules below (each module's own ``__all__`` or public names); a
name with a leading underscore is its module's own and is never imported by another module
(tests/test_layers.py). Nothing is imported here, so importing one module costs only that module."""

__all__ = ["args", "describe", "device", "engine", "evaluator", "hooks", "launch", "loggers", "losses", "ls_data",
           "main", "network", "optim", "options", "positions", "preempt", "preflight", "resolved", "resume", "sampler",
           "trainer"]
