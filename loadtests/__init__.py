"""Benchmarks run by `stepserve bench NAME` (each module also has a `main(argv)`)."""

# This folder is the package `stepserve.loadtests` (pyproject.toml maps it). Imported under its
# folder name (e.g. from the repository root) every file would exist twice, as two
# module objects: refuse that, so each file has exactly one importable name.
if __name__ != "stepserve.loadtests":
    raise ImportError(f"import this package as stepserve.loadtests, not {__name__}")
