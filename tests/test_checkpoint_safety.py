"""Checkpoints as a hostile user hands them over: damaged weight files, edited label lists and links that leave the
folder are refused by ``predict``, ``serve`` and ``export`` in one line naming the file; a checkpoint's files are
written with one mode."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.records import FILE_MODE

COMMANDS = {
    "predict": lambda ckpt, tmp: ["predict", str(ckpt), "--split", "dev", "--out", str(tmp / "p.jsonl")],
    "export": lambda ckpt, tmp: ["export", str(ckpt), "--out", str(tmp / "exported"), "--format", "onnx"],
    # refused while loading; were it to load, the host would fail to bind instead of serving forever
    "serve": lambda ckpt, tmp: ["serve", f"x={ckpt}", "--host", "256.0.0.1"],
}


@pytest.fixture
def copy_of(trained_variants, tmp_path):
    def make(variant):
        where = tmp_path / variant
        shutil.copytree(trained_variants[variant].record["checkpoint"], where)
        return where
    return make


def refused(argv, capsys, monkeypatch) -> str:
    """The one error line of a command that must be refused."""
    monkeypatch.setenv("PEFTBENCH_TOKEN", "t" * 32)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_meta(ckpt, change):
    meta = json.loads((ckpt / "peftbench.json").read_text(encoding="utf-8"))
    change(meta)
    (ckpt / "peftbench.json").write_text(json.dumps(meta), encoding="utf-8")


def swap_first_two(meta, *keys):
    for key in keys:
        meta[key][0], meta[key][1] = meta[key][1], meta[key][0]


TAMPERED = {  # name -> (variant, tamper(ckpt, tmp), expected text, file named)
    "adapter weights truncated": ("lora", lambda c, t: truncate(c / "adapter_model.safetensors"),
                                  "damaged weight file", "adapter_model.safetensors"),
    "base weights truncated": ("lora", lambda c, t: truncate(c / "base" / "model.safetensors"),
                               "damaged weight file", "base/model.safetensors"),
    "trained tensors truncated": ("prefix", lambda c, t: truncate(c / "trainable.safetensors"),
                                  "damaged weight file", "trainable.safetensors"),
    "label count edited": ("lora", lambda c, t: edit_meta(c, lambda m: m["labels"].pop()),
                           "field 'labels'", "peftbench.json"),
    "labels and names swapped": ("adapter", lambda c, t: edit_meta(c, lambda m: swap_first_two(
        m, "labels", "label_names", "model_labels")), "the label list was edited", "peftbench.json"),
    "whole model's labels swapped": ("full", lambda c, t: swap_config_labels(c), "field 'id2label'", "config.json"),
    "meta not JSON": ("lora", lambda c, t: (c / "peftbench.json").write_text("{oops", encoding="utf-8"),
                      "not valid JSON", "peftbench.json:1"),
    "weight header not an object": ("lora", lambda c, t: (c / "adapter_model.safetensors").write_bytes(
        (6).to_bytes(8, "little") + b"[1, 2]"), "damaged weight file (unreadable header)", "adapter_model.safetensors"),
    "base folder links outside": ("lora", lambda c, t: link(c / "base", shutil.move(c / "base", t / "base-elsewhere")),
                                  "outside the checkpoint", "base"),
    "tokenizer links outside": ("lora", lambda c, t: link(c / "tokenizer.json", "/etc/passwd"),
                                "outside the checkpoint", "tokenizer.json"),
    "weights link outside": ("lora", lambda c, t: link(c / "adapter_model.safetensors", moved_out(c, t)),
                             "outside the checkpoint", "adapter_model.safetensors"),
}


def swap_config_labels(ckpt):
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    labels = config["id2label"]
    labels["0"], labels["1"] = labels["1"], labels["0"]
    config["label2id"] = {v: int(k) for k, v in labels.items()}
    (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")


def moved_out(ckpt, tmp):
    """The checkpoint's own adapter, moved outside it (it would load silently through a link)."""
    outside = tmp / "elsewhere.safetensors"
    shutil.move(ckpt / "adapter_model.safetensors", outside)
    return outside


def link(path, target):
    if path.is_symlink() or path.is_file():
        path.unlink()
    os.symlink(target, path)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_checkpoint_is_refused_in_one_line(case, command, copy_of, tmp_path, capsys, monkeypatch):
    variant, tamper, expected, named = TAMPERED[case]
    ckpt = copy_of(variant)
    tamper(ckpt, tmp_path)
    line = refused(COMMANDS[command](ckpt, tmp_path), capsys, monkeypatch)
    assert expected in line and named in line, line
    assert not (tmp_path / "exported").exists() and not (tmp_path / "p.jsonl").exists()


def test_a_link_inside_the_checkpoint_is_allowed(copy_of, tmp_path, capsys):
    ckpt = copy_of("lora")
    (ckpt / "tokenizer.json").rename(ckpt / "tokenizer.real.json")
    os.symlink("tokenizer.real.json", ckpt / "tokenizer.json")
    assert main(COMMANDS["predict"](ckpt, tmp_path)) == 0, capsys.readouterr().err


@pytest.mark.parametrize("variant", ["lora", "full", "prefix"])
def test_checkpoint_files_share_one_mode(trained_variants, variant):
    ckpt = trained_variants[variant].record["checkpoint"]
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in Path(ckpt).rglob("*") if p.is_file()}
    assert set(modes.values()) == {FILE_MODE}, modes
