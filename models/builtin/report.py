"""Training curves for the model card (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training(log: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = 50
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, losses, alpha=0.25, lw=0.6, label="loss")
    ax[0].plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax[0].set(xlabel="step", ylabel="MSE (velocity)", yscale="log", title="training loss")
    ax[0].legend()
    evals = [r for r in records if "eval" in r]
    for key in sorted({k for r in evals for k in r["eval"]}):
        ax[1].plot([r["step"] for r in evals], [r["eval"].get(key) for r in evals],
                   marker="o", label=key)
    ax[1].set(xlabel="step", ylabel="all-five accuracy (%)", ylim=(0, 100),
              title="quick eval (64 prompts/set)")
    if evals:
        ax[1].legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
