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
import random
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


# -- many adapters: a folder, loaded on first use -------------------------------------------------------------------

FOLDER_METHODS = ("lora", "ia3", "prefix")


def adapter_folder(base: str, root: Path, count: int) -> Path:
    """``count`` adapters of ``base`` in one folder, LoRA, IA3 and prefix in turn: one short run per method, copied
    with its trained tensors drawn afresh (random-init adapters of one base, each its own checkpoint)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from peftbench import config
    from peftbench.train import run

    seeds = {}
    for method in FOLDER_METHODS:
        cfg = config.load(None, ["task.name=synthetic", f"model.name_or_path={base}", "task.max_length=48",
                                 f"method.name={method}", "train.max_steps=1", "train.measure_inference=false",
                                 f"output_dir={root / 'runs' / method}"])
        seeds[method] = Path(run(cfg).record["checkpoint"])
    folder = root / f"adapters-{count}"
    generator = torch.Generator().manual_seed(count)
    for i in range(count):
        method = FOLDER_METHODS[i % len(FOLDER_METHODS)]
        target = shutil.copytree(seeds[method], folder / f"{method}-{i:03d}")
        for weights in target.glob("*.safetensors"):
            if weights.name in ("adapter_model.safetensors", "trainable.safetensors"):
                tensors = load_file(str(weights))
                save_file({k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()},
                          str(weights))
    return folder


def skewed(count: int, n: int, seed: int = 0) -> list[int]:
    """``n`` adapter indices with a Zipf-like skew (weight 1 / rank^1.1): a few hot adapters and a long tail."""
    rng = random.Random(seed)
    return rng.choices(range(count), weights=[1 / (r + 1) ** 1.1 for r in range(count)], k=n)


def folder_load(url: str, token: str, names: list[str], picks: list[int], concurrency: int, midway=None) -> dict:
    """The requests (one text each) through :class:`peftbench.client.Client`, ``concurrency`` at a time; ``midway``
    runs once half of them are answered (an admin's change under load). A request for an adapter removed meanwhile
    (404) is counted, not timed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from peftbench.client import Client, ServerError

    client = Client(url, token, timeout=300)
    answered, gone, lock = [0], [0], threading.Lock()

    def one(i: int) -> float | None:
        start = time.perf_counter()
        try:
            client.classify(names[picks[i]], [TEXTS[i % len(TEXTS)]])
        except ServerError as exc:
            if exc.status != 404:
                raise
            gone[0] += 1
            return None
        with lock:
            answered[0] += 1
            half = answered[0] == len(picks) // 2
        if half and midway is not None:
            threading.Thread(target=midway).start()  # the admin's change, beside the traffic
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for t in pool.map(one, range(len(picks))) if t is not None]
    seconds = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"req_s": len(latencies) / seconds, "p50": 1e3 * q[49], "p95": 1e3 * q[94], "p99": 1e3 * q[98],
            "gone": gone[0]}


def admin_change(url: str, admin_token: str, hot: str, source: Path):
    """Midway through the load: the admin removes the hottest adapter and adds a copy of another as ``added``."""
    from peftbench.client import Client

    def change():
        admin = Client(url, admin_token, timeout=300)
        start = time.perf_counter()
        change.done = {"removed": hot, "queued_answered": admin.remove_adapter(hot),
                       "remove_ms": 1e3 * (time.perf_counter() - start)}
        start = time.perf_counter()
        admin.add_adapter("added", str(source))
        change.done["add_ms"] = 1e3 * (time.perf_counter() - start)

    return change


def server_facts(url: str, token: str, pid: int) -> dict:
    """Loads, evictions and mean load time from /metrics; resident memory of the server process."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}).text
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and line[0] != "#"}
    loads = values.get("peftbench_adapter_load_seconds_count", 0)
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"loads": int(loads), "evictions": int(values.get("peftbench_adapter_evictions_total", 0)),
            "load_ms": 1e3 * values.get("peftbench_adapter_load_seconds_sum", 0) / max(loads, 1),
            "loaded": int(values.get("peftbench_adapters_loaded", 0)), "rss_mib": rss / 1024}


def folder_table(base: str, counts: tuple[int, ...], n: int, concurrency: int, max_loaded: int) -> None:
    from peftbench.client import Client

    tmp = tempfile.TemporaryDirectory()
    token, admin_token = "benchmark-token-0123456789", "benchmark-admin-0123456789"
    rows, changed = [], {}
    for count in counts:
        folder = adapter_folder(base, Path(tmp.name) / str(count), count)
        names = sorted(p.name for p in folder.iterdir())
        random.Random(0).shuffle(names)  # the hot ones of every method
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "peftbench", "serve", "--adapters-dir", str(folder),
                                 "--max-loaded", str(max_loaded), "--port", str(port)],
                                env={**os.environ, "PEFTBENCH_TOKEN": token, "PEFTBENCH_ADMIN_TOKEN": admin_token},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                try:
                    if httpx.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            picks = skewed(count, n)
            change = admin_change(url, admin_token, names[0], folder / names[-1]) if count == counts[-1] else None
            result = folder_load(url, token, names, picks, concurrency, change)
            rows.append((count, len(set(picks)), result, server_facts(url, token, proc.pid)))
            if change is not None and hasattr(change, "done"):
                changed = change.done
                changed["added_answers"] = len(Client(url, token).classify("added", TEXTS))
        finally:
            proc.terminate()
            proc.wait()
    print(f"# peftbench serve --adapters-dir --max-loaded {max_loaded}: {n} requests of one text, {concurrency} in "
          f"flight, adapters picked with weight 1/rank^1.1 (LoRA, IA3, prefix in turn, random-init, of {base}); "
          "server and client on one machine; the first use of an adapter loads it")
    print(_environment())
    print("| adapters | used | req/s | p50 ms | p95 ms | p99 ms | loads | evictions | mean load ms (queue included) | "
          "in memory | server RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for count, used, r, f in rows:
        print(f"| {count} | {used} | {r['req_s']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
              f"{f['loads']} | {f['evictions']} | {f['load_ms']:.0f} | {f['loaded']} | {f['rss_mib']:.0f} |")
    if not changed:
        return
    gone = rows[-1][2]["gone"]
    print(f"# with {counts[-1]} adapters, once half the requests were answered, the admin removed the hottest adapter "
          f"'{changed['removed']}' in {changed['remove_ms']:.0f} ms ({changed['queued_answered']} requests queued for "
          f"it answered; {gone} later ones answered 404) and added one in {changed['add_ms']:.0f} ms, which then "
          f"answered {changed['added_answers']} texts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed", metavar="BASE", help="the one-pass table on random adapters of this base")
    parser.add_argument("--folder", metavar="BASE", help="the adapters-folder table on random adapters of this base")
    parser.add_argument("--counts", default="1,16,256", help="--folder: adapters in the folder, one server each")
    parser.add_argument("--max-loaded", type=int, default=64, help="--folder: the server's --max-loaded")
    parser.add_argument("--passes", type=int, default=20, help="--mixed: timed passes per setting")
    parser.add_argument("--sizes", default="1,4,16,64", help="--mixed: adapters per batch (the first is the baseline)")
    parser.add_argument("checkpoints", nargs="*", metavar="NAME=CKPT", help="four LoRA adapters on one base")
    parser.add_argument("--tiny", action="store_true", help="train four tiny LoRA adapters and serve those")
    parser.add_argument("-n", type=int, default=400, help="timed requests per setting")
    parser.add_argument("-c", type=int, default=16, help="requests in flight")
    args = parser.parse_args()
    if args.folder:
        return folder_table(args.folder, tuple(int(k) for k in args.counts.split(",")), args.n, args.c,
                            args.max_loaded)
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
