"""Classification metrics in numpy: macro-F1 (the primary metric), accuracy, balanced accuracy,
one-vs-rest AUC, per-class F1 and the confusion matrix.

Conventions (those of scikit-learn, which the tests compare against): F1 of a class with no true
and no predicted example is 0; macro averages run over every class; the AUC of a class absent from
the labels (or present in all of them) is undefined and left out of the one-vs-rest mean; binary
AUC is the positive class's.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def _safe_divide(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def binary_auc(scores, positives) -> float:
  """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
  scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
  n_pos, n_neg = positives.sum(), (~positives).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # average ranks over ties
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(scores)]])
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels, probabilities, class_names=None) -> dict:
  """All metrics for integer `labels` (N,) and class `probabilities` (N, C)."""
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  num_classes = probabilities.shape[1]
  predictions = probabilities.argmax(axis=1)
  cm = confusion_matrix(labels, predictions, num_classes)
  tp = np.diag(cm)
  precision = _safe_divide(tp, cm.sum(axis=0))
  recall = _safe_divide(tp, cm.sum(axis=1))
  f1 = _safe_divide(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))
  present = cm.sum(axis=1) > 0
  if num_classes == 2:
    auc = binary_auc(probabilities[:, 1], labels == 1)
  else:
    per_class = [binary_auc(probabilities[:, c], labels == c) for c in range(num_classes)]
    defined = [a for a in per_class if not np.isnan(a)]
    auc = float(np.mean(defined)) if defined else float("nan")
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  return {
      "f1_macro": float(f1.mean()),
      "accuracy": float(tp.sum() / max(len(labels), 1)),
      "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
      "auc": auc,
      "f1_per_class": dict(zip(names, f1.tolist())),
      "precision_per_class": dict(zip(names, precision.tolist())),
      "recall_per_class": dict(zip(names, recall.tolist())),
      "confusion_matrix": cm.tolist(),
      "num_examples": int(len(labels)),
  }
