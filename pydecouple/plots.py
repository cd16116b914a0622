"""Pictures of paths and detectors (matplotlib, Agg backend, PNG).

Each function takes plain arrays, writes one PNG and returns its path. Figures
are sized to stay small (well under 300 KB) while keeping class names readable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "filter_class_frequency",
    "kept_fraction_plot",
    "path_projection",
    "pca_2d",
    "roc_plot",
    "score_histogram",
    "separability_plot",
    "similarity_heatmap",
]

DPI = 110


def _save(fig: plt.Figure, path: str) -> str:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _short(layers: Sequence[str]) -> list:
    """Layer names short enough for an axis: the gate's parent layer (``features.3.gate`` -> ``features.3``),
    dropping a common prefix only when names are long."""
    names = [str(n).removesuffix(".gate") for n in layers]
    if len(names) > 1 and max(len(n) for n in names) > 18:
        pre = os.path.commonprefix(names)
        cut = pre.rfind(".") + 1
        names = [n[cut:] or n for n in names]
    return [n if len(n) <= 18 else "…" + n[-17:] for n in names]


def similarity_heatmap(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str,
    title: str = "Class template similarity",
    xlabel: str = "class",
    ylabel: str = "class",
) -> str:
    """(K, K) similarity matrix as an annotated heat map."""
    m = np.asarray(matrix, dtype=float)
    k = m.shape[0]
    size = max(4.5, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    off = m[~np.eye(k, dtype=bool)] if k > 1 else m.ravel()
    vmin = float(np.nanmin(off)) if off.size else 0.0
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=float(np.nanmax(m)))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if k <= 20:
        mid = (vmin + np.nanmax(m)) / 2
        for i in range(k):
            for j in range(k):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity")
    return _save(fig, path)


def filter_class_frequency(
    freq: np.ndarray, class_names: Sequence[str], path: str, layer_name: str = "", max_filters: int = 256
) -> str:
    """(K, C) frequency each filter of one layer is on for each class.

    Filters are ordered by the class that uses them most, then by that frequency,
    so class-specific blocks show along a staircase.
    """
    f = np.asarray(freq, dtype=float)
    k, c = f.shape
    best = f.argmax(0)
    gap = np.sort(f, 0)[-1] - (np.sort(f, 0)[-2] if k > 1 else 0)
    # filters no class prefers (gap < 0.05: shared or constant) go last, by how often they are on
    group = np.where(gap >= 0.05, best, k)
    order = np.lexsort((-f.mean(0), -gap, group))[:max_filters]
    fig, ax = plt.subplots(figsize=(min(12, 3 + 0.05 * len(order) + 2), max(3.2, 0.35 * k + 1.5)))
    im = ax.imshow(f[:, order], aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(k))
    ax.set_yticklabels(class_names)
    ax.set_xlabel(f"filter (grouped by the class using it most, shared ones last; {len(order)} of {c})")
    ax.set_ylabel("class")
    ax.set_title(f"How often each filter is on, per class — layer {layer_name}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="fraction of the class's samples")
    return _save(fig, path)


def kept_fraction_plot(kept: np.ndarray, class_names: Sequence[str], layers: Sequence[str], path: str) -> str:
    """(K, L) kept fraction per class and layer: one line per class."""
    kept = np.asarray(kept, dtype=float)
    k, n_layers = kept.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * n_layers + 3), 4))
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    x = np.arange(n_layers)
    for c in range(k):
        ax.plot(x, kept[c], marker="o", ms=3, lw=1.2, color=cmap(c % cmap.N), label=class_names[c])
    ax.set_xticks(x)
    ax.set_xticklabels(_short(layers), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("gated layer")
    ax.set_ylabel("fraction of filters kept")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Kept fraction per layer and class", fontsize=10)
    ax.legend(fontsize=7, ncol=1 if k <= 10 else 2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def separability_plot(sep: Mapping[str, Any], path: str) -> str:
    """Nearest-template accuracy from the path up to each layer and from each layer alone."""
    layers = list(sep["layers"])
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(layers) + 3), 4))
    ax.plot(x, sep["cumulative"], marker="o", label="path up to this layer")
    ax.plot(x, sep["single"], marker="s", ls="--", label="this layer alone")
    ax.axhline(sep["network"], color="k", lw=1, label=f"network accuracy ({sep['network']:.1%})")
    ax.axhline(0.7 * sep["network"], color="k", lw=0.8, ls=":", label="70% of the network's accuracy")
    ax.axhline(sep["chance"], color="grey", lw=1, ls="-.", label=f"chance ({sep['chance']:.0%})")
    ax.set_xticks(x)
    ax.set_xticklabels(_short(layers), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("gated layer")
    ax.set_ylabel("nearest-template accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"Where paths become class-specific ({sep.get('metric', '')} similarity)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def pca_2d(flat: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) PCA coordinates (scikit-learn ``PCA``) and the two explained-variance ratios; zeros if nothing varies."""
    from sklearn.decomposition import PCA

    x = np.asarray(flat, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] >= 2 and x.shape[0] >= 3 and np.ptp(x, axis=0).any():
        pca = PCA(n_components=2, random_state=seed)
        return pca.fit_transform(x), np.asarray(pca.explained_variance_ratio_)
    return np.zeros((x.shape[0], 2)), np.zeros(2)


def path_projection(
    flat: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str, seed: int = 0, max_points: int = 3000
) -> str:
    """2-D PCA projection (scikit-learn ``PCA``, two components) of sample paths, coloured by class."""
    x = np.asarray(flat, dtype=np.float32)
    labels = np.asarray(labels)
    if x.shape[0] > max_points:
        idx = np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False)
        x, labels = x[idx], labels[idx]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    z, ev = pca_2d(x, seed)
    if ev.sum() > 0:
        ax.set_xlabel(f"PC 1 ({ev[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({ev[1]:.0%} of variance)")
    else:
        ax.set_xlabel("PC 1 (paths do not vary)")
        ax.set_ylabel("PC 2")
    k = len(class_names)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    jitter = np.random.default_rng(seed).normal(0, 0.01 * (np.ptp(z) + 1e-9), z.shape)
    z = z + jitter  # binary paths stack on identical points; a little jitter shows the mass
    for c in range(k):
        sel = labels == c
        if sel.any():
            ax.scatter(z[sel, 0], z[sel, 1], s=5, alpha=0.5, color=cmap(c % cmap.N), label=class_names[c],
                       rasterized=True)
    ax.set_title("Sample paths, PCA of the non-constant gates", fontsize=10)
    ax.legend(fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def roc_plot(curves: Mapping[str, dict[str, Any]], path: str, title: str = "Adversarial detection ROC") -> str:
    """ROC curves: ``{label: {"fpr": [...], "tpr": [...], "auc": float}}``."""
    fig, ax = plt.subplots(figsize=(5.8, 5))
    for label, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], lw=1.5, label=f"{label} (AUC {c['auc']:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    ax.axvline(0.05, color="k", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("detection rate (attacked flagged)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def score_histogram(
    scores: Mapping[str, np.ndarray], path: str, xlabel: str = "score", title: str = "Detector scores"
) -> str:
    """Overlaid histograms of a detector's score for clean and attacked inputs."""
    fig, ax = plt.subplots(figsize=(6, 4))
    allv = np.concatenate([np.asarray(v, float) for v in scores.values() if len(v)]) if scores else np.zeros(1)
    bins = np.linspace(np.nanmin(allv), np.nanmax(allv) + 1e-9, 40)
    for label, v in scores.items():
        ax.hist(np.asarray(v, float), bins=bins, alpha=0.45, density=True, label=f"{label} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
