"""The CLUE-style average: the mean of each task's score, as a peftbench leaderboard's average column."""

import datasets
import evaluate

from peftbench.evaluate_modules import metric_info
from peftbench.metrics import clue_average


class ClueAverage(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "predictions: each task's score (0-1); references: the task's name, each once. "
                                    "Returns clue_average (0-1) and tasks.",
                           predictions=datasets.Value("float64"), references=datasets.Value("string"))

    def _compute(self, predictions, references):
        if len(set(references)) != len(references):
            raise ValueError(f"each task once, got {references}")
        return {"clue_average": clue_average(dict(zip(references, predictions))), "tasks": len(references)}
