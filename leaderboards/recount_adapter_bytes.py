"""Recount ``params.adapter_bytes`` of records made before c932c33: ``python leaderboards/recount_adapter_bytes.py
FOLDER... [--write]``, from the repository root, each FOLDER a leaderboard's ``records``.

Those runs (no checkpoint) recorded the bytes of their trained tensors; a method's saved adapter can hold more
(LoRA-FA's frozen A, VeRA's projections, PiSSA's and OLoRA's rank-2r form) or less (P-tuning saves its prompt,
not its encoder). The count depends on the method's settings and the model's shapes alone (AdaLoRA's also on the
ranks its run kept, which its record lists), so each (task, method settings) is rebuilt once on the record's
backbone and counted as runs count it now (``Method.saved_bytes``). ``--write`` rewrites the records that differ
(only that field, atomically); without it, lists them.
"""

import json
import sys
from pathlib import Path

import torch

from peftbench import config, models
from peftbench.methods import RunContext, get_method, lacked_modules, set_trainable
from peftbench.records import write_atomic
from peftbench.tasks import get_spec, load_task


def saved_bytes(cfg, total_steps: int, final_ranks: dict | None) -> int:
    spec = get_spec(cfg.task)
    labels = spec.model_labels()
    train = load_task(cfg.task).splits["train"]  # a random-init backbone's vocabulary comes from its texts
    tokenizer = models.load_tokenizer(cfg.model, list(train["text_a"]) + list(train["text_b"]))
    model, base = models.load_model(cfg.model, labels, tokenizer, spec.kind.auto_class)
    method = get_method(cfg.method.name)(cfg.method)
    model = method.apply(model, RunContext(total_steps, len(labels), spec.kind.peft_task_type,
                                           spec.kind.labels_per_token, lacked_modules(base.new_weights),
                                           base.float_weight))
    set_trainable(model, method)
    if final_ranks:  # AdaLoRA: PEFT's rank pattern (which ranks a module kept) in the names it uses
        init = cfg.method.init_r
        model.peft_config["default"].rank_pattern = {f"{module}.lora_E": [True] * kept + [False] * (init - kept)
                                                     for module, kept in final_ranks.items()}
    return method.saved_bytes(model)


def main(folders: list[Path], write: bool) -> None:
    counted: dict[str, int] = {}
    changed = 0
    for path in sorted(p for folder in folders for p in folder.glob("**/record.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("status") != "success":
            continue
        cfg = config.resolve(record["config"])
        final_ranks = (record.get("method_summary") or {}).get("final_ranks")
        key = json.dumps([record["config"][part] for part in ("model", "task", "method")] + [final_ranks],
                         sort_keys=True)
        if key not in counted:
            torch.manual_seed(0)
            counted[key] = saved_bytes(cfg, record["total_steps"], final_ranks)
        if record["params"]["adapter_bytes"] != counted[key]:
            changed += 1
            print(f"{path.parent}: {cfg.task.name} {cfg.method.name} {getattr(cfg.method, 'peft_type', '')} "
                  f"{record['params']['adapter_bytes']} -> {counted[key]}")
            if write:
                write_atomic(path, {**record, "params": {**record["params"], "adapter_bytes": counted[key]}})
    print(f"{changed} records {'rewritten' if write else 'differ'}")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:] if a != "--write"], "--write" in sys.argv)
