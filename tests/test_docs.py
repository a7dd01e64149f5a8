"""The docs say what the code does: every example marked to run runs (docs/README.md says how they are marked),
every test a page names exists, and every config key a page names is a key."""

import dataclasses
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest
from conftest import tnews_folder

from peftbench import config
from peftbench.methods import get_method, method_names
from peftbench.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(`{3,})(.*)$")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, info string, code) of every top-level fenced block (a fence closes on as many backticks or more)."""
    blocks, open_fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if open_fence is None and match:
            open_fence, info, start, body = match.group(1), match.group(2).strip(), number, []
        elif open_fence is not None and match and len(match.group(1)) >= len(open_fence) and not match.group(2).strip():
            blocks.append((start, info, "\n".join(body)))
            open_fence = None
        elif open_fence is not None:
            body.append(line)
    return blocks


def examples() -> list[tuple[str, str, str]]:
    """(where, language, code) of every example marked to run, in the order they run."""
    found = []
    for page in PAGES:
        for line, info, code in fenced_blocks(page.read_text(encoding="utf-8")):
            words = info.split()
            if "example" in words[1:]:
                found.append((f"{page.relative_to(ROOT)}:{line}", words[0], code))
    return found


PYTHON_RUNNER = """
import json, sys, traceback
for line in sys.stdin:
    block = json.loads(line)
    try:
        exec(compile(block["code"], block["where"], "exec"), {"__name__": "__main__"})
        answer = "ok"
    except SystemExit as exc:
        answer = "ok" if exc.code in (None, 0) else traceback.format_exc()
    except BaseException:
        answer = traceback.format_exc()
    print("EXAMPLE-DONE " + json.dumps(answer), flush=True)
"""


def _python_example(runner: subprocess.Popen, lines: queue.Queue, where: str, code: str, timeout: float = 600):
    """Run one Python example in ``runner`` (a fresh namespace of one interpreter the test started; ``lines``: its
    output, line by line); fail with its traceback and output."""
    runner.stdin.write(json.dumps({"where": where, "code": code}) + "\n")
    runner.stdin.flush()
    deadline, said = time.monotonic() + timeout, []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"{where} (python) ran past {timeout} s:\n{''.join(said)[-2000:]}")
        assert line, f"{where} (python): the interpreter died\n{''.join(said)[-2000:]}"
        if line.startswith("EXAMPLE-DONE "):
            answer = json.loads(line.removeprefix("EXAMPLE-DONE "))
            assert answer == "ok", f"{where} (python) failed:\n{''.join(said)[-2000:]}\n{answer[-3000:]}"
            return
        said.append(line)


@pytest.mark.slow
def test_every_marked_example_runs(tmp_path):
    """The README's, then each page's marked examples, one after another in one scratch folder: shell examples in
    bash, Python examples as scripts in one interpreter started for them (each in a fresh namespace, in order)."""
    found = examples()
    assert len(found) >= 5 and {lang for _, lang, _ in found} == {"bash", "python"}
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    tnews_folder(tmp_path / "data" / "tnews")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    runner = subprocess.Popen([sys.executable, "-c", PYTHON_RUNNER], cwd=tmp_path, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = queue.Queue()  # its output, read by a thread (a timeout on a blocking read needs one)
    threading.Thread(target=lambda: [lines.put(line) for line in iter(runner.stdout.readline, "")] + [lines.put("")],
                     daemon=True).start()
    try:
        for where, lang, code in found:
            if lang == "python":
                _python_example(runner, lines, where, code)
                continue
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, capture_output=True,
                                  text=True, env=env, timeout=600)
            assert proc.returncode == 0, f"{where} ({lang}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    finally:
        runner.stdin.close()
        runner.wait(timeout=60)
    print(f"{len(found)} marked examples ran")


def run_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments after ``peftbench run``) of every ``peftbench run`` line in a bash block of a page, marked
    or not (continuation lines joined, comments dropped)."""
    found = []
    for page in PAGES:
        for line, info, code in fenced_blocks(page.read_text(encoding="utf-8")):
            if info.split()[:1] != ["bash"]:
                continue
            for command in code.replace("\\\n", " ").splitlines():
                words = shlex.split(command, comments=True)
                at = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["peftbench", "run"]), None)
                if at is not None and words[at + 2:at + 3] != ["--help"]:  # also `accelerate launch -m peftbench run`
                    found.append((f"{page.relative_to(ROOT)}:{line}", words[at + 2:]))
    return found


def test_every_run_command_in_the_docs_is_a_valid_config():
    """Each ``peftbench run`` a page shows, marked to run or not (hub backbones, CLUE files, a GPU), resolves to a
    config: its recipe, keys, values and their combination are accepted (nothing is trained)."""
    commands = run_commands()
    assert len(commands) >= 10
    for where, args in commands:
        recipe, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
        try:
            config.load(ROOT / recipe if recipe else None, overrides)
        except Exception as exc:  # noqa: BLE001  (which command failed, and why)
            pytest.fail(f"{where}: peftbench run {' '.join(args)}: {exc}")
    print(f"{len(commands)} run commands resolved")


def test_marked_examples_are_found_in_nested_fences_only_at_the_top():
    text = "````markdown\n```bash example\nnot run\n```\n````\n\n```python example\nx = 1\n```\n"
    assert [(info, code) for _, info, code in fenced_blocks(text)] == [("markdown", "```bash example\nnot run\n```"),
                                                                       ("python example", "x = 1")]


def _all_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


def test_every_test_a_page_names_exists():
    text = _all_text()
    defined = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        defined[path.name] = set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    every = set().union(*defined.values())
    named = re.findall(r"(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?", text)
    bare = [name for line in text.splitlines() if re.search(r"test_\w+\.py", line)  # listed after a file
            for name in re.findall(r"`(test_\w+)`", line)]
    assert len(named) >= 10 and bare
    for file, name in named:
        assert file in defined, f"a page names tests/{file}, which does not exist"
        assert not name or name in defined[file], f"a page names tests/{file}::{name}, which does not exist"
    for name in bare:
        assert name in every, f"a page names test {name}, which does not exist"
    print(f"{len(named) + len(bare)} test references checked")


SECTIONS = ("task", "model", "method", "train", "corpus", "mask")
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "safetensors", "onnx", "csv", "txt", "py", "md", "bin", "pt", "png"}
KEY = re.compile(r"(?<![\w.])((?:" + "|".join(SECTIONS) + r")\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(?![\w*(])")


def _keys(cls, prefix: str = "") -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        out.add(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            out |= _keys(hint, f"{prefix}{f.name}.")
    return out


def known_keys() -> set[str]:
    keys = {k for k in _keys(config.RunConfig) if "." in k} | {f"pretrain.{k}" for k in _keys(PretrainConfig)}
    keys |= {k.removeprefix("pretrain.") for k in keys if k.startswith("pretrain.")}
    keys |= {f"method.{k}" for name in method_names() for k in _keys(get_method(name).Config)}
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # method.options: a PEFT tuner's config keys

    keys |= {f"method.options.{f.name}" for c in PEFT_TYPE_TO_CONFIG_MAPPING.values() for f in dataclasses.fields(c)}
    return keys


def test_every_config_key_a_page_names_exists():
    keys, text = known_keys(), _all_text()
    spans = re.findall(r"`([^`\n]+)`", text) + [code for page in PAGES
                                                for _, _, code in fenced_blocks(page.read_text(encoding="utf-8"))]
    named = {key for span in spans for key in KEY.findall(span) if key.rsplit(".", 1)[1] not in FILE_SUFFIXES}
    assert len(named) >= 40
    unknown = sorted(named - keys)
    assert not unknown, f"pages name config keys that do not exist: {unknown}"
    print(f"{len(named)} config keys checked")


def test_the_records_page_names_every_later_key():
    """docs/records.md's ``run_id`` row lists ``config.LATER_KEYS`` (a key by name, or a family as ``prefix*``
    within a section): a key added later and not listed there fails here."""
    row = next(line for line in (ROOT / "docs" / "records.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `run_id` |"))
    spans = re.findall(r"`([^`\n]+)`", row)
    families = [span[:-1] for span in spans if span.endswith("*") and "." in span[:-1].rstrip(".")]
    missing = [key for key in config.LATER_KEYS if key not in spans and not key.startswith(tuple(families))]
    assert not missing, f"docs/records.md does not name these later keys: {missing}"


@pytest.mark.parametrize("key, ok", [("train.lr", True), ("method.r", True), ("corpus.files", True),
                                     ("method.options.n_frequency", True), ("train.lrr", False),
                                     ("method.rank", False), ("method.options.n_freq", False)])
def test_the_key_check_can_fail(key, ok):
    assert (key in known_keys()) is ok
