"""Classification metrics, per-label decision thresholds and the per-label report (scikit-learn does the maths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | float = 0.5) -> dict:
    """Micro/macro/samples F1, samples Jaccard, ROC-AUC (micro and per label), subset accuracy, Hamming loss."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, jaccard_score, roc_auc_score

    pred = (probs >= thresholds).astype(int)
    labels = labels.astype(int)
    out = {
        "f1_micro": f1_score(labels, pred, average="micro", zero_division=0),
        "f1_macro": f1_score(labels, pred, average="macro", zero_division=0),
        "f1_samples": f1_score(labels, pred, average="samples", zero_division=0),
        "jaccard_samples": jaccard_score(labels, pred, average="samples", zero_division=0),
        "subset_accuracy": accuracy_score(labels, pred),
        "hamming_loss": hamming_loss(labels, pred),
    }
    scorable = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]  # AUC needs both classes
    out["roc_auc_micro"] = (
        roc_auc_score(labels[:, scorable], probs[:, scorable], average="micro") if scorable else float("nan")
    )
    out["roc_auc_per_label"] = {j: float(roc_auc_score(labels[:, j], probs[:, j])) for j in scorable}
    out["f1_per_label"] = f1_score(labels, pred, average=None, zero_division=0).tolist()
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def singlelabel_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(labels, pred, average="micro", zero_division=0)),
        "f1_per_label": f1_score(
            labels, pred, average=None, zero_division=0, labels=list(range(logits.shape[-1]))
        ).tolist(),
    }


def tune_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label, the grid threshold with the best F1 on the eval split (0.5 when the label never occurs)."""
    from sklearn.metrics import f1_score

    best = np.full(labels.shape[1], 0.5)
    for j in range(labels.shape[1]):
        if labels[:, j].sum() == 0:
            continue
        scores = [f1_score(labels[:, j], probs[:, j] >= t, zero_division=0) for t in THRESHOLD_GRID]
        best[j] = THRESHOLD_GRID[int(np.argmax(scores))]  # first best: the lowest threshold among ties
    return best


def per_label_table(names: list[str], metrics: dict, thresholds: np.ndarray | None, support: np.ndarray) -> str:
    auc = metrics.get("roc_auc_per_label", {})
    lines = [f"{'label':<24}{'support':>8}{'F1':>8}{'ROC-AUC':>9}{'threshold':>11}", "-" * 60]
    for j, name in enumerate(names):
        thr = f"{thresholds[j]:.2f}" if thresholds is not None else "-"
        lines.append(
            f"{name:<24}{int(support[j]):>8}{metrics['f1_per_label'][j]:>8.3f}{auc.get(j, float('nan')):>9.3f}{thr:>11}"
        )
    return "\n".join(lines)


def plot_per_label_f1(names: list[str], f1: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), f1, color="#3b75af")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
