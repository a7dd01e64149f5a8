"""``peftbench serve``: a real server on a free loopback port, talked to over HTTP."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import NER_ARGS, NER_SETTINGS, variant_config
from transformers import AutoTokenizer

from peftbench import config
from peftbench.checkpoint import read_meta
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.inference import SplitBatches, predict
from peftbench.train import run

TOKEN = "s3cret-token"
SERVED = {"lora": "lora", "rslora": "lora-rslora", "dora": "lora-dora", "adapter": "adapter", "full": "full",
          "loha": "peft"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``peftbench serve ARGS`` on a free loopback port (no token from the environment), once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTBENCH_TOKEN", "PEFTBENCH_ADMIN_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "peftbench", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read())
            time.sleep(0.1)
    pytest.fail("the server did not answer in 60 s")


@pytest.fixture(scope="module")
def server(trained_variants, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "token").write_text(TOKEN + "\n")
    ckpts = {name: trained_variants[v].record["checkpoint"] for name, v in SERVED.items()}
    ner = config.load(None, [*NER_ARGS, "method.name=lora", *NER_SETTINGS["lora"], "train.max_steps=40",
                             "train.measure_inference=false", f"output_dir={root / 'ner'}"])
    ckpts["ner"] = run(ner).record["checkpoint"]  # a few steps: entities or not, predict and serve agree
    pissa = variant_config("lora", root / "pissa", "method.name=pissa", "train.lr=1e-3", "train.max_steps=20",
                           "train.measure_inference=false")
    ckpts["pissa"] = run(pissa).record["checkpoint"]  # saved as plain LoRA: it shares the LoRA base
    ckpts["ens"] = [ckpts["lora"], ckpts["rslora"]]  # an ensemble: the two LoRAs' probabilities averaged
    specs = [f"{n}={'+'.join(c) if isinstance(c, list) else c}" for n, c in ckpts.items()]
    proc, url = start_server(*specs, "--token-file", str(root / "token"), "--max-wait-ms", "100", "--max-texts", "8",
                             "--max-chars", "50")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    yield proc, client, ckpts
    client.close()
    if proc.poll() is None:
        proc.kill()


def classify(client, adapter, texts, **extra):
    return client.post("/v1/classify", json={"adapter": adapter, "texts": texts, **extra})


def test_predictions_equal_peftbench_predict(server, tmp_path):
    _, client, ckpts = server
    for name, ckpt in ckpts.items():
        rows = [json.loads(line) for line in predict(ckpt, "dev", None, tmp_path / f"{name}.jsonl").open()][:20]
        first = ckpt[0] if isinstance(ckpt, list) else ckpt
        texts = list(SplitBatches(read_meta(Path(first)), AutoTokenizer.from_pretrained(first), "dev").ds["text_a"])
        texts = texts[:20]
        got = []
        for start in range(0, len(texts), 8):
            response = classify(client, name, texts[start:start + 8])
            assert response.status_code == 200, response.text
            assert response.json()["adapter"] == name
            got += response.json()["predictions"]
        for want, have in zip(rows, got, strict=True):
            if name == "ner":
                assert have == {"text": want["text"], "entities": want["entities"]}
            else:
                assert (have["label"], have["label_name"]) == (want["label"], want["label_name"]), name
                assert abs(have["score"] - want["score"]) <= 1e-5, name


def test_adapters_share_one_base_and_mix_in_a_batch(server):
    _, client, _ = server
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {*SERVED, "ner", "pissa", "ens"}
    assert [m["run_id"] for m in listed["ens"]["members"]] == [listed["lora"]["run_id"], listed["rslora"]["run_id"]]
    assert [n for n, a in listed.items() if a["shares_base"]] == ["lora", "rslora", "adapter", "ner", "pissa"]
    reasons = {"dora": "DoRA", "full": "a whole model", "loha": "a PEFT loha layer"}  # a model of its own: why
    assert {n for n, a in listed.items() if not a["shares_base"]} == {*reasons, "ens"}
    assert all(reasons[n] in listed[n]["own_model"] for n in reasons), listed
    assert len({a["base"] for n, a in listed.items() if n in SERVED and n != "full"}) == 1
    assert listed["full"]["base"] is None  # a whole fine-tuned model
    alone = {name: classify(client, name, ["股钱债涨跌"]).json()["predictions"] for name in ("lora", "rslora", "dora")}
    barrier, results = threading.Barrier(12), []

    def request(i):
        name = ("lora", "rslora", "dora")[i % 3]
        barrier.wait()
        results.append((name, classify(client, name, ["股钱债涨跌"])))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    for name, response in results:  # bounded concurrent clients, each answered by its own adapter
        assert response.status_code == 200 and response.json()["predictions"] == alone[name]
    metrics = client.get("/metrics").text
    mixed = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("peftbench_mixed_batches_total")))
    assert mixed >= 1, metrics  # lora and rslora ran in one forward pass (DoRA has a model of its own)
    assert 'peftbench_request_seconds_count{adapter="dora"}' in metrics


def test_the_client_asks_for_top_k_labels_and_they_are_sorted_probabilities(server):
    """``peftbench.client.Client`` against the server: top_k=2 and null (every label); the top one is the
    answer; a bad top_k is refused with the server's detail."""
    from peftbench.client import Client, ServerError

    _, http, _ = server
    client = Client(str(http.base_url), TOKEN)
    assert client.healthy() and {a["name"] for a in client.adapters()} >= {"lora", "ens"}
    texts = ["股钱债涨跌", "星影歌剧"]
    plain = client.classify("lora", texts)
    two = client.classify("lora", texts, top_k=2)
    every = client.classify("lora", texts, top_k=None)
    labels = next(a for a in client.adapters() if a["name"] == "lora")["labels"]
    for p, t, e in zip(plain, two, every):
        assert "top_k" not in p and len(t["top_k"]) == 2 and len(e["top_k"]) == len(labels)
        assert t["top_k"] == e["top_k"][:2] and (t["top_k"][0]["label"], t["top_k"][0]["score"]) == (p["label"],
                                                                                                      p["score"])
        scores = [x["score"] for x in e["top_k"]]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    with pytest.raises(ServerError, match="422: top_k: a number of labels >= 1"):
        client.classify("lora", texts, top_k=-1)
    assert classify(http, "lora", texts, top_k=0).status_code == 422
    assert classify(http, "lora", texts, top_k=True).status_code == 422  # not a number of labels
    ner = client.classify("ner", ["张三在北京"], top_k=2)  # token classification: entity spans, no top_k
    assert set(ner[0]) == {"text", "entities"}


def test_predict_reads_plain_files_and_standard_input(server, tmp_path, monkeypatch, capsys):
    """``peftbench predict --input``: plain text, JSON lines, CSV and stdin give the rows the server gives."""
    import io

    from peftbench.cli import main

    _, http, ckpts = server
    texts = ["股钱债涨跌", "星影歌剧", "的的"]
    served = [classify(http, "lora", texts, top_k=2).json()["predictions"]]
    inputs = {"in.txt": "\n".join(texts[:2]) + "\n\n" + texts[2] + "\n",
              "in.jsonl": "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
              "in.csv": "text\n" + texts[0] + "\n\n" + "\n".join(texts[1:]) + "\n"}  # a blank line skipped
    for name, text in inputs.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(inputs["in.txt"].encode()), encoding="utf-8"))
    for name in [*inputs, "-"]:
        out = tmp_path / f"{name}.out.jsonl"
        source = name if name == "-" else str(tmp_path / name)
        assert main(["predict", ckpts["lora"], "--input", source, "--top-k", "2", "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == [0, 1, 2]
        assert [r["line"] for r in rows] == {"in.csv": [2, 4, 5], "in.jsonl": [1, 2, 3]}.get(name, [1, 2, 4])
        for row, want in zip(rows, served[0], strict=True):
            assert (row["label"], [x["label"] for x in row["top_k"]]) == (want["label"], [x["label"] for x in
                                                                                          want["top_k"]])
            assert abs(row["score"] - want["score"]) <= 1e-5
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert main(["predict", ckpts["lora"], "--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2: field 'text' missing or not text" in capsys.readouterr().err
    assert main(["predict", ckpts["lora"], "--input", str(tmp_path / "in.txt"), "--top-k", "0",
                 "--out", str(tmp_path / "x")]) == 2


def test_input_files_are_read_in_every_format_with_their_line_numbers(tmp_path, monkeypatch):
    import io

    from peftbench.inference import read_texts

    def stdin(data: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    (tmp_path / "q.csv").write_text('text\nx\n"y\nz"\nw\n', encoding="utf-8")
    assert read_texts(str(tmp_path / "q.csv"), False) == (["x", "y\nz", "w"], None, [2, 3, 5])
    (tmp_path / "u.jsonl").write_text('{"text": "a\u2028b"}\n\n{"text": "c"}\n', encoding="utf-8")
    assert read_texts(str(tmp_path / "u.jsonl"), False) == (["a\u2028b", "c"], None, [1, 3])
    (tmp_path / "b.txt").write_bytes("\ufeff{标题}\r\n第二\r\n".encode())  # .txt: plain text, however it starts
    assert read_texts(str(tmp_path / "b.txt"), False) == (["{标题}", "第二"], None, [1, 2])
    (tmp_path / "pairs.txt").write_text("a\tb\nc\td\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "pairs.txt"), True) == (["a", "c"], ["b", "d"], [1, 2])
    stdin("text_a,text_b\n甲,乙\n".encode())
    assert read_texts("-", True) == (["甲"], ["乙"], [2])
    stdin('\ufeff{"text": "x"}\n'.encode())
    assert read_texts("-", False) == (["x"], None, [1])
    stdin("一行\n".encode())
    assert read_texts("-", False) == (["一行"], None, [1])
    with pytest.raises(PeftbenchError, match="q.csv: this task classifies text pairs"):
        read_texts(str(tmp_path / "q.csv"), True)


def test_auth_and_errors(server):
    proc, client, _ = server
    url = str(client.base_url)
    assert httpx.get(url + "/healthz").json()["status"] == "ok"  # no token needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.post(url + "/v1/classify", json={"adapter": "lora", "texts": ["x"]}, headers=headers
                          ).status_code == 401
        assert httpx.get(url + "/v1/adapters", headers=headers).status_code == 401
    assert classify(client, "nope", ["x"]).status_code == 404
    bad = client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 422 and "detail" in bad.json()
    assert client.post("/v1/classify", json={"adapter": "lora"}).status_code == 422
    assert classify(client, "lora", []).status_code == 422
    assert classify(client, "lora", ["x"], text_pairs=["y"]).status_code == 422  # a single-text task
    too_many = classify(client, "lora", ["x"] * 9)
    assert too_many.status_code == 413 and "at most 8" in too_many.json()["detail"]
    assert classify(client, "lora", ["长" * 51]).status_code == 413
    assert proc.poll() is None


def serve_refusal(monkeypatch, capsys, *args: str) -> list[str]:
    """``peftbench serve ARGS`` in this process, which must refuse before loading or serving anything: its error
    lines."""
    import uvicorn

    import peftbench.serve

    def started(*_, **__):
        raise AssertionError("it went on to load checkpoints or serve")

    monkeypatch.setattr(peftbench.serve, "load_adapters", started)
    monkeypatch.setattr(uvicorn, "run", started)
    capsys.readouterr()
    assert main(["serve", *args]) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PEFTBENCH_TOKEN", raising=False)
    [error] = serve_refusal(monkeypatch, capsys, str(tmp_path))
    assert error.startswith("error: no token: set PEFTBENCH_TOKEN or pass --token-file"), error


@pytest.mark.slow
def test_load_benchmark_runs_and_prints_its_table(trained_variants, monkeypatch, capsys):
    import serve_load  # its two servers run as processes of their own

    specs = [f"{v}={trained_variants[v].record['checkpoint']}" for v in ("lora", "lora-rslora")]
    monkeypatch.setattr(sys, "argv", ["serve_load.py", *specs, "-n", "12", "-c", "4"])
    serve_load.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "req/s" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| one adapter", "none"], ["| 2 adapters mixed", "none"],
                                                  ["| one adapter", "dynamic (≤64 texts, 5 ms)"],
                                                  ["| 2 adapters mixed", "dynamic (≤64 texts, 5 ms)"]]
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)


def test_request_texts_are_encoded_as_data_files_are():
    """A server tokenises requests (pairs, NER characters) exactly as training and ``predict`` tokenise files."""
    from datasets import Dataset

    from peftbench.models import char_tokenizer
    from peftbench.tasks.kinds import CLASSIFICATION, TOKEN_CLASSIFICATION

    a, b = ["今天天气很好", "股"], ["明天下雨", "钱债涨跌星影歌剧综艺"]
    tok = char_tokenizer(a + b)
    ds = Dataset.from_dict({"text_a": a, "text_b": b, "label": [0, 1], "id": [0, 1],
                            "entities": [[], []]})
    for kind, pair in ((CLASSIFICATION, True), (CLASSIFICATION, False), (TOKEN_CLASSIFICATION, False)):
        spec = type("Spec", (), {"labels": ["O"], "tag_scheme": "bio"})
        files = kind.encode(ds, tok, spec, 12, pair)
        requests = kind.encode_texts(tok, a, b if pair else None, 12)
        for row, request in zip(files, requests, strict=True):
            for key in ("input_ids", "attention_mask", "token_type_ids", "length", "char_index"):
                assert row.get(key) == request.get(key), (kind.name, pair, key)


def test_a_request_that_cannot_be_tokenised_fails_alone(server):
    """16 good requests and one whose text is a lone surrogate (valid JSON), sent together: the bad one gets 400
    naming its text, the others their answers."""
    _, client, _ = server
    alone = classify(client, "lora", ["股钱债涨跌"]).json()["predictions"]
    barrier, results = threading.Barrier(17), {}

    def request(i):
        barrier.wait()
        if i == 16:
            results[i] = client.post("/v1/classify", content=b'{"adapter": "lora", "texts": ["ok", "\\ud800"]}',
                                     headers={"Content-Type": "application/json"})
        else:
            results[i] = classify(client, "lora", ["股钱债涨跌"])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[16].status_code == 400 and results[16].json()["detail"].startswith("texts[1]: cannot be tokenised")
    for i in range(16):
        assert results[i].status_code == 200 and results[i].json()["predictions"] == alone, results[i].text


def test_the_token_is_checked_before_the_body_is_read(server):
    _, client, _ = server
    url = str(client.base_url)
    body = b"{" + b"x" * (20 << 20)  # 20 MB, not JSON
    assert httpx.post(url + "/v1/classify", content=body, headers={"Content-Type": "application/json"},
                      timeout=60).status_code == 401
    too_big = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and "request body over" in too_big.json()["detail"]
    from fastapi.testclient import TestClient

    from peftbench.serve import Limits, create_app

    with TestClient(create_app({}, TOKEN, limits=Limits(max_texts=2, max_chars=10))) as local:  # sent in chunks
        chunked = local.post("/v1/classify", content=(b"x" * 1000 for _ in range(100)),
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert chunked.status_code == 413 and "request body over" in chunked.json()["detail"]


def test_the_admin_paths_do_not_exist_without_an_admin_token(server):
    _, client, ckpts = server
    for method, path in (("POST", "/v1/admin/adapters"), ("DELETE", "/v1/admin/adapters/lora")):
        response = client.request(method, path, json={"name": "x", "path": ckpts["lora"]})
        assert response.status_code == 404, response.text


def test_openapi_pages_are_off_unless_asked_for(server):
    _, client, _ = server
    url = str(client.base_url)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(url + path).status_code == 401  # no token: nothing but /healthz answers
        assert client.get(path).status_code == 404  # with the token: there is no such page
    from fastapi.testclient import TestClient

    from peftbench.serve import create_app

    with TestClient(create_app({}, TOKEN, docs=True)) as local:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert local.get(path).status_code == 200, path
        assert local.get("/v1/adapters").status_code == 401


@pytest.mark.parametrize("flag", [True, False])
def test_the_docs_flag_reaches_the_served_app(flag, tmp_path, monkeypatch):
    """``peftbench serve --docs`` opens the OpenAPI pages of the app it hands to uvicorn; without it they are gone."""
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    (tmp_path / "adapters").mkdir()
    token = tmp_path / "token"
    token.write_text(TOKEN, encoding="utf-8")
    token.chmod(0o600)
    argv = ["serve", "--adapters-dir", str(tmp_path / "adapters"), "--token-file", str(token)]
    assert main([*argv, "--docs"] if flag else argv) == 0
    with TestClient(served["app"]) as client:
        assert client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == (
            200 if flag else 404)


def test_a_failed_batch_is_run_again_job_by_job():
    """A forward pass that fails for any reason fails only the job that makes it fail."""
    import asyncio

    from peftbench.serve import Batcher

    passes = []

    class Probe(Batcher):
        def _forward(self, jobs):
            passes.append([job.texts[0] for job in jobs])
            if any(job.texts == ["boom"] for job in jobs):
                raise RuntimeError("boom")
            return [[{"text": job.texts[0]}] for job in jobs]

    adapter = type("A", (), {"batch_key": "one"})()

    async def main():
        batcher = Probe("cpu", max_batch=64, max_wait_ms=50)
        worker = asyncio.create_task(batcher.run())
        results = await asyncio.gather(*(batcher.predict(adapter, [t], []) for t in ("a", "boom", "b")),
                                       return_exceptions=True)
        worker.cancel()
        return results

    a, boom, b = asyncio.run(main())
    assert a == [{"text": "a"}] and b == [{"text": "b"}] and isinstance(boom, RuntimeError)
    assert passes == [["a", "boom", "b"], ["a"], ["boom"], ["b"]]  # one batch, then each job alone


def test_bad_serve_options_are_refused_at_start_up(tmp_path, monkeypatch, capsys):
    from peftbench.serve import Limits, check_options

    for args, message in (((8000, Limits(), 0, 5.0), "--max-batch must be >= 1, got 0"),
                          ((8000, Limits(), 64, -1.0), "--max-wait-ms must be a finite number >= 0"),
                          ((8000, Limits(), 64, float("nan")), "--max-wait-ms must be a finite number >= 0"),
                          ((8000, Limits(max_texts=0), 64, 5.0), "--max-texts must be >= 1"),
                          ((8000, Limits(max_chars=0), 64, 5.0), "--max-chars must be >= 1"),
                          ((70000, Limits(), 64, 5.0), "--port must be in 1..65535"),
                          ((8000, Limits(), 64, 5.0, 0), "--max-loaded must be >= 1, got 0")):
        with pytest.raises(PeftbenchError, match=message):
            check_options(*args)
    check_options(8000, Limits(), 64, 0.0)
    monkeypatch.setenv("PEFTBENCH_TOKEN", "x" * 32)
    monkeypatch.setenv("PEFTBENCH_ADMIN_TOKEN", "x" * 32)
    for args, message in (([], "error: nothing to serve: name checkpoints ([NAME=]CKPT) or an --adapters-dir"),
                          (["--adapters-dir", str(tmp_path / "none")], f"error: --adapters-dir {tmp_path / 'none'}: "
                                                                        "not a directory"),
                          (["--adapters-dir", str(tmp_path)], "error: the admin token is the bearer token: give the "
                                                              "admin endpoints a token of their own")):
        assert serve_refusal(monkeypatch, capsys, *args) == [message]
    monkeypatch.delenv("PEFTBENCH_ADMIN_TOKEN")
    assert serve_refusal(monkeypatch, capsys, str(tmp_path / "none"), "--max-batch", "0") == \
        ["error: --max-batch must be >= 1, got 0"]  # refused before loading


def test_a_short_or_readable_token_is_warned_about(tmp_path, capsys):
    from peftbench.serve import read_token

    token = tmp_path / "token"
    token.write_text("short\n")
    token.chmod(0o644)
    assert read_token(str(token)) == "short"
    err = capsys.readouterr().err
    assert f"--token-file {token} can be read by other users (mode 644)" in err
    assert "the token has 5 characters; use at least 16" in err
    token.write_text("x" * 32)
    token.chmod(0o600)
    read_token(str(token))
    assert capsys.readouterr().err == ""


def test_sigterm_finishes_requests_in_flight(server):  # last: it stops the server
    proc, client, _ = server
    answer = []
    thread = threading.Thread(target=lambda: answer.append(classify(client, "adapter", ["股钱债涨跌"])))
    thread.start()
    time.sleep(0.03)  # the request waits in the batcher (--max-wait-ms 100)
    proc.send_signal(signal.SIGTERM)
    thread.join()
    assert proc.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    assert answer[0].status_code == 200
    out = proc.stdout.read()
    assert "Waiting for application shutdown" in out and "Finished server process" in out, out
    assert re.search(r"9 adapters: 7 on 2 shared bases \(\d+\.\d MiB of their own tensors\), 3 in models of their "
                     r"own \(dora: ", out), out  # the ensemble's two members count

