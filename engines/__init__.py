"""Engines run one batched denoiser forward; the scheduler decides what goes in it."""

# This folder is the package `stepserve.engines` (pyproject.toml maps it). Imported under its
# folder name (e.g. from the repository root) every file would exist twice, as two
# module objects: refuse that, so each file has exactly one importable name.
if __name__ != "stepserve.engines":
    raise ImportError(f"import this package as stepserve.engines, not {__name__}")
