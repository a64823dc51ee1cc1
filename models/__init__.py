"""Denoisers, text encoders, samplers, step caches, model families and the built-in model."""

# This folder is the package `stepserve.models` (pyproject.toml maps it). Imported under its
# folder name (e.g. from the repository root) every file would exist twice, as two
# module objects: refuse that, so each file has exactly one importable name.
if __name__ != "stepserve.models":
    raise ImportError(f"import this package as stepserve.models, not {__name__}")
