"""Writing the reports of the path analysis and of the detection experiment.

The method (:mod:`pydecouple.paths`, :mod:`pydecouple.adversarial`) computes
every figure into a report dict; this module turns one into pictures
(:mod:`pydecouple.plots`), ``report.json`` and ``report.md`` (each picture with
one sentence). It also holds the small formatting helpers the command line
shares (:func:`pct`, :func:`num`, :func:`jsonable`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import plots as P

__all__ = ["eps_str", "jsonable", "num", "pct", "write_analysis", "write_detection", "write_report"]


def jsonable(o: Any) -> Any:
    """``o`` with numpy scalars and arrays as Python values and non-finite floats as None (JSON has no NaN)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return None if not np.isfinite(v) else round(v, 6)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return o


def write_report(out_dir: str, title: str, report: dict[str, Any], figures: Sequence[tuple[str, str]], intro: str = "") -> None:
    """Write ``report.json`` (every figure) and ``report.md`` (each picture with one sentence)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(jsonable(report), f, indent=2)
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    run = report.get("run") or {}
    if run.get("checkpoint"):
        settings = ", ".join(f"{k}={v}" for k, v in (run.get("train_args") or {}).items())
        lines += [f"Computed from `{run['checkpoint']}` ({run.get('arch')}, decoupled={run.get('decoupled')}"
                  + (f"; trained with {settings}" if settings else "") + f") on `{run.get('data')}`.", ""]
    for png, sentence in figures:
        lines += [f"![{os.path.splitext(png)[0]}]({png})", "", sentence, ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))


def pct(v: float, digits: int = 1) -> str:
    """A fraction as a percentage, or 'n/a' where there is nothing to measure."""
    return f"{v:.{digits}%}" if v is not None and np.isfinite(float(v)) else "n/a"


def num(v: float) -> str:
    return f"{v:.2f}" if v is not None and np.isfinite(float(v)) else "n/a"


def eps_str(eps: float) -> str:
    """An L-inf radius in grey levels where it is one (``8/255``), else as a number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def _pairs_sentence(tsim: np.ndarray, pairs: list[dict[str, Any]], metric: str) -> str:
    k = tsim.shape[0]
    if k < 2 or not pairs:
        return f"Template similarity between classes ({metric})."
    off = tsim[~np.eye(k, dtype=bool)]
    lo, hi = float(np.nanmin(off)), float(np.nanmax(off))
    listed = ", ".join(f"{p['a']}-{p['b']} ({p['similarity']:.2f})" for p in pairs[:4])
    if hi - lo < 0.05:
        return (f"Class templates are nearly identical ({metric} between classes from {lo:.2f} to {hi:.2f}), so the "
                f"ranking of the most similar pairs ({listed}) means little.")
    return (f"Template similarity between classes ({metric}, from {lo:.2f} to {hi:.2f} off the diagonal); the most "
            f"similar pairs are {listed}.")


def _centroid_accuracy(z: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the nearest class centre in a low-dimensional embedding (fit and scored on the same points)."""
    classes = np.unique(labels)
    if len(classes) < 2 or len(z) == 0:
        return float("nan")
    centres = np.stack([z[labels == c].mean(0) for c in classes])
    d = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == labels).mean())


def write_analysis(out_dir: str, report: dict[str, Any], paths, ref_paths, templates: np.ndarray, keep: np.ndarray,
                   specific: Sequence[dict[str, Any]], seed: int = 0) -> None:
    """The pictures, ``report.md`` and ``report.json`` of
    :func:`pydecouple.paths.analyze`, from its report dict (before
    :func:`jsonable`), the held-out and reference :class:`~pydecouple.paths.Paths`,
    the class templates, the non-constant gates and every class-specific
    filter. Adds ``pca_2d`` (the 2-D projection's figures) and ``figures`` to
    ``report``."""
    class_names, metric = report["class_names"], report["metric"]
    k = len(class_names)
    tsim, st, sep = report["template_similarity"], report["sample_template_similarity"], report["separability"]
    kept, cvw, pairs = report["kept_fraction_per_class"], report["correct_vs_wrong"], report["top_similar_pairs"]
    own_col = report["own_template_most_similar_to_own_samples"]
    own_row = report["own_samples_closest_to_own_template"]
    margin = report["class_specific_filters"]["margin"]
    const = report["constant_gates"]
    layer = paths.layers.index(report["filter_plot_layer"])
    figures: list[tuple[str, str]] = []
    os.makedirs(out_dir, exist_ok=True)
    P.similarity_heatmap(tsim, class_names, os.path.join(out_dir, "template_similarity.png"),
                         title=f"Class template similarity ({metric}, constant gates excluded)")
    figures.append((
        "template_similarity.png",
        _pairs_sentence(tsim, pairs, metric),
    ))
    P.similarity_heatmap(st, class_names, os.path.join(out_dir, "sample_template_similarity.png"),
                         title=f"Mean similarity of samples (rows) to templates (columns), {metric}",
                         xlabel="template of class", ylabel="samples of class")
    figures.append((
        "sample_template_similarity.png",
        (f"For {sum(own_col)} of {k} classes the template is more similar to its own class's samples than to any other "
        f"class's (column maxima on the diagonal); for {sum(own_row)} of {k} classes the samples are closest, on "
        "average, to their own template (row maxima)."),
    ))
    lo = paths.offsets[layer]
    hi = paths.offsets[layer + 1]
    P.filter_class_frequency(np.nan_to_num(templates[:, lo:hi]), class_names,
                             os.path.join(out_dir, "filter_frequency.png"), layer_name=paths.layers[layer])
    n_spec_layer = sum(f["layer_index"] == layer for f in specific)
    figures.append((
        "filter_frequency.png",
        (f"How often each filter of layer `{paths.layers[layer]}` is on, per class (filters sorted by the class that "
        f"uses them most); {n_spec_layer} of its {hi - lo} filters are specific to one class at margin {margin} "
        f"({len(specific)} in the whole network)."),
    ))
    P.kept_fraction_plot(kept, class_names, paths.layers, os.path.join(out_dir, "kept_fraction.png"))
    kf = paths.kept_fraction()
    figures.append((
        "kept_fraction.png",
        (f"Fraction of filters kept per layer and class: from {kf.min():.2f} to {kf.max():.2f} across layers, and "
        f"classes differ by at most {np.nanmax(np.nanmax(kept, 0) - np.nanmin(kept, 0)):.2f} within a layer."),
    ))
    P.separability_plot(sep, os.path.join(out_dir, "separability.png"))
    single = np.asarray(sep["single"], dtype=float)
    best_txt = (
        f"the best single layer is `{paths.layers[int(np.nanargmax(single))]}` at {np.nanmax(single):.1%}"
        if np.isfinite(single).any() else "no layer has a gate that varies"
    )
    figures.append((
        "separability.png",
        (f"Nearest-template accuracy from the path up to each layer: {pct(sep['full'])} with all layers against the "
        f"network's {pct(sep['network'])} ({pct(sep['ratio'], 0)} of it; chance {pct(sep['chance'], 0)}); "
        f"{best_txt}."),
    ))
    flat_keep = paths.flat()[:, keep] if keep.any() else paths.flat()
    P.path_projection(flat_keep, paths.labels, class_names, os.path.join(out_dir, "path_pca.png"), seed=seed)
    z, ev = P.pca_2d(flat_keep, seed)
    acc2d = _centroid_accuracy(z, paths.labels)
    report["pca_2d"] = {"explained_variance": ev, "nearest_centre_accuracy": acc2d}
    figures.append((
        "path_pca.png",
        (f"PCA (scikit-learn, first two components of the non-constant gates; {pct(float(np.sum(ev)), 0)} of the "
        f"variance) of the held-out paths coloured by true class: a nearest-class-centre rule in these two "
        f"dimensions gets {pct(acc2d)} (chance {pct(1 / k, 0)}), so "
        + ("classes form visible groups." if acc2d > 0.5 else
           "classes separate only partly in two dimensions." if acc2d > 2 / k else
           "classes overlap heavily in two dimensions.")),
    ))
    intro = (
        f"Templates from {ref_paths.n} reference samples, measured on {paths.n} held-out samples; "
        f"{paths.num_gates} gates in {len(paths.layers)} layers, of which {const['fraction_constant']:.0%} never "
        f"change over the reference set (left out of the similarities). Network accuracy {paths.accuracy():.1%}, "
        f"nearest-template accuracy {pct(sep['full'])} ({metric}). Mean similarity of a path to its predicted "
        f"class's template: {num(cvw['sim_to_pred_template_correct'])} for right predictions, "
        f"{num(cvw['sim_to_pred_template_wrong'])} for wrong ones."
    )
    report["figures"] = [{"png": p, "sentence": s} for p, s in figures]
    write_report(out_dir, "Path-level interpretation", report, figures, intro)


def write_detection(out_dir: str, report: dict[str, Any], curves: dict[str, dict[str, dict[str, Any]]],
                    hist_scores: dict[str, np.ndarray]) -> None:
    """The pictures, ``report.md`` and ``report.json`` of
    :func:`pydecouple.adversarial.detect`, from its report dict (before
    :func:`jsonable`), the ROC curves per attack and detector, and the
    unsupervised scores per group. Adds ``figures`` to ``report``."""
    attacks, eps, metric, headline = list(report["attacks"]), report["eps"], report["metric"], report["headline"]
    pgd_iters, random_start = report["pgd"]["iters"], report["pgd"]["random_start"]
    template_source = report["templates_from"]
    figures: list[tuple[str, str]] = []
    os.makedirs(out_dir, exist_ok=True)
    for a in attacks:
        png = f"roc_{a}.png"
        P.roc_plot(curves[a], os.path.join(out_dir, png),
                   title=f"Detecting {a.upper()} at eps {eps_str(eps)} (held-out half)")
        h = headline[a]
        cross = [kk for kk in report["detectors"]["learned"] if kk != f"trained_on_{a}"]
        cross_txt = ""
        for kk in cross:
            v = report["detectors"]["learned"][kk].get(a, {}).get("auc")
            if v is not None:
                cross_txt += f"; trained on {kk.split('_on_')[1].upper()} instead: {v:.2f}"
        figures.append((
            png,
            (f"{a.upper()} at eps {eps_str(eps)} fools {h['success_rate']:.0%} of correctly classified images; the "
            f"learned path detector reaches ROC-AUC {h['learned_auc']:.2f} (detection rate "
            f"{h['learned_tpr_at_5fpr']:.0%} at 5% false positives){cross_txt}, the unsupervised template score "
            f"{h['unsupervised_auc']:.2f}, one that also sees the gate logits {h['learned_logits_auc']:.2f} and the "
            f"max-softmax baseline {h['max_softmax_auc']:.2f}."),
        ))
    P.score_histogram(hist_scores, os.path.join(out_dir, "unsupervised_scores.png"),
                      xlabel=f"1 - {metric} similarity to the predicted class's template",
                      title="Unsupervised path score, clean vs attacked (held-out half)")
    mean_c = float(np.mean(hist_scores["clean (correct)"])) if len(hist_scores["clean (correct)"]) else math.nan
    figures.append((
        "unsupervised_scores.png",
        (f"The unsupervised score (1 - similarity to the predicted class's template) averages {mean_c:.2f} on clean "
        "images against " + ", ".join(
            f"{float(np.mean(v)) if len(v) else math.nan:.2f} for {kk}" for kk, v in hist_scores.items() if kk != "clean (correct)"
        ) + ": " + ("the distributions overlap heavily." if all(
            report["detectors"]["unsupervised"][a]["auc"] < 0.75 for a in attacks) else "attacked paths sit further from their predicted template.")),
    ))
    report["figures"] = [{"png": p, "sentence": s} for p, s in figures]
    intro = (
        f"{report['n_images']} images split into a fit half ({report['n_fit']}) and a held-out half "
        f"({report['n_test']}); templates from {template_source}; clean accuracy on the held-out half "
        f"{report['clean_accuracy']:.1%}. Attacks: L-inf, eps {eps_str(eps)} in pixel space, PGD "
        f"{pgd_iters} steps of {report['pgd']['step']:.4f}{' from a random start' if random_start else ''}. "
        f"Convention: {report['convention']}."
    )
    write_report(out_dir, "Adversarial detection from paths", report, figures, intro)
