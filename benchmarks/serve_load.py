"""``peftbench serve`` under a bounded load, on loopback.

Starts the server in its own process for each setting, sends N requests (one text each,
C at a time) from this process and prints requests/s and latency percentiles, with the
ratio against a server that does not batch (``--max-batch 1 --max-wait-ms 0``), measured
in the same run. Settings: one adapter; four LoRA adapters mixed (round robin); the same
two without batching.

    python benchmarks/serve_load.py --tiny                      # trains 4 tiny LoRA adapters first
    python benchmarks/serve_load.py a=ckpt1 b=ckpt2 c=ckpt3 d=ckpt4 -n 2000 -c 32
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", metavar="NAME=CKPT", help="four LoRA adapters on one base")
    parser.add_argument("--tiny", action="store_true", help="train four tiny LoRA adapters and serve those")
    parser.add_argument("-n", type=int, default=400, help="timed requests per setting")
    parser.add_argument("-c", type=int, default=16, help="requests in flight")
    args = parser.parse_args()
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
