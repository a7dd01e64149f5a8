"""The HTTP application: endpoints, the bearer-token guard, request limits and metrics."""

import asyncio
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import PeftbenchError, clip
from peftbench.serve.adapters import Adapter
from peftbench.serve.batching import Batcher, RequestError, encode_request
from peftbench.serve.store import AdapterStore, Refused, Unavailable, log

NO_TOKEN = "no token: set PEFTBENCH_TOKEN or pass --token-file (clients send it as a Bearer token)"


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
ADMIN_PREFIX = "/v1/admin/"


class Guard:
    """ASGI middleware that answers before the application reads a request body: 401 without the bearer token
    (compared in constant time) on every path but ``public``, the admin token on the admin paths (404 when the
    server has none), 413 for a body over ``max_body`` bytes (by its Content-Length, or counted as it arrives when
    it is sent in chunks)."""

    def __init__(self, app, token: str, public: tuple[str, ...], max_body: int, admin_token: str | None = None):
        self.app, self.token, self.public, self.max_body = app, token.encode(), public, max_body
        self.admin_token = admin_token.encode() if admin_token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        token = self.token
        if scope["path"].startswith(ADMIN_PREFIX):
            if self.admin_token is None:
                return await _answer(send, 404, "Not Found")
            token = self.admin_token
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
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


def create_app(adapters: dict[str, Adapter] | AdapterStore, token: str, device: str = "cpu", limits: Limits = Limits(),
               max_batch: int = 64, max_wait_ms: float = 5.0, docs: bool = False, admin_token: str | None = None):
    """The FastAPI application serving ``adapters`` (needs ``peftbench[serve]``); ``docs``: also the OpenAPI
    pages, which answer without the token (a browser cannot send one); ``admin_token``: the admin endpoints, which
    add and remove adapters."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
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

    loads = Histogram("peftbench_adapter_load_seconds", "Time to load an adapter on first use", registry=registry,
                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    evictions = Counter("peftbench_adapter_evictions", "Adapters let go to make room (--max-loaded)",
                        registry=registry)
    resident = Gauge("peftbench_adapters_loaded", "Adapters in memory", registry=registry)

    def on_forward(texts: int, adapters_in_batch: int) -> None:
        batch_texts.observe(texts)
        if adapters_in_batch > 1:
            mixed.inc()

    store = adapters if isinstance(adapters, AdapterStore) else AdapterStore(adapters, device)
    batcher = Batcher(device, max_batch, max_wait_ms, on_forward)
    store.model_thread = batcher.thread
    store.on_load, store.on_evict = loads.observe, evictions.inc
    resident.set_function(lambda: len(store.loaded()))
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # off the event loop; one thread: the
                                                                          # tokenizers are not shared between threads

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        for pool in (tokenizing, store.load_thread, batcher.thread):
            pool.shutdown(wait=False)

    pages = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="peftbench", lifespan=lifespan, **pages)
    app.add_middleware(Guard, token=token, public=PUBLIC_PATHS + (DOCS_PATHS if docs else ()),
                       max_body=limits.body_bytes(), admin_token=admin_token)

    class NewAdapter(BaseModel):
        name: str
        path: str | None = None  # default: the adapters folder's NAME

    class Classify(BaseModel):
        adapter: str
        texts: list[str]
        text_pairs: list[str] | None = None
        top_k: StrictInt | None = 0  # also the k most probable labels, sorted; null: every label

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "adapters": len(store.names())}

    @app.get("/v1/adapters")
    def list_adapters():
        return {"adapters": store.describe()}

    @app.post("/v1/admin/adapters", status_code=201)
    async def add_adapter(body: NewAdapter):
        if body.path is None and store.folder is None:
            raise HTTPException(422, "path: needed (the server has no --adapters-dir)")
        path = Path(body.path) if body.path is not None else store.folder / body.name
        try:
            adapter = await store.add(body.name, path)
        except FileExistsError:
            raise HTTPException(409, f"adapter '{clip(body.name, 100)}' is served (or still answering requests queued "
                                     "before its removal); remove it first, or wait") from None
        except (Refused, Unavailable) as exc:
            raise HTTPException(422, str(exc)) from None
        log(f"adapter '{adapter.name}' added from {path}")
        return {"adapter": {**adapter.describe(), "loaded": True}}

    @app.delete("/v1/admin/adapters/{name}")
    async def remove_adapter(name: str):
        try:
            waiting = await store.remove(name)
        except KeyError:
            raise HTTPException(404, f"no adapter '{clip(name, 100)}'") from None
        log(f"adapter '{name}' removed ({waiting} requests still answered)")
        return {"removed": name, "requests_answered_first": waiting}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify")
    async def classify(body: Classify):
        start = time.perf_counter()
        try:
            entry = await store.acquire(body.adapter)
        except KeyError:
            requests.labels("(unknown)", "404").inc()
            raise HTTPException(404, f"no adapter '{clip(body.adapter, 100)}' (GET /v1/adapters lists them)") from None
        except (Refused, Unavailable) as exc:
            requests.labels(clip(body.adapter, 100), "503").inc()
            raise HTTPException(503, str(exc)) from None
        adapter, status = entry.adapter, "200"
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
            await store.release(entry)
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


