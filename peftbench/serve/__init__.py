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

import hmac
import math
import os
import sys
from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.serve.adapters import Adapter, describe_memory, load_adapters, parse_checkpoints
from peftbench.serve.app import NO_TOKEN, Limits, create_app
from peftbench.serve.batching import Batcher, encode_request
from peftbench.serve.store import AdapterStore, log

__all__ = ["Adapter", "AdapterStore", "Batcher", "Limits", "check_options", "create_app", "describe_memory",
           "encode_request", "load_adapters", "parse_checkpoints", "read_token", "serve"]


MIN_TOKEN_CHARS = 16


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_token(token_file: str | None, variable: str = "PEFTBENCH_TOKEN", option: str = "--token-file") -> str:
    """A bearer token, from ``token_file`` or the environment ``variable``; warns (stderr) when the file is readable
    by other users or the token is short."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
            mode = Path(token_file).stat().st_mode & 0o777
        except OSError as exc:
            raise PeftbenchError(f"{option} {token_file}: {exc.strerror}") from None
        if mode & 0o044:
            warn(f"{option} {token_file} can be read by other users (mode {mode:o}): chmod 600 {token_file}")
    else:
        token = os.environ.get(variable, "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        warn(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones "
             "(head -c 32 /dev/urandom | base64)")
    return token


def check_options(port: int, limits: Limits, max_batch: int, max_wait_ms: float, max_loaded: int | None = None) -> None:
    """Refuse serve options no server can work with, before anything is loaded."""
    for option, value, ok, rule in (("--port", port, 0 < port < 65536, "in 1..65535"),
                                    ("--max-loaded", max_loaded, max_loaded is None or max_loaded >= 1, ">= 1"),
                                    ("--max-batch", max_batch, max_batch >= 1, ">= 1"),
                                    ("--max-wait-ms", max_wait_ms, math.isfinite(max_wait_ms) and max_wait_ms >= 0,
                                     "a finite number >= 0"),
                                    ("--max-texts", limits.max_texts, limits.max_texts >= 1, ">= 1"),
                                    ("--max-chars", limits.max_chars, limits.max_chars >= 1, ">= 1")):
        if not ok:
            raise PeftbenchError(f"{option} must be {rule}, got {value}")


def serve(specs: list[str], host: str, port: int, token_file: str | None, device: str, limits: Limits,
          max_batch: int, max_wait_ms: float, docs: bool = False, adapters_dir: str | None = None,
          max_loaded: int | None = None, admin_token_file: str | None = None) -> None:
    """Load the checkpoints (and read the adapters folder) and serve them until SIGINT/SIGTERM (uvicorn finishes
    requests in flight)."""
    try:
        import uvicorn
    except ImportError:
        raise PeftbenchError("peftbench serve needs FastAPI and uvicorn: pip install 'peftbench[serve]'") from None
    check_options(port, limits, max_batch, max_wait_ms, max_loaded)
    if not specs and adapters_dir is None:
        raise PeftbenchError("nothing to serve: name checkpoints ([NAME=]CKPT) or an --adapters-dir")
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise PeftbenchError(f"--adapters-dir {adapters_dir}: not a directory")
    token = read_token(token_file)
    if not token:
        raise PeftbenchError(NO_TOKEN)
    admin_token = read_token(admin_token_file, "PEFTBENCH_ADMIN_TOKEN", "--admin-token-file") or None
    if admin_token is not None and hmac.compare_digest(admin_token.encode(), token.encode()):
        raise PeftbenchError("the admin token is the bearer token: give the admin endpoints a token of their own")
    bases: dict = {}
    adapters = load_adapters(parse_checkpoints(specs), device, bases)
    store = AdapterStore(adapters, device, Path(adapters_dir) if adapters_dir else None, max_loaded, bases)
    if adapters_dir is not None:
        for line in store.scan():
            log(f"refused: {line}")
        store.warm()
    folder = f"; {len(store.names()) - len(adapters)} more in {adapters_dir}, loaded on first use" + (
        f" (at most {max_loaded} at once)" if max_loaded else "") if adapters_dir else ""
    print(f"peftbench serve: {describe_memory(adapters)}{folder}", flush=True)
    app = create_app(store, token, device, limits, max_batch, max_wait_ms, docs, admin_token)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
