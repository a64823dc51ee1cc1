"""Markdown tables the benchmarks print (and the docs paste)."""

from __future__ import annotations


def markdown(rows: list[dict]) -> str:
    """One row per dict, the first dict's keys as the header; floats to 2 places."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)
