"""``peftbench serve --adapters-dir``: adapters loaded on first use into an LRU, refused one by one, and added and
removed by an admin while the server runs."""

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_serve import TOKEN, classify, start_server

from peftbench.client import Client, ServerError

ADMIN = "admin-token-0123456789"
FOLDER = ("lora", "ia3", "prefix", "adapter")


def metric(client, name: str) -> float:
    return float(next(line.split()[-1] for line in client.get("/metrics").text.splitlines()
                      if line.startswith(name + " ") or line.startswith(name + "{")))


@pytest.fixture(scope="module")
def folder_server(trained_variants, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    folder = root / "adapters"
    folder.mkdir()
    for name in FOLDER:
        shutil.copytree(trained_variants[name].record["checkpoint"], folder / name)
    (folder / "notes").mkdir()  # not a checkpoint
    (folder / "notes" / "readme.txt").write_text("hello")
    cut = shutil.copytree(trained_variants["bitfit"].record["checkpoint"], folder / "cut")  # a weight file cut short
    weights = cut / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    other = shutil.copytree(trained_variants["lora"].record["checkpoint"], folder / "otherbase")
    meta = json.loads((other / "peftbench.json").read_text())
    meta["base"]["fingerprint"] = "0" * 64  # trained on another base than the one it names
    (other / "peftbench.json").write_text(json.dumps(meta))
    for name, token in (("token", TOKEN), ("admin", ADMIN)):
        (root / name).write_text(token)
        (root / name).chmod(0o600)
    proc, url = start_server("--adapters-dir", str(folder), "--max-loaded", "2", "--token-file", str(root / "token"),
                             "--admin-token-file", str(root / "admin"), "--max-wait-ms", "300")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    yield proc, client, url, trained_variants, root
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


def test_a_folder_serves_its_adapters_loaded_on_first_use_into_an_lru(folder_server):
    _, client, url, variants, _ = folder_server
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {*FOLDER, "otherbase"}  # the two damaged folders are refused at start
    assert [n for n, a in listed.items() if a["loaded"]] == ["adapter"]  # the first, loaded at start (warm-up)
    first = {name: classify(client, name, ["股钱债涨跌", "天气"]).json()["predictions"] for name in FOLDER}
    assert metric(client, "peftbench_adapters_loaded") == 2  # --max-loaded 2: the least recently used let go
    assert metric(client, "peftbench_adapter_evictions_total") == len(FOLDER) + 1 - 2
    assert metric(client, "peftbench_adapter_load_seconds_count") == len(FOLDER)
    again = {name: classify(client, name, ["股钱债涨跌", "天气"]).json()["predictions"] for name in FOLDER}
    assert again == first  # evicted and loaded again: the same answers
    assert metric(client, "peftbench_adapter_load_seconds_count") == 2 * len(FOLDER)
    loaded = [a["name"] for a in client.get("/v1/adapters").json()["adapters"] if a["loaded"]]
    assert set(loaded) == {"prefix", "adapter"}  # the two used last


def test_a_bad_folder_is_refused_alone_with_a_log_line(folder_server):
    proc, client, *_ = folder_server
    response = classify(client, "otherbase", ["天气"])
    assert response.status_code == 503 and "could not be loaded" in response.json()["detail"], response.text
    assert "field 'base.fingerprint'" in response.json()["detail"]
    assert classify(client, "otherbase", ["天气"]).status_code == 404  # no longer served
    assert classify(client, "lora", ["天气"]).status_code == 200  # the others still are
    assert "otherbase" not in {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}


def test_the_admin_adds_and_removes_adapters_and_a_removed_one_answers_its_queue(folder_server):
    _, client, url, variants, _ = folder_server
    user, admin = Client(url, TOKEN), Client(url, ADMIN)
    with pytest.raises(ServerError) as denied:  # the bearer token does not open the admin endpoints
        user.add_adapter("bitfit", variants["bitfit"].record["checkpoint"])
    assert denied.value.status == 401
    with pytest.raises(ServerError) as wrong_door:  # and the admin token opens nothing else
        admin.classify("lora", ["天气"])
    assert wrong_door.value.status == 401
    broken = shutil.copytree(variants["prefix"].record["checkpoint"], folder_server[4] / "mended")  # refused,
                                                                                                    # then mended
    (broken / "peftbench.json").write_text("{")
    with pytest.raises(ServerError) as refused:
        admin.add_adapter("mended", str(broken))
    assert refused.value.status == 422 and "not valid JSON" in refused.value.detail, refused.value.detail
    shutil.copy(Path(variants["prefix"].record["checkpoint"]) / "peftbench.json", broken / "peftbench.json")
    assert admin.add_adapter("mended", str(broken))["method"] == "prefix"
    assert user.classify("mended", ["天气"])[0]["label"] in {"0", "1", "2", "3"}
    added = admin.add_adapter("bitfit", variants["bitfit"].record["checkpoint"])
    assert added["name"] == "bitfit" and added["method"] == "bitfit" and added["loaded"] is True
    assert user.classify("bitfit", ["天气"])[0]["label"] in {"0", "1", "2", "3"}
    with pytest.raises(ServerError) as taken:
        admin.add_adapter("bitfit", variants["lora"].record["checkpoint"])
    assert taken.value.status == 409
    answers = []
    queued = threading.Thread(target=lambda: answers.append(classify(client, "ia3", ["股钱债涨跌"])))
    queued.start()
    time.sleep(0.2)  # the request waits in the batcher (--max-wait-ms 300), or for its adapter's load
    removed = admin.remove_adapter("ia3")
    queued.join()
    assert removed == 1  # the queued request
    assert answers[0].status_code == 200  # queued before the removal: answered
    assert classify(client, "ia3", ["天气"]).status_code == 404  # after it: gone
    with pytest.raises(ServerError) as gone:
        admin.remove_adapter("ia3")
    assert gone.value.status == 404


def test_an_adapter_removed_while_it_loads_leaves_memory_once_its_request_is_answered(monkeypatch):
    """The request that started the load is answered; then the adapter leaves the shared base (detached), not
    kept for good outside every list."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from peftbench.serve import store as store_lib

    gate, detached = threading.Event(), []
    monkeypatch.setattr(store_lib, "read_adapter", lambda name, path, device, bases: (gate.wait(10), name)[1])
    monkeypatch.setattr(store_lib, "attach", lambda name: SimpleNamespace(name=name, members=None))
    monkeypatch.setattr(store_lib, "detach", lambda adapter: detached.append(adapter.name))

    async def remove_while_loading():
        store = store_lib.AdapterStore({})
        store.model_thread = ThreadPoolExecutor(1)
        store.entries["a"] = store_lib.Entry("a", Path("a"), {})
        request = asyncio.ensure_future(store.acquire("a"))
        await asyncio.sleep(0.05)  # the load waits at the gate
        assert await store.remove("a") == 1
        gate.set()
        entry = await request
        assert entry.adapter.name == "a" and detached == []  # answered with it
        await store.release(entry)
        return store

    store = asyncio.run(remove_while_loading())
    assert detached == ["a"] and not store.recent and not store.draining

    def refused(name, path, device, bases):
        raise store_lib.PeftbenchError(f"{path}: damaged")

    monkeypatch.setattr(store_lib, "read_adapter", refused)

    async def refused_on_first_use():
        store = store_lib.AdapterStore({})
        store.model_thread = ThreadPoolExecutor(1)
        store.entries["b"] = store_lib.Entry("b", Path("b"), {})
        with pytest.raises(store_lib.Refused, match="no longer served"):
            await store.acquire("b")
        return store

    store = asyncio.run(refused_on_first_use())  # the name is free for a mended copy (not held by a drain)
    assert "b" not in store.entries and not store.draining


def test_the_log_names_each_refused_folder_and_each_change(folder_server):  # last: it stops the server
    proc, *_ = folder_server
    proc.terminate()
    out = proc.stdout.read()
    proc.wait(timeout=30)
    for line in ("refused: ", "notes: not a peftbench checkpoint", "cut/trainable.safetensors: damaged weight file",
                 "adapter 'otherbase' refused: ", "adapter 'bitfit' added from ", "adapter 'ia3' removed (1 requests"):
        assert line in out, (line, out)
    assert "0 adapters: 0 on 0 shared bases" in out and "5 more in " in out, out
