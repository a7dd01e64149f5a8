"""model-index: scores as the Hugging Face hub (and Papers with Code) read them from a model card's front matter.

One ``EvalResult`` per metric and split of a record (``accuracy``, ``macro_f1``; ``entity_f1``, ``entity_precision``,
``entity_recall``; dev as ``validation``, the labeled test split as ``test``), with the dataset named by its hub
id where the run read the task from the hub (``clue/clue``, config ``tnews``), else by the task's name (a local
folder may hold other splits: FewCLUE's are not CLUE's).
"""

from __future__ import annotations

HUB_TASK_TYPES = {"classification": "text-classification", "token_classification": "token-classification"}
SPLITS = {"": "validation", "test_": "test"}  # record metric prefix -> dataset split
# record metric -> (metric type, the hub's metric name, config)
METRICS = {"accuracy": ("accuracy", "Accuracy", None), "macro_f1": ("f1", "Macro F1", "macro"),
           "entity_f1": ("f1", "Entity F1", "micro"), "entity_precision": ("precision", "Entity precision", "micro"),
           "entity_recall": ("recall", "Entity recall", "micro")}


def eval_results(task: str, hub: tuple[str, str] | list | None, kind: str, metrics: dict,
                 dataset_name: str | None = None) -> list:
    """``huggingface_hub.EvalResult``s of the metrics a record (or a table's cell means) holds; ``dataset_name``:
    what the dataset is shown as (default: the task's name; a table passes its column)."""
    from huggingface_hub import EvalResult

    dataset_type, dataset_config = (hub[0], hub[1]) if hub else (task, None)
    out = []
    for prefix, split in SPLITS.items():
        for key, (metric_type, metric_name, metric_config) in METRICS.items():
            value = metrics.get(prefix + key)
            if value is not None:
                out.append(EvalResult(task_type=HUB_TASK_TYPES[kind], dataset_type=dataset_type,
                                      dataset_name=dataset_name or task,
                                      dataset_config=dataset_config, dataset_split=split, metric_type=metric_type,
                                      metric_name=metric_name, metric_config=metric_config,
                                      metric_value=float(value)))
    return out


def model_index(entries: list[tuple[str, list]]) -> list[dict]:
    """The ``model-index`` list of (model name, its ``EvalResult``s) pairs, as a card's front matter holds it."""
    from huggingface_hub.repocard_data import eval_results_to_model_index

    return [model for name, results in entries if results for model in eval_results_to_model_index(name, results)]
