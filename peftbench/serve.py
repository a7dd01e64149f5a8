"""``peftbench serve``: trained checkpoints over HTTP, with one base in memory for the adapters on it.

Adapters trained on one pretrained base (their fingerprints agree) share one copy of its backbone
(:mod:`peftbench.mixed`): a batch whose rows ask for different adapters, of any method that keeps the base
frozen and of any task, runs through the backbone once, each row with its own adapter, and each adapter's
head on its own rows. A checkpoint that cannot share (full fine-tuning, DoRA, other PEFT tuners, a quantised
base) keeps a model of its own, and the start-up line says why. Requests are batched dynamically: the batcher
waits up to ``max_wait_ms`` for ``max_batch`` texts, and one worker thread runs the forward passes, so the
models are used by one thread at a time.

Endpoints: ``POST /v1/classify``, ``GET /v1/adapters``, ``GET /metrics`` (Prometheus text)
and ``GET /healthz`` (no token). Every other path needs ``Authorization: Bearer <token>``,
checked before the body is read; the OpenAPI pages (``/docs``, ``/redoc``, ``/openapi.json``)
exist only with ``docs=True``. A request is validated and tokenised on its own before it
joins a batch, and a batch that fails is run again request by request, so that a bad
request fails alone. Predictions are the rows ``peftbench predict`` writes (docs/serving.md).
"""

import asyncio
import hmac
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftbench import checkpoint
from peftbench.config import resolve
from peftbench.data import Collator
from peftbench.errors import PeftbenchError, clip
from peftbench.inference import load, load_base, loading
from peftbench.mixed import NotShareable, SharedBase
from peftbench.tasks.kinds import KINDS, TaskKind

NO_TOKEN = "no token: set PEFTBENCH_TOKEN or pass --token-file (clients send it as a Bearer token)"


@dataclass
class Adapter:
    name: str
    meta: dict
    kind: TaskKind
    tokenizer: object
    model: torch.nn.Module | None = None  # a model of its own
    shared: SharedBase | None = None  # else: the base it shares, where it is the slot called ``name``
    members: list["Adapter"] = field(default_factory=list)  # an ensemble's: their probabilities are averaged
    own_reason: str | None = None  # why it did not join a shared base

    @property
    def batch_key(self) -> tuple:
        """Jobs with one key run in one forward pass: the adapters of one shared base mix, those with n virtual
        tokens (prompt tuning) apart from the others (in one pass, every row would be padded by n); a model of its
        own runs alone; an ensemble's jobs run together, one pass per member."""
        if self.members:
            return ("ensemble", self.name)
        if self.shared is None:
            return ("own", id(self.model))
        prompt = self.shared.slots[self.name].prompt
        return ("shared", id(self.shared), 0 if prompt is None else prompt.shape[0])

    def describe(self) -> dict:
        m = self.meta
        return {"name": self.name, "task": m["task"], "method": "ensemble" if self.members else m["method"],
                "kind": m["kind"], "labels": m["labels"], "label_names": m["label_names"], "text_pairs": m["pair"],
                "shares_base": self.shared is not None, "run_id": m["run_id"],
                "base": checkpoint.pretrained_fingerprint(m)[:12] if m["base"] else None,
                **({"own_model": self.own_reason} if self.own_reason else {}),
                **({"members": [a.describe() for a in self.members]} if self.members else {})}


def load_adapters(checkpoints: dict[str, str | Path | list], device: str = "cpu") -> dict[str, Adapter]:
    """Load every checkpoint (name -> directory, or a list of directories: an ensemble). An adapter joins the
    shared base of the pretrained base it was trained on (checked by fingerprint) when its method keeps that
    base frozen; every other checkpoint gets a model of its own."""
    singles = {}
    for name, ckpt in checkpoints.items():
        for i, path in enumerate(ckpt if isinstance(ckpt, list) else [ckpt]):
            singles[f"{name}#{i}" if isinstance(ckpt, list) else name] = path
    bases: dict[tuple, SharedBase | None] = {}
    loaded = {name: load_adapter(name, Path(path), device, bases) for name, path in singles.items()}
    adapters = {}
    for name, ckpt in checkpoints.items():
        if not isinstance(ckpt, list):
            adapters[name] = loaded[name]
            continue
        members = [loaded[f"{name}#{i}"] for i in range(len(ckpt))]
        first = members[0]
        for path, member in zip(ckpt[1:], members[1:]):
            same = all(member.meta[k] == first.meta[k] for k in ("task", "kind", "labels", "max_length", "pair"))
            if not same or member.tokenizer.get_vocab() != first.tokenizer.get_vocab():
                raise PeftbenchError(f"ensemble '{name}': {path} has another task, labels, tokenizer or max_length "
                                     f"than {ckpt[0]}; a served ensemble's members share all of them")
        adapters[name] = Adapter(name, first.meta, first.kind, first.tokenizer, members=members)
    return adapters


def load_adapter(name: str, ckpt: Path, device: str, bases: dict[tuple, SharedBase | None]) -> Adapter:
    """One checkpoint, as a slot of the shared base in ``bases`` (by base fingerprint, padding id and attention;
    created on first use) when it can share it, else as a model of its own."""
    model, tokenizer, meta = load(ckpt, device)
    kind = KINDS[meta["kind"]]
    model_cfg = resolve(meta["config"]).model
    if meta["base"] is None:
        return Adapter(name, meta, kind, tokenizer, model, own_reason="a whole model (no base)")
    if model_cfg.quantization != "none":
        return Adapter(name, meta, kind, tokenizer, model, own_reason=f"a {model_cfg.quantization} base")
    group = (checkpoint.pretrained_fingerprint(meta), tokenizer.pad_token_id, model_cfg.attn_implementation)
    if group not in bases:
        try:
            with loading(ckpt):
                bases[group] = SharedBase(load_base(ckpt, meta, tokenizer.pad_token_id, device).eval())
        except NotShareable as exc:
            bases[group] = exc
    shared = bases[group]
    reason = str(shared) if isinstance(shared, NotShareable) else None
    if reason is None:
        try:
            shared.add(name, model)
            return Adapter(name, meta, kind, tokenizer, shared=shared)
        except NotShareable as exc:
            reason = str(exc)
    return Adapter(name, meta, kind, tokenizer, model, own_reason=reason)


def describe_memory(adapters: dict[str, Adapter]) -> str:
    """A line: how many adapters run on how many shared bases, how many in models of their own (and why)."""
    loaded = [m for a in adapters.values() for m in (a.members or [a])]  # an ensemble: its members
    shared = [a for a in loaded if a.shared is not None]
    own = [a for a in loaded if a.shared is None]
    why = "; ".join(f"{a.name}: {a.own_reason}" for a in own)
    own_bytes = sum(a.shared.slots[a.name].nbytes() for a in shared)
    return (f"{len(adapters)} adapters: {len(shared)} on {len({id(a.shared) for a in shared})} shared bases "
            f"({own_bytes / 2**20:.1f} MiB of their own tensors), {len(own)} in models of their own"
            + (f" ({why})" if why else ""))


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
    forward pass per model (in a worker thread, one at a time)."""

    def __init__(self, device: str, max_batch: int = 64, max_wait_ms: float = 5.0, on_forward=None):
        self.device, self.max_batch, self.max_wait = torch.device(device), max_batch, max_wait_ms / 1000
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
                except TimeoutError:
                    break
                size += len(jobs[-1].texts)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.adapter.batch_key, []).append(job)
            for group in groups.values():
                try:
                    rows = await asyncio.to_thread(self._forward, group)
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
                out.append((await asyncio.to_thread(self._forward, [job]))[0])
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


@dataclass
class Limits:
    max_texts: int = 256  # texts per request
    max_chars: int = 2000  # characters per text

    def body_bytes(self) -> int:
        """The largest request body these limits allow: every text and pair at the limit, each character written
        as a JSON escape (6 bytes), plus room for the rest of the JSON."""
        return 2 * self.max_texts * (self.max_chars * 6 + 8) + 4096


PUBLIC_PATHS = ("/healthz",)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class Guard:
    """ASGI middleware that answers before the application reads a request body: 401 without the bearer token
    (compared in constant time) on every path but ``public``, 413 for a body over ``max_body`` bytes (by its
    Content-Length, or counted as it arrives when it is sent in chunks)."""

    def __init__(self, app, token: str, public: tuple[str, ...], max_body: int):
        self.app, self.token, self.public, self.max_body = app, token.encode(), public, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return await _answer(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
        too_big = f"request body over {self.max_body} bytes (the limits of --max-texts and --max-chars)"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _answer(send, 413, too_big)
        seen = 0

        async def counted():  # a body sent in chunks has no length to check first: count it as it comes
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                from starlette.exceptions import HTTPException

                raise HTTPException(413, too_big)  # FastAPI passes it on from the body read: the 413 answer
            return message

        return await self.app(scope, counted, send)


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def create_app(adapters: dict[str, Adapter], token: str, device: str = "cpu", limits: Limits = Limits(),
               max_batch: int = 64, max_wait_ms: float = 5.0, docs: bool = False):
    """The FastAPI application serving ``adapters`` (needs ``peftbench[serve]``); ``docs``: also the OpenAPI
    pages, which answer without the token (a browser cannot send one)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
        generate_latest,
    )
    from pydantic import BaseModel, StrictInt

    if not token:
        raise PeftbenchError(NO_TOKEN)
    disable_created_metrics()  # creation-time gauges per label set: noise for a scraper
    registry = CollectorRegistry()
    requests = Counter("peftbench_requests", "Requests to /v1/classify", ["adapter", "status"], registry=registry)
    latency = Histogram("peftbench_request_seconds", "Time to answer /v1/classify", ["adapter"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    texts_total = Counter("peftbench_texts", "Texts classified", ["adapter"], registry=registry)
    batch_texts = Histogram("peftbench_batch_texts", "Texts per forward pass", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    mixed = Counter("peftbench_mixed_batches", "Forward passes that ran several adapters", registry=registry)

    def on_forward(texts: int, adapters_in_batch: int) -> None:
        batch_texts.observe(texts)
        if adapters_in_batch > 1:
            mixed.inc()

    batcher = Batcher(device, max_batch, max_wait_ms, on_forward)
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # off the event loop; one thread: the
                                                                          # tokenizers are not shared between threads

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        tokenizing.shutdown(wait=False)

    pages = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="peftbench", lifespan=lifespan, **pages)
    app.add_middleware(Guard, token=token, public=PUBLIC_PATHS + (DOCS_PATHS if docs else ()),
                       max_body=limits.body_bytes())

    class Classify(BaseModel):
        adapter: str
        texts: list[str]
        text_pairs: list[str] | None = None
        top_k: StrictInt | None = 0  # also the k most probable labels, sorted; null: every label

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "adapters": len(adapters)}

    @app.get("/v1/adapters")
    def list_adapters():
        return {"adapters": [a.describe() for a in adapters.values()]}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify")
    async def classify(body: Classify):
        start = time.perf_counter()
        adapter = adapters.get(body.adapter)
        if adapter is None:
            requests.labels("(unknown)", "404").inc()
            raise HTTPException(404, f"no adapter '{clip(body.adapter, 100)}' (GET /v1/adapters lists them)")
        status = "200"
        try:
            pairs = body.text_pairs if adapter.meta["pair"] else None
            problem = _check(body.texts, body.text_pairs, adapter, limits)
            if problem:
                raise RequestError(*problem)
            if body.top_k is not None and body.top_k < 0 or "top_k" in body.model_fields_set and body.top_k == 0:
                raise RequestError(422, "top_k: a number of labels >= 1, or null for every label")
            examples = await asyncio.get_running_loop().run_in_executor(tokenizing, encode_request, adapter,
                                                                        body.texts, pairs)
            rows = await batcher.predict(adapter, body.texts, examples, body.top_k)
        except RequestError as exc:
            status = str(exc.status)
            raise HTTPException(exc.status, str(exc)) from None
        except Exception as exc:
            status = "500"
            return JSONResponse({"detail": f"{type(exc).__name__}: {clip(exc)}"}, status_code=500)
        finally:
            requests.labels(adapter.name, status).inc()
            latency.labels(adapter.name).observe(time.perf_counter() - start)
        texts_total.labels(adapter.name).inc(len(body.texts))
        return {"adapter": adapter.name, "predictions": rows}

    return app


def _check(texts: list[str], pairs: list[str] | None, adapter: Adapter, limits: Limits) -> tuple | None:
    """(status, message) for a request the server will not run, else None."""
    if not texts:
        return 422, "texts: at least one text"
    if len(texts) > limits.max_texts:
        return 413, f"texts: {len(texts)} texts, at most {limits.max_texts} per request"
    for field_name, values in (("texts", texts), ("text_pairs", pairs or [])):
        for i, text in enumerate(values):
            if len(text) > limits.max_chars:
                return 413, f"{field_name}[{i}]: {len(text)} characters, at most {limits.max_chars}"
    if adapter.meta["pair"] and (pairs is None or len(pairs) != len(texts)):
        return 422, f"text_pairs: adapter '{adapter.name}' classifies text pairs: one text_pair per text"
    if not adapter.meta["pair"] and pairs is not None:
        return 422, f"text_pairs: adapter '{adapter.name}' classifies single texts"
    return None


def parse_checkpoints(specs: list[str]) -> dict[str, str | list[str]]:
    """``[NAME=]CKPT`` arguments as name -> directory (a bare path is named after its run folder);
    ``NAME=CKPT+CKPT+...`` names an ensemble (a list)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).resolve().parent.name if Path(spec).name == "checkpoint" else Path(spec).name
        if name in out:
            raise PeftbenchError(f"adapter name '{name}' given twice: name them, NAME=CKPT")
        if "#" in name:
            raise PeftbenchError(f"adapter name '{name}': '#' is kept for the members of an ensemble")
        out[name] = path.split("+") if sep and "+" in path else path
    return out


MIN_TOKEN_CHARS = 16


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_token(token_file: str | None) -> str:
    """The bearer token, from ``token_file`` or ``$PEFTBENCH_TOKEN``; warns (stderr) when the file is readable by
    other users or the token is short."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
            mode = Path(token_file).stat().st_mode & 0o777
        except OSError as exc:
            raise PeftbenchError(f"--token-file {token_file}: {exc.strerror}") from None
        if mode & 0o044:
            warn(f"--token-file {token_file} can be read by other users (mode {mode:o}): chmod 600 {token_file}")
    else:
        token = os.environ.get("PEFTBENCH_TOKEN", "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        warn(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones "
             "(head -c 32 /dev/urandom | base64)")
    return token


def check_options(port: int, limits: Limits, max_batch: int, max_wait_ms: float) -> None:
    """Refuse serve options no server can work with, before anything is loaded."""
    for option, value, ok, rule in (("--port", port, 0 < port < 65536, "in 1..65535"),
                                    ("--max-batch", max_batch, max_batch >= 1, ">= 1"),
                                    ("--max-wait-ms", max_wait_ms, math.isfinite(max_wait_ms) and max_wait_ms >= 0,
                                     "a finite number >= 0"),
                                    ("--max-texts", limits.max_texts, limits.max_texts >= 1, ">= 1"),
                                    ("--max-chars", limits.max_chars, limits.max_chars >= 1, ">= 1")):
        if not ok:
            raise PeftbenchError(f"{option} must be {rule}, got {value}")


def serve(specs: list[str], host: str, port: int, token_file: str | None, device: str, limits: Limits,
          max_batch: int, max_wait_ms: float, docs: bool = False) -> None:
    """Load the checkpoints and serve them until SIGINT/SIGTERM (uvicorn finishes requests in flight)."""
    try:
        import uvicorn
    except ImportError:
        raise PeftbenchError("peftbench serve needs FastAPI and uvicorn: pip install 'peftbench[serve]'") from None
    check_options(port, limits, max_batch, max_wait_ms)
    token = read_token(token_file)
    if not token:
        raise PeftbenchError(NO_TOKEN)
    adapters = load_adapters(parse_checkpoints(specs), device)
    print(f"peftbench serve: {describe_memory(adapters)}", flush=True)
    app = create_app(adapters, token, device, limits, max_batch, max_wait_ms, docs)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
