"""Adversarial attacks (FGSM, PGD) and path-based detectors.

Attacks work in pixel space: every pydecouple model takes pixels in [0, 1] and
normalises inside (its first layer is :class:`pydecouple.models.Normalize`), so
an L-infinity ball of radius ``eps`` around an image is a ball in pixel units
(eps = 8/255 is eight grey levels), and adversarial images are clipped to [0, 1].

Detectors (the paper's third application):

* unsupervised: ``1 - similarity(path, template of the predicted class)``; an
  attacked image is classified as c while its path does not look like c's.
* learned: a logistic regression on path features (the non-constant gates and,
  per layer, the path's similarity to the predicted class's template and to the
  nearest template), trained on clean against one attack and tested on held-out
  images against the same or another attack.
* baseline: ``1 - max softmax`` (not a path feature), for comparison.

Evaluation convention (as in LID, Ma et al. 2018, and Mahalanobis, Lee et al.
2018): positives are the attacked versions of correctly classified images that
the attack fooled, negatives the correctly classified clean images; the AUC over
all attacked against all clean images is reported beside it (``auc_all``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .paths import DEFAULT_METRIC, Paths, class_templates, constant_gates, extract_paths, similarity, stratified_halves
from .report import eps_str, jsonable, write_detection

log = logging.getLogger(__name__)

__all__ = [
    "LearnedDetector",
    "TemplateDetector",
    "attack",
    "bernoulli_loglik",
    "detect",
    "detection_metrics",
    "fgsm",
    "path_features",
    "pgd",
]

ATTACKS = ("fgsm", "pgd")
AUTO_CS = (0.001, 0.01, 0.1, 1.0)


# --------------------------------------------------------------------------- attacks


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al., 2015), untargeted, L-infinity.

    ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)``.

    Args:
        model: takes pixels in [0, 1]; used as it is (put it in eval mode first).
        x: (N, C, H, W) clean pixels in [0, 1].
        y: (N,) labels.
        eps: L-infinity radius in pixel units.

    Returns:
        (N, C, H, W) adversarial pixels, within ``eps`` of ``x`` and in [0, 1].
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    g = _input_grad(model, x, y)
    return _project(x.detach() + eps * g.sign(), x.detach(), eps).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float | None = None,
    iters: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al., 2018), untargeted, L-infinity.

    ``iters`` signed-gradient steps of size ``step`` (default ``2.5 * eps / iters``,
    Madry's choice), each followed by projection onto the eps-ball around ``x``
    and onto [0, 1]; optionally from a uniform random start inside the ball.

    Returns:
        (N, C, H, W) adversarial pixels, within ``eps`` of ``x`` and in [0, 1].
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    step = 2.5 * eps / iters if step is None else step
    x = x.detach()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x_adv = _project(x + (2 * noise - 1) * eps, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(iters):
        g = _input_grad(model, x_adv, y)
        x_adv = _project(x_adv + step * g.sign(), x, eps).detach()
    return x_adv


def attack(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    method: str = "fgsm",
    eps: float = 8 / 255,
    batch_size: int = 128,
    progress: bool = True,
    seed: int = 0,
    **kw: Any,
) -> torch.Tensor:
    """Attack a whole set in batches (model in eval mode); returns CPU float32 pixels.

    ``kw`` goes to :func:`pgd` (``step``, ``iters``, ``random_start``).
    """
    from tqdm.auto import tqdm

    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}; choose one of {ATTACKS}")
    x_all = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32)
    y_all = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.int64)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in tqdm(range(0, x_all.shape[0], batch_size), desc=method, disable=not progress, leave=False):
            xb = x_all[s : s + batch_size].to(device)
            yb = y_all[s : s + batch_size].to(device)
            if method == "fgsm":
                adv = fgsm(model, xb, yb, eps)
            else:
                adv = pgd(model, xb, yb, eps, generator=gen, **kw)
            out.append(adv.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else x_all.clone()


# --------------------------------------------------------------------------- metrics


def detection_metrics(clean_scores: np.ndarray, adv_scores: np.ndarray, fpr_at: float = 0.05) -> dict[str, Any]:
    """ROC-AUC and detection rate at ``fpr_at`` false positives; higher score = more suspicious.

    The detection rate is the largest true positive rate whose false positive rate
    on the clean scores does not exceed ``fpr_at``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    c = np.asarray(clean_scores, float)
    a = np.asarray(adv_scores, float)
    if len(c) == 0 or len(a) == 0:
        return {"auc": float("nan"), "tpr_at_5fpr": float("nan"), "n_clean": len(c), "n_adv": len(a),
                "fpr": [], "tpr": []}
    y = np.r_[np.zeros(len(c)), np.ones(len(a))]
    s = np.r_[c, a]
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= fpr_at + 1e-12
    return {
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_5fpr": float(tpr[ok].max()) if ok.any() else 0.0,
        "n_clean": len(c),
        "n_adv": len(a),
        "fpr": fpr,
        "tpr": tpr,
    }


# --------------------------------------------------------------------------- detectors


class TemplateDetector:
    """Unsupervised: score = 1 - similarity(path, template of the predicted class).

    Args:
        metric: similarity (see :func:`pydecouple.paths.similarity`).
        exclude_constant: leave out gates that never change over the reference paths.
    """

    def __init__(self, metric: str = DEFAULT_METRIC, exclude_constant: bool = True) -> None:
        self.metric = metric
        self.exclude_constant = exclude_constant
        self.templates: np.ndarray | None = None
        self.keep: np.ndarray | None = None

    def fit(self, ref: Paths, num_classes: int | None = None) -> TemplateDetector:
        t, _ = class_templates(ref, num_classes)
        self.templates = np.nan_to_num(t)
        self.keep = constant_gates(ref)["keep"] if self.exclude_constant else None
        if self.keep is not None and not self.keep.any():
            log.warning("every gate is constant over the reference set: the template score cannot separate anything")
            self.keep = None
        return self

    def score(self, paths: Paths) -> np.ndarray:
        if self.templates is None:
            raise RuntimeError("fit the detector first")
        sims = similarity(paths.flat(), self.templates, self.metric, self.keep)
        pred = np.clip(paths.preds, 0, self.templates.shape[0] - 1)
        return 1.0 - sims[np.arange(paths.n), pred]


def bernoulli_loglik(paths: np.ndarray, templates: np.ndarray, floor: float = 0.01) -> np.ndarray:
    """(N, K) mean per-gate log-likelihood of binary paths (N, D) under each template (K, D)
    read as independent Bernoulli probabilities, clipped to [floor, 1 - floor]."""
    t = np.clip(np.nan_to_num(np.asarray(templates, np.float64), nan=0.5), floor, 1 - floor)
    p = np.asarray(paths, np.float64)
    d = max(p.shape[1], 1)
    return (p @ np.log(t).T + (1 - p) @ np.log1p(-t).T) / d


def path_features(paths: Paths, templates: np.ndarray, keep: np.ndarray | None, metric: str = DEFAULT_METRIC) -> np.ndarray:
    """(N, F) features of a path: its non-constant gates, then per layer

    * its similarity to the predicted class's template, to the nearest template,
      their difference, and the rank of the predicted class's template (0 = nearest);
    * the same three for the mean Bernoulli log-likelihood of the path under each
      template (templates clipped to [0.01, 0.99]): how probable this exact on/off
      pattern is for the predicted class, against the most likely class;
    * the fraction of the layer's gates that are on.
    """
    flat = paths.flat()
    keep = np.ones(flat.shape[1], bool) if keep is None else np.asarray(keep, bool)
    feats = [flat[:, keep].astype(np.float32)]
    pred = np.clip(paths.preds, 0, templates.shape[0] - 1)
    rows = np.arange(paths.n)
    off = paths.offsets
    for li in range(len(paths.layers)):
        sl = slice(off[li], off[li + 1])
        kl = keep[sl]
        if not kl.any():
            continue
        s = similarity(flat[:, sl], templates[:, sl], metric, kl)
        own = s[rows, pred]
        best = s.max(1)
        rank = (s > own[:, None]).sum(1)
        ll = bernoulli_loglik(flat[:, sl][:, kl], templates[:, sl][:, kl])
        ll_own = ll[rows, pred]
        ll_best = ll.max(1)
        kept = flat[:, sl].mean(1)
        feats.append(np.stack([own, best, best - own, rank, ll_own, ll_best, ll_best - ll_own, kept], 1)
                     .astype(np.float32))
    return np.concatenate(feats, 1)


def _choose_C(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The ``AUTO_CS`` value with the best 3-fold cross-validated ROC-AUC on (x, y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_min = int(min((y == 0).sum(), (y == 1).sum()))
    if n_min < 2:
        return 0.1
    folds = list(StratifiedKFold(n_splits=min(3, n_min), shuffle=True, random_state=seed).split(x, y))
    best, best_auc = AUTO_CS[0], -1.0
    for c in AUTO_CS:
        aucs = []
        for tr, va in folds:
            m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced"))
            m.fit(x[tr], y[tr])
            aucs.append(roc_auc_score(y[va], m.predict_proba(x[va])[:, 1]))
        if np.mean(aucs) > best_auc:
            best, best_auc = c, float(np.mean(aucs))
    return float(best)


class LearnedDetector:
    """Logistic regression (standardised inputs) on path features.

    Args:
        C: inverse L2 strength of the logistic regression, or ``"auto"`` (default):
            chosen by 3-fold cross-validated ROC-AUC on the training data only,
            from ``AUTO_CS``.
        metric: similarity used in the template features.
        features: ``"path"`` (default: :func:`path_features`, from the binary path
            only) or ``"logits"`` (those features plus the gate logits whose sign is
            the path: more information than the path itself, reported as a separate
            detector).
    """

    def __init__(self, C: float | str = "auto", metric: str = DEFAULT_METRIC, seed: int = 0, features: str = "path") -> None:
        if features not in ("path", "logits"):
            raise ValueError(f"features must be 'path' or 'logits', got {features!r}")
        self.C, self.metric, self.seed, self.kind = C, metric, seed, features
        self.chosen_C: float | None = None if C == "auto" else float(C)
        self.templates: np.ndarray | None = None
        self.keep: np.ndarray | None = None
        self.clf = None

    def set_templates(self, ref: Paths, num_classes: int | None = None) -> LearnedDetector:
        t, _ = class_templates(ref, num_classes)
        self.templates = np.nan_to_num(t)
        keep = constant_gates(ref)["keep"]
        self.keep = keep if keep.any() else None
        return self

    def features(self, paths: Paths) -> np.ndarray:
        if self.kind == "logits" and paths.logits is None:
            raise ValueError("these paths carry no gate logits (the gate modules expose no .last_logits)")
        if self.templates is None:
            raise RuntimeError("call set_templates first")
        feats = path_features(paths, self.templates, self.keep, self.metric)
        if self.kind == "logits":
            feats = np.concatenate([feats] + [g.astype(np.float32) for g in paths.logits], axis=1)
        return feats

    def fit(self, clean: Paths, adv: Paths) -> LearnedDetector:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if clean.n == 0 or adv.n == 0:
            raise ValueError(f"need clean and attacked samples to fit, got {clean.n} and {adv.n}")
        x = np.concatenate([self.features(clean), self.features(adv)])
        y = np.r_[np.zeros(clean.n), np.ones(adv.n)]
        C = _choose_C(x, y, self.seed) if self.C == "auto" else float(self.C)
        self.chosen_C = C
        lr = LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=self.seed)
        self.clf = make_pipeline(StandardScaler(), lr)
        self.clf.fit(x, y)
        return self

    def score(self, paths: Paths) -> np.ndarray:
        if self.clf is None:
            raise RuntimeError("fit the detector first")
        if paths.n == 0:
            return np.zeros(0)
        return self.clf.predict_proba(self.features(paths))[:, 1]


# --------------------------------------------------------------------------- the experiment


def _strip_curve(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("fpr", "tpr")}


def detect(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    out_dir: str,
    eps: float = 8 / 255,
    attacks: Sequence[str] = ATTACKS,
    pgd_iters: int = 10,
    pgd_step: float | None = None,
    random_start: bool = True,
    ref_images: torch.Tensor | np.ndarray | None = None,
    ref_labels: torch.Tensor | np.ndarray | None = None,
    metric: str = DEFAULT_METRIC,
    C: float | str = "auto",
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    plots: bool = True,
    save_paths: str | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Attack ``images`` with each attack, score clean and attacked paths, write a report.

    ``images`` is split into two class-balanced halves: the learned detector is fit
    on one (clean against attacked) and every detector is evaluated on the other.
    Templates come from ``ref_images`` (e.g. the training split) or, without them,
    from the clean fit half.

    ``save_paths``: a folder to keep the clean, reference and attacked paths in
    (``paths_<name>.npz``, :meth:`Paths.load`), to study detectors without attacking again.

    Returns:
        the report dict (also written to ``out_dir/report.json``), with per attack its
        accuracy and success rate, and per detector ROC-AUC and detection rate at 5% FPR.
    """
    attacks = list(attacks)
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; choose from {ATTACKS}")
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.int64)
    ynp = y.numpy()
    fit_idx, test_idx = stratified_halves(ynp, seed)
    k = int(ynp.max()) + 1 if ref_labels is None else int(max(ynp.max(), np.asarray(ref_labels).max())) + 1
    pgd_kw = {"iters": pgd_iters, "step": pgd_step, "random_start": random_start}

    clean = extract_paths(model, x, y, batch_size, progress=progress, desc="paths clean")
    if ref_images is not None:
        ref = extract_paths(model, ref_images, ref_labels, batch_size, progress=progress, desc="paths ref")
        template_source = f"{ref.n} reference images"
    else:
        ref = clean.subset(fit_idx)
        template_source = f"the {ref.n} clean images of the fit half"
    adv_paths: dict[str, Paths] = {}
    for i, a in enumerate(attacks):
        xa = attack(model, x, y, a, eps, batch_size, progress, seed=seed + i, **(pgd_kw if a == "pgd" else {}))
        delta = float((xa - x).abs().max()) if xa.numel() else 0.0
        if delta > eps + 1e-5:  # a guard on the library's own promise
            raise AssertionError(f"{a}: perturbation {delta} exceeds eps {eps}")
        adv_paths[a] = extract_paths(model, xa, y, batch_size, progress=progress, desc=f"paths {a}")

    if save_paths:
        os.makedirs(save_paths, exist_ok=True)
        for name, pth in [("clean", clean), ("ref", ref), *adv_paths.items()]:
            pth.save(os.path.join(save_paths, f"paths_{name}.npz"))
        np.savez(os.path.join(save_paths, "split.npz"), fit=fit_idx, test=test_idx)
    ok = clean.correct

    def pos_neg(adv: Paths, idx: np.ndarray, successful: bool) -> tuple[Paths, Paths]:
        if successful:
            neg = idx[ok[idx]]
            pos = idx[ok[idx] & ~adv.correct[idx]]
        else:
            neg = pos = idx
        return clean.subset(neg), adv.subset(pos)

    report: dict[str, Any] = {
        "run": dict(info or {}),
        "eps": eps,
        "eps_str": eps_str(eps),
        "attacks": {},
        "pgd": {"iters": pgd_iters, "step": pgd_step if pgd_step is not None else 2.5 * eps / pgd_iters,
                "random_start": random_start},
        "metric": metric,
        "n_images": len(ynp),
        "n_fit": len(fit_idx),
        "n_test": len(test_idx),
        "templates_from": template_source,
        "clean_accuracy": float(ok[test_idx].mean()),
        "convention": "positives: successful attacks on correctly classified images; negatives: those clean images",
        "detectors": {"unsupervised": {}, "max_softmax": {}, "learned": {}},
    }
    for a in attacks:
        adv = adv_paths[a]
        okt = ok[test_idx]
        report["attacks"][a] = {
            "accuracy": float(adv.correct[test_idx].mean()),
            "success_rate": float((~adv.correct[test_idx][okt]).mean()) if okt.any() else float("nan"),
            "max_perturbation": eps,
        }

    curves: dict[str, dict[str, dict[str, Any]]] = {a: {} for a in attacks}
    unsup = TemplateDetector(metric).fit(ref, k)
    hist_scores: dict[str, np.ndarray] = {}
    for a in attacks:
        cn, ad = pos_neg(adv_paths[a], test_idx, True)
        cn_all, ad_all = pos_neg(adv_paths[a], test_idx, False)
        m = detection_metrics(unsup.score(cn), unsup.score(ad))
        m_all = detection_metrics(unsup.score(cn_all), unsup.score(ad_all))
        report["detectors"]["unsupervised"][a] = {**_strip_curve(m), "auc_all": m_all["auc"], "tpr_at_5fpr_all": m_all["tpr_at_5fpr"]}
        curves[a]["unsupervised (template similarity)"] = m
        hist_scores.setdefault("clean (correct)", unsup.score(cn))
        hist_scores[f"{a} (successful)"] = unsup.score(ad)
        # baseline: 1 - max softmax
        bs = lambda p: 1.0 - p.probs.max(1) if p.probs is not None else np.zeros(p.n)
        mb = detection_metrics(bs(cn), bs(ad))
        mb_all = detection_metrics(bs(cn_all), bs(ad_all))
        report["detectors"]["max_softmax"][a] = {**_strip_curve(mb), "auc_all": mb_all["auc"], "tpr_at_5fpr_all": mb_all["tpr_at_5fpr"]}
        curves[a]["baseline 1 - max softmax"] = mb

    kinds = ["path"] + (["logits"] if clean.logits is not None else [])
    for kind in kinds:
        key = "learned" if kind == "path" else "learned_logits"
        report["detectors"].setdefault(key, {})
        for a_train in attacks:
            cn_f, ad_f = pos_neg(adv_paths[a_train], fit_idx, True)
            entry: dict[str, Any] = {}
            if cn_f.n < 2 or ad_f.n < 2:
                log.warning("%s: too few successful attacks in the fit half (%d) to train a detector", a_train, ad_f.n)
                report["detectors"][key][f"trained_on_{a_train}"] = {"error": "too few successful attacks to train"}
                continue
            det = LearnedDetector(C=C, metric=metric, seed=seed, features=kind).set_templates(ref, k).fit(cn_f, ad_f)
            for a_test in attacks:
                cn, ad = pos_neg(adv_paths[a_test], test_idx, True)
                cn_all, ad_all = pos_neg(adv_paths[a_test], test_idx, False)
                m = detection_metrics(det.score(cn), det.score(ad))
                m_all = detection_metrics(det.score(cn_all), det.score(ad_all))
                entry[a_test] = {**_strip_curve(m), "auc_all": m_all["auc"], "tpr_at_5fpr_all": m_all["tpr_at_5fpr"]}
                if kind == "path" or a_test == a_train:
                    label = "learned on paths" if kind == "path" else "learned on paths + gate logits"
                    curves[a_test][f"{label}, trained on {a_train.upper()}"] = m
            entry["C"] = det.chosen_C
            report["detectors"][key][f"trained_on_{a_train}"] = entry

    # the headline: learned detector trained and tested on the same attack (held-out images)
    headline = {}
    for a in attacks:
        e = report["detectors"]["learned"].get(f"trained_on_{a}", {}).get(a, {})
        headline[a] = {
            "learned_auc": e.get("auc", float("nan")),
            "learned_tpr_at_5fpr": e.get("tpr_at_5fpr", float("nan")),
            "learned_cross_auc": {
                kk.split("_on_")[1]: v.get(a, {}).get("auc", float("nan"))
                for kk, v in report["detectors"]["learned"].items() if kk != f"trained_on_{a}"
            },
            "learned_logits_auc": report["detectors"].get("learned_logits", {}).get(f"trained_on_{a}", {}).get(a, {}).get("auc", float("nan")),
            "unsupervised_auc": report["detectors"]["unsupervised"][a]["auc"],
            "max_softmax_auc": report["detectors"]["max_softmax"][a]["auc"],
            "success_rate": report["attacks"][a]["success_rate"],
        }
    report["headline"] = headline

    if plots:
        write_detection(out_dir, report, curves, hist_scores)
    return jsonable(report)
