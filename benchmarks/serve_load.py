"""``peftbench serve`` under a bounded load, on loopback; and its one-pass mixed-adapter batches.

Load (the default): starts the server in its own process for each setting, sends N requests (one
text each, C at a time) from this process and prints requests/s and latency percentiles, with the
ratio against a server that does not batch (``--max-batch 1 --max-wait-ms 0``), measured in the same
run. Settings: one adapter; four LoRA adapters mixed (round robin); the same two without batching.

One pass (``--mixed BASE``): random-init adapters of a saved base (the committed zh-mini), a batch of
64 texts whose rows ask for 1, 4, 16 and 64 adapters, timed through peftbench's shared base
(:mod:`peftbench.mixed`) and through PEFT's ``adapter_names`` path (LoRA only), with the ratio against
a one-adapter batch in the same run; then every method mixed in one batch, with each row's largest
gap to its adapter run alone (the exactness table).

    python benchmarks/serve_load.py --tiny                      # trains 4 tiny LoRA adapters first
    python benchmarks/serve_load.py a=ckpt1 b=ckpt2 c=ckpt3 d=ckpt4 -n 2000 -c 32
    python benchmarks/serve_load.py --mixed leaderboards/zh-mini/model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx

TEXTS = ["股市今天大涨，银行板块领涨", "这部电影的演员表演非常出色", "球队在决赛中以三比一获胜",
         "新款手机发布，售价下调", "天气转凉，注意添衣", "歌手宣布举办巡回演唱会",
         "基金经理看好下半年行情", "综艺节目收视率创新高"]


def tiny_adapters(root: Path) -> list[str]:
    """Four LoRA adapters (different learning rates) on the tiny backbone and the synthetic task."""
    from peftbench import config
    from peftbench.train import run

    specs = []
    for i, lr in enumerate(("5e-3", "1e-2", "2e-3", "3e-3")):
        cfg = config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48",
                                 "method.name=lora", f"train.lr={lr}", "train.max_steps=30",
                                 "train.measure_inference=false", f"output_dir={root / f'lora{i}'}"])
        specs.append(f"lora{i}={run(cfg).record['checkpoint']}")
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(specs: list[str], token: str, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    limits = [] if batching else ["--max-batch", "1", "--max-wait-ms", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "peftbench", "serve", *specs, "--port", str(port), *limits],
                            env={**os.environ, "PEFTBENCH_TOKEN": token}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}") from None
            time.sleep(0.1)
    raise SystemExit("the server did not start in 120 s")


async def load(url: str, token: str, adapters: list[str], n: int, concurrency: int) -> dict:
    """``n`` requests, at most ``concurrency`` in flight; the first ``concurrency`` are a warm-up."""
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int) -> float:
            async with limit:
                start = time.perf_counter()
                response = await client.post("/v1/classify", json={"adapter": adapters[i % len(adapters)],
                                                                    "texts": [TEXTS[i % len(TEXTS)]]})
                response.raise_for_status()
                return time.perf_counter() - start

        await asyncio.gather(*(one(i) for i in range(concurrency)))
        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"req_s": n / seconds, "p50": 1e3 * q[49], "p95": 1e3 * q[94], "p99": 1e3 * q[98]}


# -- one pass: a batch that mixes adapters ---------------------------------------------------------------------------

LABELS = ["0", "1", "2", "3"]
EVERY_METHOD = {"lora": {}, "lora-r16": {"name": "lora", "r": 16}, "adalora": {}, "ia3": {}, "bitfit": {},
                "adapter": {}, "adapter-pfeiffer": {"name": "adapter", "variant": "pfeiffer"},
                "prefix": {"reparameterize": False}, "prompt": {}}


def base_model(base: str):
    """The base as a sequence classifier of four labels (its pooler, when it has none, drawn now)."""
    from transformers import AutoTokenizer

    from peftbench.config import ModelConfig
    from peftbench.models import from_pretrained

    pad = AutoTokenizer.from_pretrained(base).pad_token_id
    return from_pretrained(base, ModelConfig(name_or_path=base), LABELS, pad)


def random_adapter(base: str, kind: str, seed: int):
    """A random-init adapter of ``kind`` (EVERY_METHOD) on ``base``, every trained tensor moved off its init (a
    zero LoRA B or unit IA3 vector would change nothing), in eval mode."""
    import torch

    from peftbench.methods import RunContext, get_method, lacked_modules

    settings = {"name": kind, **EVERY_METHOD[kind]}
    method = get_method(settings["name"])(get_method(settings["name"]).Config(**settings))
    torch.manual_seed(seed)
    model, loaded = base_model(base)
    model = method.apply(model, RunContext(total_steps=100, num_labels=len(LABELS),
                                           lacked_modules=lacked_modules(loaded.new_weights)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if method.is_trainable(name):
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def batch_inputs(base: str, rows: int):
    """``rows`` texts of TNEWS-like lengths, tokenised by the base's tokenizer and padded on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(rows)]
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")), tokenizer


def rows_per_second(run, rows: int, passes: int) -> float:
    """Rows per second of the median of ``passes`` timed passes, after two warm-up passes (on the CPU: no device
    to synchronise; the median keeps a pass that another process slowed out of the figure)."""
    for _ in range(2):
        run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def mixed_table(base: str, passes: int, sizes: tuple[int, ...], rows: int = 64) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from peftbench.mixed import SharedBase

    inputs, tokenizer = batch_inputs(base, rows)
    shared = SharedBase(base_model(base)[0].eval())
    for i in range(max(sizes)):  # LoRA adapters of ranks 8 and 16
        shared.add(f"lora{i}", random_adapter(base, "lora" if i % 2 == 0 else "lora-r16", seed=i))
    peft_model, _ = base_model(base)
    peft_model = get_peft_model(peft_model, LoraConfig(task_type="SEQ_CLS", r=8), adapter_name="lora0")
    for i in range(1, max(sizes)):
        peft_model.add_adapter(f"lora{i}", LoraConfig(task_type="SEQ_CLS", r=8 if i % 2 == 0 else 16))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    peft_model.eval()
    results = {}
    with torch.inference_mode():
        for k in sizes:
            names = [f"lora{i % k}" for i in range(rows)]
            one_pass = rows_per_second(lambda: shared.forward(inputs, names), rows, passes)
            if k == 1:
                peft_model.set_adapter("lora0")
                peft = rows_per_second(lambda: peft_model(**inputs), rows, passes)
            else:
                peft = rows_per_second(lambda: peft_model(**inputs, adapter_names=names), rows, passes)
            results[k] = (one_pass, peft)
    env = _environment()
    length = int(inputs["attention_mask"].sum(1).float().mean())
    print(f"# one forward pass, {rows} texts (mean {length} tokens, padded to {inputs['input_ids'].shape[1]}) "
          f"mixing k LoRA adapters (ranks 8 and 16) of {base}; the median of {passes} timed passes after 2 warm-up")
    print(env)
    print("| adapters in the batch | one pass texts/s | vs one adapter | PEFT adapter_names texts/s | "
          "one pass vs PEFT |")
    print("|---|---|---|---|---|")
    baseline = results[sizes[0]][0]
    for k, (one_pass, peft) in results.items():
        print(f"| {k} | {one_pass:.0f} | {one_pass / baseline:.2f}× | {peft:.0f} | {one_pass / peft:.2f}× |")
    exactness(base, inputs, rows, passes)


def exactness(base: str, inputs: dict, rows: int, passes: int) -> None:
    """Every method (two adapters each) mixed in one batch: each row's largest gap to its adapter alone."""
    import torch

    from peftbench.mixed import SharedBase

    shared = SharedBase(base_model(base)[0].eval())
    names = [f"{kind}/{i}" for kind in EVERY_METHOD for i in range(2)]
    alone = {}
    with torch.inference_mode():
        for j, name in enumerate(names):
            model = random_adapter(base, name.split("/")[0], seed=100 + j)
            alone[name] = model(**inputs).logits.float()
            shared.add(name, model)
        order = [names[i % len(names)] for i in range(rows)]
        mixed = shared.forward(inputs, order)
        speed = rows_per_second(lambda: shared.forward(inputs, order), rows, passes)
        one = rows_per_second(lambda: shared.forward(inputs, [names[0]] * rows), rows, passes)
        def in_passes(passes_rows: list[list[int]]):
            return lambda: [shared.forward({k: v[part] for k, v in inputs.items()}, [order[i] for i in part])
                            for part in passes_rows]

        served = rows_per_second(in_passes([[i for i, n in enumerate(order) if n.startswith("prompt") == p]
                                            for p in (False, True)]), rows, passes)
        apart = rows_per_second(in_passes([[i for i, n in enumerate(order) if n == name] for name in names]), rows,
                                passes)
    gaps: dict[str, float] = {}
    for i, (name, logits) in enumerate(zip(order, mixed)):
        kind = name.split("/")[0]
        gaps[kind] = max(gaps.get(kind, 0.0), (logits - alone[name][i]).abs().max().item())
    print(f"\n# exactness: {len(names)} adapters of {len(EVERY_METHOD)} methods mixed in one batch of {rows} texts "
          "(fp32): each row's largest |logit gap| to its adapter run alone")
    print(f"# that batch, texts/s: {speed:.0f} in one pass (every row padded by the prompt rows' 20 virtual tokens); "
          f"{served:.0f} as the server runs it (prompt rows in a pass of their own), {served / apart:.2f}× one pass "
          f"per adapter ({apart:.0f}); a batch of one LoRA adapter: {one:.0f}")
    print("| method | rows | largest gap |")
    print("|---|---|---|")
    for kind, gap in gaps.items():
        print(f"| {kind} | {sum(n.split('/')[0] == kind for n in order)} | {gap:.1e} |")


def _environment() -> str:
    from peftbench.records import environment

    env = environment()
    return (f"# {env['device_name']} ({env['device']}), {env['cpu_count']} CPUs, torch {env['torch']} "
            f"({__import__('torch').get_num_threads()} threads), transformers {env['transformers']}, "
            f"peft {env['peft']}, git {str(env['git_sha'])[:10]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed", metavar="BASE", help="the one-pass table on random adapters of this base")
    parser.add_argument("--passes", type=int, default=20, help="--mixed: timed passes per setting")
    parser.add_argument("--sizes", default="1,4,16,64", help="--mixed: adapters per batch (the first is the baseline)")
    parser.add_argument("checkpoints", nargs="*", metavar="NAME=CKPT", help="four LoRA adapters on one base")
    parser.add_argument("--tiny", action="store_true", help="train four tiny LoRA adapters and serve those")
    parser.add_argument("-n", type=int, default=400, help="timed requests per setting")
    parser.add_argument("-c", type=int, default=16, help="requests in flight")
    args = parser.parse_args()
    if args.mixed:
        return mixed_table(args.mixed, args.passes, tuple(int(k) for k in args.sizes.split(",")))
    tmp = tempfile.TemporaryDirectory()
    specs = tiny_adapters(Path(tmp.name)) if args.tiny else args.checkpoints
    if len(specs) < 2:
        parser.error("give several NAME=CKPT LoRA adapters of one base, or --tiny")
    names = [s.partition("=")[0] for s in specs]
    token = "benchmark"
    rows = []
    for batching in (False, True):
        proc, url = start_server(specs, token, batching)
        try:
            for label, adapters in (("one adapter", names[:1]), (f"{len(names)} adapters mixed", names)):
                rows.append((label, batching, asyncio.run(load(url, token, adapters, args.n, args.c))))
        finally:
            proc.terminate()
            proc.wait()
    from peftbench.records import environment

    env = environment()
    print(f"# peftbench serve under load: {args.n} requests of one text, {args.c} in flight, loopback")
    print(f"# {env['device_name']} ({env['device']}), {env['cpu_count']} CPUs, torch {env['torch']}, "
          f"transformers {env['transformers']}, peft {env['peft']}, uvicorn {version('uvicorn')}, "
          f"fastapi {version('fastapi')}, git {str(env['git_sha'])[:10]}; server and client on one machine")
    print("| adapters | batching | req/s | vs no batching | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    baseline = {label: r for label, batching, r in rows if not batching}
    for label, batching, r in rows:
        ratio = r["req_s"] / baseline[label]["req_s"]
        print(f"| {label} | {'dynamic (≤64 texts, 5 ms)' if batching else 'none'} | {r['req_s']:.0f} | "
              f"{ratio:.2f}× | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} |")


if __name__ == "__main__":
    main()
