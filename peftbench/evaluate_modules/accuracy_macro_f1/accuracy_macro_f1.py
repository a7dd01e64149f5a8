"""Accuracy and macro-F1 of class predictions, as peftbench scores a classification run."""

import datasets
import evaluate

from peftbench.evaluate_modules import metric_info
from peftbench.metrics import classification_metrics


class AccuracyMacroF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "predictions, references: class ids (ints), one per example. Returns accuracy, "
                                    "macro_f1 (mean per-class F1 over the classes in either list) and n_eval.",
                           predictions=datasets.Value("int64"), references=datasets.Value("int64"))

    def _compute(self, predictions, references):
        return classification_metrics(references, predictions)
