"""Entity-level precision, recall and F1 over exact (start, end, type) spans, micro-averaged, with F1 per type:
CLUENER's metric, as peftbench scores a token-classification run."""

import datasets
import evaluate

from peftbench.evaluate_modules import metric_info
from peftbench.metrics import entity_metrics
from peftbench.tasks.spans import Span

SPAN = {"start": datasets.Value("int64"), "end": datasets.Value("int64"), "type": datasets.Value("string")}


class ClueNerF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "predictions, references: per example, a list of entities {start, end "
                                    "(inclusive), type} over characters (`peftbench predict`'s entities without "
                                    "their text); entity_types (optional): the task's types. Returns "
                                    "entity_precision, entity_recall, entity_f1, per_type_f1 and counts.",
                           predictions=datasets.List(SPAN), references=datasets.List(SPAN))

    def _compute(self, predictions, references, entity_types=None):
        """``entity_types``: the task's types, each with a per-type F1 (0 where never seen); by default the types
        the inputs hold."""
        def spans(rows):
            return [[Span(e["start"], e["end"], e["type"]) for e in row] for row in rows]

        seen = {e["type"] for rows in (predictions, references) for row in rows for e in row}
        return entity_metrics(spans(references), spans(predictions), tuple(entity_types or sorted(seen)))
