"""peftbench's metrics as Hugging Face ``evaluate`` modules, shipped in the package and loaded offline::

    import evaluate
    from peftbench.evaluate_modules import module_path

    accuracy = evaluate.load(module_path("accuracy_macro_f1"))
    accuracy.compute(predictions=[0, 2, 1], references=[0, 1, 1])  # {'accuracy': ..., 'macro_f1': ..., 'n_eval': 3}

``accuracy_macro_f1`` (classification), ``cluener_f1`` (entity-level F1 over exact spans, CLUENER's metric) and
``clue_average`` (the mean of task scores, a leaderboard's average column). Each computes with
:mod:`peftbench.metrics`, the code that scores every run: the numbers are the records' (``pip install evaluate``).
"""

from pathlib import Path

MODULES = ("accuracy_macro_f1", "cluener_f1", "clue_average")


def module_path(name: str) -> str:
    """The folder ``evaluate.load`` reads the module ``name`` from."""
    if name not in MODULES:
        raise ValueError(f"no evaluate module {name!r}: one of {', '.join(MODULES)}")
    return str(Path(__file__).resolve().parent / name)


def metric_info(description: str, inputs: str, **features):
    """The ``evaluate.MetricInfo`` of a module here: its docstring, what it takes and returns, its input features."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=description, citation="", reference_urls=[], inputs_description=inputs,
                               features=datasets.Features(features))
