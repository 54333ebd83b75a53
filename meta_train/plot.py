"""Meta-training curves from ``log.jsonl`` files to a PNG (needs the ``plot`` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional


def read_log(run: str) -> List[dict]:
    path = Path(run) / "log.jsonl" if Path(run).is_dir() else Path(run)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def smooth(xs, k=20):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > k:
            acc.pop(0)
        vals = [a for a in acc if a == a]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def plot_runs(runs: List[str], out: str, labels: Optional[List[str]] = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'learned_opt[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        recs = read_log(run)
        label = labels[i] if labels and i < len(labels) else str(run)
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, smooth([r["meta_loss"] for r in recs]), label=label)
        axes[1].plot(steps, smooth([r["estimator_var"] for r in recs]), label=label)
    axes[0].set_xlabel("outer step")
    axes[0].set_ylabel("meta-loss (training population, smoothed)")
    axes[1].set_xlabel("outer step")
    axes[1].set_ylabel("estimator variance (smoothed)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
