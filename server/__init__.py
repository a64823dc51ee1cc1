"""The serving side: HTTP API, scheduler, settings, metrics."""

# This folder is the package `stepserve.server` (pyproject.toml maps it). Imported under its
# folder name (e.g. from the repository root) every file would exist twice, as two
# module objects: refuse that, so each file has exactly one importable name.
if __name__ != "stepserve.server":
    raise ImportError(f"import this package as stepserve.server, not {__name__}")
