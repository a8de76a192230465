#!/usr/bin/env python3
"""Write tests/fixtures/metrics/sklearn.txt: scikit-learn's numbers for whet-metrics'
classification_report (multiclass) and multilabel_report, on fixed examples.

    .venv-ref/bin/python scripts/make_metrics_fixture.py     # scikit-learn 1.9.1, < 1 s

scikit-learn has no multi-label Matthews correlation (`matthews_corrcoef` rejects indicator
matrices). whet reports the binary MCC of every (example, label) decision pooled together,
which is scikit-learn's `matthews_corrcoef(Y_true.ravel(), Y_pred.ravel())`: that is what the
multi-label cases record under `mcc`. The multiclass cases record `matthews_corrcoef(y_true,
y_pred)` (Gorodkin's R_K).

Format: one line per value, `<case>.<key> <values separated by spaces>`; floats are Python's
repr (shortest round-trip). Multi-label rows are label-indicator strings ("0110": labels 1, 2).
Keys: `n` (classes or labels), `true`, `pred`, `mcc`, `mcc_label_mean` (multi-label only: the
mean of per-label MCCs, the definition whet does not use), `accuracy` (subset accuracy for
multi-label), `precision` / `recall` / `f1` / `support` (per class or label,
`zero_division=0`), `macro` / `micro` / `weighted` (precision, recall, F1 under that average),
`confusion` (multiclass: the matrix row by row, `[true][predicted]`; multi-label:
`multilabel_confusion_matrix` as [tn, fp, fn, tp] per label).
"""
from pathlib import Path

import numpy as np
import sklearn
from sklearn.metrics import (accuracy_score, confusion_matrix, matthews_corrcoef,
                             multilabel_confusion_matrix, precision_recall_fscore_support)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics" / "sklearn.txt"


def fmt(values):
    return " ".join(repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)
                    for v in values)


def common(lines, name, y_true, y_pred, n):
    """Accuracy, per-class and averaged precision / recall / F1, as scikit-learn scores them."""
    lines.append(f"{name}.accuracy {fmt([accuracy_score(y_true, y_pred)])}")
    labels = list(range(n))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None,
                                                 zero_division=0)
    for key, v in [("precision", p), ("recall", r), ("f1", f), ("support", s)]:
        lines.append(f"{name}.{key} {fmt(v)}")
    for avg in ["macro", "micro", "weighted"]:
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                     zero_division=0)
        lines.append(f"{name}.{avg} {fmt([p, r, f])}")


def multiclass(lines, name, y_true, y_pred, n):
    lines.append(f"{name}.n {n}")
    lines.append(f"{name}.true {fmt(y_true)}")
    lines.append(f"{name}.pred {fmt(y_pred)}")
    lines.append(f"{name}.mcc {fmt([matthews_corrcoef(y_true, y_pred)])}")
    common(lines, name, y_true, y_pred, n)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(n)))
    lines.append(f"{name}.confusion {fmt(cm.ravel())}")


def multilabel(lines, name, y_true, y_pred):
    n = y_true.shape[1]
    rows = lambda m: " ".join("".join(str(int(v)) for v in row) for row in m)  # noqa: E731
    lines.append(f"{name}.n {n}")
    lines.append(f"{name}.true {rows(y_true)}")
    lines.append(f"{name}.pred {rows(y_pred)}")
    lines.append(f"{name}.mcc {fmt([matthews_corrcoef(y_true.ravel(), y_pred.ravel())])}")
    # The other definition one meets, the mean of per-label MCCs, so that a test can tell the two
    # apart.
    per_label = [matthews_corrcoef(y_true[:, k], y_pred[:, k]) for k in range(n)]
    lines.append(f"{name}.mcc_label_mean {fmt([float(np.mean(per_label))])}")
    common(lines, name, y_true, y_pred, n)
    # sklearn's per-label [[tn, fp], [fn, tp]]
    lines.append(f"{name}.confusion {fmt(multilabel_confusion_matrix(y_true, y_pred).ravel())}")


def main():
    rng = np.random.default_rng(0)
    lines = [f"# scikit-learn {sklearn.__version__}, numpy {np.__version__}: written by "
             "scripts/make_metrics_fixture.py, do not edit"]
    # 4 classes, 30 examples, about two thirds right; a wrong prediction is never class 3.
    y_true = rng.integers(0, 4, 30)
    y_pred = np.where(rng.random(30) < 0.65, y_true, rng.integers(0, 3, 30))
    multiclass(lines, "multiclass", y_true, y_pred, 4)
    # Every prediction the same class: MCC undefined, scikit-learn gives 0.
    multiclass(lines, "multiclass_constant", np.array([0, 1, 2, 1, 0]), np.array([1] * 5), 3)
    # 5 labels, 24 examples, label k present with probability 0.2 + 0.15 k; each decision
    # flipped with probability 0.25; label 4 predicted for no example.
    y_true = (rng.random((24, 5)) < 0.2 + 0.15 * np.arange(5)).astype(int)
    y_pred = np.where(rng.random((24, 5)) < 0.25, 1 - y_true, y_true)
    y_pred[:, 4] = 0
    multilabel(lines, "multilabel", y_true, y_pred)
    # No label predicted anywhere: the pooled MCC is undefined, scikit-learn gives 0.
    y_true = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 0]])
    multilabel(lines, "multilabel_empty", y_true, np.zeros_like(y_true))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
