# One concept, one module (just over 500 lines): a probe and the cross-validation that measures it.
"""Linear probes on per-answer features (LoRA scalars or residual-stream activations).

:func:`fit_probe` fits a scikit-learn ``Pipeline(StandardScaler, LogisticRegression)`` and reports
how well it generalises to *unseen questions*:

* Splits are grouped: every row carries a group (its question id) and no group is on both sides
  of a split (``StratifiedGroupKFold``). Rows are responses, never tokens: aggregate per-token
  features first (:meth:`emlens.scalars.TokenScalars.aggregate`).
* The scaler is a pipeline step, so it is fitted inside each training fold only.
* ``C`` is chosen by a grouped inner cross-validation on each training fold (unless given).
* Metrics per fold (accuracy, balanced accuracy, precision, recall, F1, ROC AUC), summarised as
  mean and std across folds, plus 95% intervals for ROC AUC and balanced accuracy from a bootstrap
  over *groups* of the pooled out-of-fold predictions.
* A shuffled-label baseline: the same procedure on permuted labels (chance is AUC 0.5).
* The final model is refitted on all rows; its coefficients (per standardised feature, with
  signs and names) and the scaler are stored in the :class:`Probe`, which saves to JSON.

:meth:`Probe.fit` is the plain alternative: one standardised L2 fit on all rows, no
cross-validation and no metrics (the offline judge's probes are fitted so).

``REFERENCE_PRESET`` reproduces the reference configuration of the EM probe papers: L1 logistic
regression, ``C=0.01``, classes balanced by subsampling, 10 repeated splits. Unlike the reference
code it standardises inside each training fold and splits by question, not by token (the
reference z-scored before splitting and split tokens, which leaks).

The labelled sets probes are fitted on (:func:`emlens.data.context_set`, ``answer_set``,
``judged_set``) live in :mod:`emlens.data`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

METRICS: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc"
)
DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
FALLBACK_C = 1.0  # when the inner folds cannot hold both classes (very few positive groups)
REFERENCE_PRESET: dict[str, Any] = dict(penalty="l1", C=0.01, balance="subsample", n_repeats=10)
FORMAT_VERSION = 1

Features = Float[np.ndarray, "n d"] | Float[Tensor, "n d"] | pd.DataFrame


# --------------------------------------------------------------------------------------------
# Result type


class ProbeWarning(UserWarning):
    """A probe's cross-validation could not use every fold for a metric (see ``Probe.metrics``)."""


@dataclass
class Probe:
    """A fitted linear probe: the final model's numbers and its cross-validated metrics.

    Attributes:
        feature_names: one name per input column.
        mean, scale: the final scaler (``x_std = (x - mean) / scale``).
        coef: logistic-regression weights on standardised features (sign: + pushes to label 1).
        intercept: bias on standardised features.
        C: regularisation of the final model.
        metrics: ``{metric: {"mean", "std", "low", "high", "n_folds", "n_folds_total"}}`` across
            folds (low/high: 95% group bootstrap of the pooled out-of-fold predictions, for
            roc_auc and balanced_accuracy). A test fold with one class has no roc_auc or
            balanced accuracy: ``n_folds`` counts the folds a metric averages, and
            ``metrics["roc_auc"]["n_folds_one_class"]`` the folds left out (fit_probe warns).
        baseline: the same for shuffled labels (empty if ``n_shuffles=0``).
        folds: per-fold rows (repeat, fold, C, n_train, n_test and every metric).
        config: how it was fitted (penalty, balance, n_splits, n_repeats, seed, class counts...).
    """

    feature_names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    C: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    folds: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def decision_function(self, features: Features) -> Float[np.ndarray, " n"]:
        """Logit of label 1 for each row."""
        x = _as_array(features, "features")
        if x.shape[1] != len(self.coef):
            raise ValueError(
                f"features have {x.shape[1]} columns; this probe was fitted on {len(self.coef)} "
                f"({self.feature_names[:5]}...)."
            )
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def predict_proba(self, features: Features) -> Float[np.ndarray, " n"]:
        """Probability of label 1 for each row."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(features)))

    def coefficients(self) -> pd.DataFrame:
        """Per-feature weights sorted by magnitude: ``feature, coef, sign, abs, raw_coef``.

        ``coef`` is per standard deviation of the feature; ``raw_coef`` per unit of the raw
        feature.
        """
        coef = np.asarray(self.coef)
        df = pd.DataFrame({
            "feature": self.feature_names,
            "coef": coef,
            "sign": np.where(coef > 0, "+", np.where(coef < 0, "-", "0")),
            "abs": np.abs(coef),
            "raw_coef": coef / np.asarray(self.scale),
        })
        return df.sort_values("abs", ascending=False, kind="stable").reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Metrics and shuffled-label baseline side by side, one row per metric."""
        rows = []
        for m in METRICS:
            r = {"metric": m, **self.metrics.get(m, {})}
            r.update({f"baseline_{k}": v for k, v in self.baseline.get(m, {}).items()})
            rows.append(r)
        return pd.DataFrame(rows).set_index("metric")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as JSON (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": "emlens.probe", "version": FORMAT_VERSION,
                                    **asdict(self)}, indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Probe:
        """Read a probe written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != "emlens.probe":
            raise ValueError(f"{path} is not an emlens probe file (no 'format': 'emlens.probe').")
        version = data.pop("version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has probe format version {version}; expected {FORMAT_VERSION}.")
        return cls(**data)

    @classmethod
    def fit(
        cls, features: Features, labels: Sequence[int] | Sequence[bool] | np.ndarray | Tensor, *,
        C: float = 1.0, feature_names: Sequence[str] | None = None, scale_eps: float = 1e-6,
    ) -> Probe:
        """One standardised L2 logistic regression on all rows, without cross-validation.

        Standardises with the rows' mean and population std plus ``scale_eps`` (a constant
        feature gets scale ``scale_eps``), then fits scikit-learn's
        ``LogisticRegression(C=C, class_weight="balanced", max_iter=5000)`` (lbfgs) in float64.
        ``metrics``, ``baseline`` and ``folds`` stay empty: for how well a probe generalises to
        unseen questions use :func:`fit_probe`. The offline judge's probes
        (:class:`emlens.judge.ProbeJudge`) are fitted this way.
        """
        if len(labels) == 0:
            raise ValueError("no rows to fit on; a probe needs both classes.")
        x, y, _, names = _check_inputs(features, labels, None, feature_names)
        mean = x.mean(0)
        scale = x.std(0) + scale_eps
        lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
        lr.fit((x - mean) / scale, y)
        config = dict(method="single_fit", penalty="l2", solver="lbfgs", balance="weight",
                      scale_eps=scale_eps, n_rows=len(y), n_positive=int(y.sum()),
                      n_negative=int(len(y) - y.sum()))
        return cls(feature_names=names, mean=mean.tolist(), scale=scale.tolist(),
                   coef=lr.coef_[0].tolist(), intercept=float(lr.intercept_[0]), C=float(C),
                   config=config)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# Validation


def _as_array(features: Features, name: str) -> np.ndarray:
    if isinstance(features, pd.DataFrame):
        x = features.to_numpy(dtype=np.float64)
    elif isinstance(features, Tensor):
        x = features.detach().float().cpu().numpy().astype(np.float64)
    else:
        x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_rows, n_features]; got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values.")
    return x


def _check_inputs(
    features: Features, labels: Sequence, groups: Sequence | None, feature_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    x = _as_array(features, "features")
    y_raw = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if y_raw.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y_raw.shape}.")
    if len(y_raw) != len(x):
        raise ValueError(
            f"features have {len(x)} rows but labels have {len(y_raw)}; give one label per row."
        )
    values = sorted(set(y_raw.tolist()), key=str)
    if len(values) < 2:
        raise ValueError(
            f"labels are all one class ({values[0]!r} x {len(y_raw)}); a probe needs both classes "
            "(0/1 or False/True)."
        )
    if not set(values) <= {0, 1}:
        raise ValueError(f"labels must be binary 0/1 or False/True; got values {values[:6]}.")
    y = y_raw.astype(int)
    g = np.arange(len(x)) if groups is None else np.asarray(groups)
    if len(g) != len(x):
        raise ValueError(f"features have {len(x)} rows but groups have {len(g)}.")
    if feature_names is None:
        if isinstance(features, pd.DataFrame):
            feature_names = [str(c) for c in features.columns]
        else:
            feature_names = [f"x{i}" for i in range(x.shape[1])]
    feature_names = list(feature_names)
    if len(feature_names) != x.shape[1]:
        raise ValueError(
            f"{len(feature_names)} feature_names for {x.shape[1]} feature columns."
        )
    return x, y, g, feature_names


# --------------------------------------------------------------------------------------------
# Fitting


def _pipeline(C: float, penalty: str, balance: str, seed: int) -> Pipeline:
    lr = LogisticRegression(
        C=C, l1_ratio=1.0 if penalty == "l1" else 0.0, solver="liblinear", max_iter=2000,
        class_weight="balanced" if balance == "weight" else None, random_state=seed,
    )
    return Pipeline([("scale", StandardScaler()), ("logreg", lr)])


def _subsample(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with the majority class subsampled to the minority count."""
    idx0, idx1 = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    n = min(len(idx0), len(idx1))
    keep = np.concatenate([rng.choice(idx0, n, replace=False), rng.choice(idx1, n, replace=False)])
    return np.sort(keep)


def _fit_one(
    x: np.ndarray, y: np.ndarray, g: np.ndarray, *, C: float | None, Cs: Sequence[float],
    penalty: str, balance: str, seed: int, rng: np.random.Generator,
) -> tuple[Pipeline, float]:
    if balance == "subsample":
        keep = _subsample(y, rng)
        x, y, g = x[keep], y[keep], g[keep]
    if C is not None:
        return _pipeline(C, penalty, balance, seed).fit(x, y), C
    # C by grouped inner CV over the regularisation path (warm-started, so cheap). The scaler is
    # fitted on this training set: the inner folds share it, the outer test fold never sees it.
    # Stratified, and only splits with both classes on both sides (ROC AUC needs them); with
    # too few positive groups for that, C falls back to FALLBACK_C.
    splitter = StratifiedGroupKFold(n_splits=min(3, len(np.unique(g))), shuffle=True,
                                    random_state=seed)
    inner = [(tr, te) for tr, te in splitter.split(x, y, g)
             if len(np.unique(y[tr])) == 2 and len(np.unique(y[te])) == 2]
    if len(inner) < 2:
        return _pipeline(FALLBACK_C, penalty, balance, seed).fit(x, y), FALLBACK_C
    lrcv = LogisticRegressionCV(
        Cs=list(Cs), cv=inner, l1_ratios=[1.0 if penalty == "l1" else 0.0], scoring="roc_auc",
        solver="liblinear", max_iter=2000,
        class_weight="balanced" if balance == "weight" else None, random_state=seed,
        use_legacy_attributes=False,
    )
    model = Pipeline([("scale", StandardScaler()), ("logreg", lrcv)]).fit(x, y)
    return model, float(np.ravel(lrcv.C_)[0])


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count half); fast enough to bootstrap."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n0 == 0 or n1 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def _balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean of the two classes' recalls; NaN (without a numpy warning) when a class is absent."""
    if y.all() or not y.any():
        return float("nan")
    pred = p >= 0.5
    return float(((pred[y == 1]).mean() + (~pred[y == 0]).mean()) / 2)


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = (p >= 0.5).astype(int)
    out = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": _balanced_accuracy(y, p),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "f1": f1_score(y, pred, zero_division=0),
        "roc_auc": _auc(y, p),
    }
    return {k: float(v) for k, v in out.items()}


def _group_bootstrap(
    y: np.ndarray, p: np.ndarray, g: np.ndarray, n_boot: int, rng: np.random.Generator
) -> dict[str, tuple[float, float]]:
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == i) for i in range(len(uniq))]
    stats: dict[str, list[float]] = {"roc_auc": [], "balanced_accuracy": []}
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        yb, pb = y[idx], p[idx]
        if len(np.unique(yb)) < 2:
            continue
        stats["roc_auc"].append(_auc(yb, pb))
        stats["balanced_accuracy"].append(_balanced_accuracy(yb, pb))
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v
            else (np.nan, np.nan) for k, v in stats.items()}


def _cross_validate(
    x: np.ndarray, y: np.ndarray, g: np.ndarray, *, n_splits: int, n_repeats: int,
    C: float | None, Cs: Sequence[float], penalty: str, balance: str, seed: int, n_boot: int,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    folds: list[dict[str, Any]] = []
    pooled_p = np.zeros((n_repeats, len(y)))
    for r in range(n_repeats):
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + r)
        for f, (tr, te) in enumerate(cv.split(x, y, g)):
            if len(np.unique(y[tr])) < 2:
                raise ValueError(
                    f"A training fold has one class only (repeat {r}, fold {f}); use fewer "
                    "n_splits or more groups with both labels."
                )
            model, c = _fit_one(x[tr], y[tr], g[tr], C=C, Cs=Cs, penalty=penalty,
                                balance=balance, seed=seed, rng=rng)
            p = model.predict_proba(x[te])[:, 1]
            pooled_p[r, te] = p
            folds.append({"repeat": r, "fold": f, "C": c, "n_train": len(tr), "n_test": len(te),
                          "two_classes": bool(len(np.unique(y[te])) == 2), **_scores(y[te], p)})
    table = pd.DataFrame(folds)
    # ROC AUC and balanced accuracy are undefined on a test fold with one class: they average
    # over the folds with both classes, and say how many that is (never a silent subset).
    metrics = {}
    for m in METRICS:
        values = table[m].to_numpy(dtype=float)
        ok = values[~np.isnan(values)]
        metrics[m] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                      "std": float(ok.std()) if len(ok) else float("nan"),
                      "n_folds": int(len(ok)), "n_folds_total": int(len(values))}
    metrics["roc_auc"]["n_folds_one_class"] = int((~table["two_classes"]).sum())
    if n_boot:
        intervals = _group_bootstrap(y, pooled_p.mean(0), g, n_boot, rng)
        for m, (lo, hi) in intervals.items():
            metrics[m].update(low=lo, high=hi)
    return metrics, folds


def fit_probe(
    features: Features,
    labels: Sequence[int] | Sequence[bool] | np.ndarray | Tensor,
    *,
    groups: Sequence | np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    n_splits: int = 5,
    n_repeats: int = 1,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    penalty: Literal["l2", "l1"] = "l2",
    balance: Literal["weight", "subsample"] = "weight",
    n_shuffles: int = 5,
    n_boot: int = 300,
    seed: int = 0,
) -> Probe:
    """Fit a standardised logistic-regression probe with grouped cross-validation.

    Args:
        features: ``[n_rows, n_features]`` (array, tensor or DataFrame; DataFrame columns name
            the features). One row per response, never per token.
        labels: ``n_rows`` binary labels (1 = the positive class, e.g. misaligned).
        groups: ``n_rows`` group ids (question ids): no group is in both train and test. Default:
            each row its own group.
        feature_names: names of the columns (default: DataFrame columns or ``x0, x1, ...``).
        n_splits, n_repeats: outer ``StratifiedGroupKFold`` splits, repeated with new shuffles.
        C: fixed inverse regularisation; ``None`` picks it from ``Cs`` by grouped, stratified
            inner CV (ROC AUC) on each training fold and on all rows for the final model
            (:data:`FALLBACK_C` when fewer than two inner splits have both classes on both sides).
        penalty: ``"l2"`` or ``"l1"`` (solver liblinear for both: fast on a few hundred rows; it
            also penalises the intercept slightly, negligible on standardised features).
        balance: ``"weight"`` (``class_weight="balanced"``) or ``"subsample"`` (drop majority
            rows at random in each training set).
        n_shuffles: shuffled-label baseline runs (0 to skip); their metrics are averaged (one
            shuffle scatters widely, so use several).
        n_boot: group-bootstrap resamples for the intervals (0 to skip).
        seed: controls splits, subsampling, shuffles and bootstrap.

    Returns:
        A :class:`Probe`. ``probe.summary()`` tabulates metrics against the baseline;
        ``probe.coefficients()`` lists the weights.
    """
    x, y, g, names = _check_inputs(features, labels, groups, feature_names)
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty={penalty!r}; expected 'l1' or 'l2'.")
    if balance not in ("weight", "subsample"):
        raise ValueError(f"balance={balance!r}; expected 'weight' or 'subsample'.")
    n_groups = len(np.unique(g))
    if n_splits < 2 or n_splits > n_groups:
        raise ValueError(
            f"n_splits={n_splits} needs 2 <= n_splits <= number of groups ({n_groups})."
        )
    kw = dict(n_splits=n_splits, n_repeats=n_repeats, C=C, Cs=Cs, penalty=penalty,
              balance=balance, n_boot=n_boot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn's note on small classes; emlens counts the affected folds itself (below)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        metrics, folds = _cross_validate(x, y, g, seed=seed, **kw)
        baselines = []
        rng = np.random.default_rng(seed + 10_000)
        for s in range(n_shuffles):
            shuffled = rng.permutation(y)
            baselines.append(_cross_validate(x, shuffled, g, seed=seed + 1000 + s,
                                             **{**kw, "n_boot": 0})[0])
        baseline = {m: {stat: float(np.mean([b[m][stat] for b in baselines]))
                        for stat in ("mean", "std")} for m in METRICS} if baselines else {}
        final, final_c = _fit_one(x, y, g, C=C, Cs=Cs, penalty=penalty, balance=balance,
                                  seed=seed, rng=np.random.default_rng(seed))
    one_class = metrics["roc_auc"]["n_folds_one_class"]
    if one_class:
        total = metrics["roc_auc"]["n_folds_total"]
        warnings.warn(
            f"fit_probe: {one_class} of {total} test folds hold one class only ({int(y.sum())} "
            f"positive rows in {n_groups} groups), so roc_auc and balanced_accuracy average the "
            f"{total - one_class} folds with both classes (metrics[m]['n_folds']). Use fewer "
            "n_splits or more positive groups for a steadier estimate.",
            ProbeWarning, stacklevel=2,
        )
    scaler, lr = final.named_steps["scale"], final.named_steps["logreg"]
    config = dict(penalty=penalty, balance=balance, n_splits=n_splits, n_repeats=n_repeats,
                  C=C, Cs=list(Cs), n_shuffles=n_shuffles, n_boot=n_boot, seed=seed,
                  n_rows=len(y), n_groups=n_groups, n_positive=int(y.sum()),
                  n_negative=int(len(y) - y.sum()))
    return Probe(
        feature_names=names, mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist(),
        coef=lr.coef_[0].tolist(), intercept=float(lr.intercept_[0]), C=final_c,
        metrics=metrics, baseline=baseline, folds=folds, config=config,
    )


def reference_probe(features: Features, labels, *, groups=None, **kwargs: Any) -> Probe:
    """:func:`fit_probe` with :data:`REFERENCE_PRESET` (L1, C=0.01, subsample, 10 repeats).

    Report ``probe.metrics[m]["mean"]`` and ``["std"]`` for accuracy, precision, recall, F1 and
    ROC AUC, as the reference code did. Keyword arguments override the preset.

    Note: scikit-learn's ``C`` multiplies the *summed* loss, so ``C=0.01`` with L1 was a mild
    penalty on the reference's token-level data (thousands of rows) but zeroes every weight on a
    few hundred per-answer rows (AUC 0.5). Compare with :func:`fit_probe`'s CV-chosen ``C``.
    """
    return fit_probe(features, labels, groups=groups, **{**REFERENCE_PRESET, **kwargs})


__all__ = [
    "DEFAULT_CS",
    "METRICS",
    "REFERENCE_PRESET",
    "Probe",
    "ProbeWarning",
    "fit_probe",
    "reference_probe",
]
