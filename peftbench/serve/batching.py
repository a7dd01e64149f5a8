"""Dynamic batching: requests gathered for a few milliseconds, run in forward passes on one model thread."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from peftbench.data import Collator
from peftbench.errors import clip
from peftbench.serve.adapters import Adapter


@dataclass
class Job:
    adapter: Adapter
    texts: list[str]
    examples: list[dict]  # the texts tokenised (:func:`encode_request`)
    done: asyncio.Future  # set to the job's prediction rows
    top_k: int | None = 0  # classification: also the k most probable labels (None: all; 0: the top one only)


class RequestError(ValueError):
    """A request the server will not run; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_request(adapter: Adapter, texts: list[str], pairs: list[str] | None) -> list[dict]:
    """The request's texts tokenised as training tokenised its files; a text the tokenizer cannot take (a lone
    surrogate, valid in JSON) raises :class:`RequestError` (400) naming it."""
    def encode(a: list[str], b: list[str] | None) -> list[dict]:
        return adapter.kind.encode_texts(adapter.tokenizer, a, b, adapter.meta["max_length"])

    try:
        return encode(texts, pairs)
    except Exception:
        pass
    for i, text in enumerate(texts):  # which one: each text alone, then its pair
        for field_name, a, b in (("texts", [text], None), ("text_pairs", [text], pairs and [pairs[i]])):
            try:
                encode(a, b)
            except Exception as exc:
                raise RequestError(400, f"{field_name}[{i}]: cannot be tokenised ({type(exc).__name__}: "
                                        f"{clip(str(exc).splitlines()[0] if str(exc) else '')})") from None
    raise RequestError(400, "texts: cannot be tokenised together")


class Batcher:
    """Gathers requests for up to ``max_wait_ms`` or ``max_batch`` texts, then predicts them together, one
    forward pass per batch key, on the model thread (``thread``: the one thread that runs or changes models)."""

    def __init__(self, device: str, max_batch: int = 64, max_wait_ms: float = 5.0, on_forward=None):
        self.device, self.max_batch, self.max_wait = torch.device(device), max_batch, max_wait_ms / 1000
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.on_forward = on_forward or (lambda texts, adapters: None)  # after each forward pass

    async def predict(self, adapter: Adapter, texts: list[str], examples: list[dict],
                      top_k: int | None = 0) -> list[dict]:
        job = Job(adapter, texts, examples, asyncio.get_running_loop().create_future(), top_k)
        await self.queue.put(job)
        return await job.done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size, deadline = len(jobs[0].texts), loop.time() + self.max_wait
            while size < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
                size += len(jobs[-1].texts)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.adapter.batch_key, []).append(job)
            for group in groups.values():
                try:
                    rows = await loop.run_in_executor(self.thread, self._forward, group)
                except Exception as exc:
                    rows = [exc] if len(group) == 1 else await self._one_by_one(group)
                for job, result in zip(group, rows):
                    if not job.done.done():
                        (job.done.set_exception if isinstance(result, Exception) else job.done.set_result)(result)

    async def _one_by_one(self, jobs: list[Job]) -> list:
        """A failed batch run again job by job: each gets its rows or its own exception."""
        out = []
        for job in jobs:
            try:
                out.append((await asyncio.get_running_loop().run_in_executor(self.thread, self._forward, [job]))[0])
            except Exception as exc:
                out.append(exc)
        return out

    @torch.inference_mode()
    def _forward(self, jobs: list[Job]) -> list[list[dict]]:
        """Prediction rows for each job; the jobs share a batch key (:attr:`Adapter.batch_key`)."""
        width = max(len(ex["input_ids"]) for job in jobs for ex in job.examples)
        collate = Collator(jobs[0].adapter.tokenizer.pad_token_id)  # one padding id per batch key
        parts = [collate([{**ex, "id": i} for i, ex in enumerate(job.examples)], width) for job in jobs]
        inputs = {k: torch.cat([p["inputs"][k] for p in parts]) for k in parts[0]["inputs"]}  # jobs of other tasks
        rows = [job.adapter for job in jobs for _ in job.examples]                             # mix: labels apart
        members = jobs[0].adapter.members
        if members:  # an ensemble: the members' mean probabilities, as their log
            probs = [torch.stack(self._logits([m] * len(rows), inputs, counted=i == 0)).softmax(-1)  # the metrics
                     for i, m in enumerate(members)]                                                # count texts once
            logits = list((sum(probs) / len(members)).log())
        else:
            logits = self._logits(rows, inputs)
        results, start = [], 0
        for job, part in zip(jobs, parts):
            a, end = job.adapter, start + len(job.examples)
            predicted = a.kind.prediction_rows(torch.stack(logits[start:end]), part, dict(enumerate(job.texts)),
                                               a.meta["labels"], a.meta["label_names"], job.top_k)
            results.append([_public(a.kind.jsonl_row(r)) for r in predicted])
            start = end
        return results

    def _logits(self, adapters: list[Adapter], inputs: dict, counted: bool = True) -> list[torch.Tensor]:
        """Each row's float logits for batch ``inputs`` whose row i asks for ``adapters[i]`` (all on one shared
        base, or one model of its own), in passes of at most ``max_batch`` texts; token logits align with the
        input tokens. ``counted``: report each pass to ``on_forward``."""
        logits, length = [], inputs["input_ids"].shape[1]
        for start in range(0, len(adapters), self.max_batch):
            part = {k: v[start:start + self.max_batch].to(self.device) for k, v in inputs.items()}
            rows = adapters[start:start + self.max_batch]
            if rows[0].shared is not None:
                logits += [row.cpu() for row in rows[0].shared.forward(part, [a.name for a in rows])]
            else:
                out = rows[0].model(**part).logits.float()
                logits += list((out[:, -length:] if out.dim() == 3 else out).cpu())  # after prompt tuning's
            if counted:                                                             # virtual tokens
                self.on_forward(len(rows), len({a.name for a in rows}))
        return logits


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "id"}


