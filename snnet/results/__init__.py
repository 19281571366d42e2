"""Results files and what is read from them: records, Pareto fronts, quality, selection, the report.

The layer's public surface is its modules below (each module's own ``__all__`` or public names); a
name with a leading underscore is its module's own and is never imported by another module
(tests/test_layers.py). Nothing is imported here, so importing one module costs only that module."""

__all__ = ["baselines", "pareto", "predictions", "quality", "records", "report", "select"]
