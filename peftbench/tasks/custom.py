"""``task.name=custom``: users' own CLUE-style JSON lines or CSV.

The recipe names the text field(s), the label field and the label list::

    task: {name: custom, data_dir: my_data, text_fields: [question, answer],
           label_field: label, labels: ["0", "1"]}

Files follow the CLUE (train/dev/test.json), FewCLUE or CSV (train/dev/test.csv)
layout. Labels are compared as strings, so JSON ints and strings both work.
"""

from __future__ import annotations

from peftbench.errors import PeftbenchError
from peftbench.tasks import Example, TaskSpec, label_field, register_task, text_field


def custom_spec(task_cfg) -> TaskSpec:
    """User data: set task.data_dir, task.text_fields, task.label_field and task.labels."""
    fields, label_key, labels = task_cfg.text_fields, task_cfg.label_field, task_cfg.labels
    if not fields or len(fields) > 2:
        raise PeftbenchError("config key 'task.text_fields' must list one or two field names for task.name=custom")
    if not labels:
        raise PeftbenchError("config key 'task.labels' must list the label strings for task.name=custom")
    if len(set(labels)) != len(labels):
        raise PeftbenchError("config key 'task.labels' has duplicate labels")
    label_key = label_key or "label"

    def convert(record: dict) -> Example:
        texts = [text_field(record, f) for f in fields]
        return Example(texts[0], texts[1] if len(texts) > 1 else "", label_field(record, label_key))

    return TaskSpec("custom", "user data (CLUE-style JSON lines or CSV)", tuple(labels), convert,
                    label_key=label_key)


register_task(custom_spec, name="custom")
