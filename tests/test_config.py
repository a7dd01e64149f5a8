import re

import pytest

from peftbench import config
from peftbench.errors import PeftbenchError


def test_defaults_then_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {name: tnews, max_length: 64}\nmethod: {name: lora, r: 4}\ntrain: {lr: 5e-4, epochs: 2}\n")
    cfg = config.load(recipe, ["train.epochs=5", "method.r=16", "train.mixed_precision=bf16"])
    assert cfg.task.name == "tnews" and cfg.task.max_length == 64
    assert cfg.train.lr == pytest.approx(5e-4) and isinstance(cfg.train.lr, float)  # YAML reads 5e-4 as a string
    assert cfg.train.epochs == 5 and cfg.method.r == 16 and cfg.method.alpha == 16
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.train.batch_size == config.TrainConfig().batch_size  # untouched default


def test_required_keys_exist():
    cfg = config.load(None, [])
    for key in ("task.name", "task.data_dir", "model.name_or_path", "method.name", "train.epochs", "train.max_steps",
                "train.batch_size", "train.lr", "train.seed", "train.mixed_precision", "output_dir"):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # raises AttributeError if missing


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train.epochs=three"], "config key 'train.epochs' must be int"),
    (["train.epochs=2.5"], "config key 'train.epochs' must be int"),
    (["train.group_by_length=3"], "config key 'train.group_by_length' must be bool"),
    (["method.r=4", "method.name=full"], "unknown config key 'method.r'"),
    (["method.name=nope"], "unknown method 'nope'"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["train=3"], "config key 'train' must be a mapping"),
    (["task.labels=[a,b]"], "applies only to task.name=custom"),
    (["train.lr"], "not of the form key=value"),
    (["method.name=adapter", "method.variant=lisa"],
     "config key 'method.variant' must be one of houlsby, pfeiffer, ffn"),
    (["method.name=adalora", "method.target_r=20"], "config key 'method.target_r' (20) must be <= method.init_r"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(PeftbenchError, match=re.escape(message)):
        config.load(None, override)


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: [unclosed\n")
    with pytest.raises(PeftbenchError, match=r"bad\.yaml:\d+: invalid YAML"):
        config.load(bad)
    with pytest.raises(PeftbenchError, match="recipe file not found"):
        config.load(tmp_path / "missing.yaml")


def test_a_bad_value_in_a_recipe_names_the_file_and_its_line(tmp_path):
    """A key the recipe file sets is named with the file and the key's line; one an override sets, without."""
    path = tmp_path / "r.yaml"
    path.write_text("task:\n  name: synthetic\ntrain:\n  epochs: 2\n  lr: abc\n")
    with pytest.raises(PeftbenchError, match=f"^{re.escape(str(path))}:5: config key 'train.lr' must be float"):
        config.load(path)
    with pytest.raises(PeftbenchError, match="^config key 'train.lr' must be float .* got 'xyz'"):
        config.load(path, ["train.lr=xyz"])
    path.write_text("task: {name: synthetic}\ntrain:\n  seedz: 1\n")
    with pytest.raises(PeftbenchError, match=f"^{re.escape(str(path))}:3: unknown config key 'train.seedz'"):
        config.load(path)
    path.write_text("method:\n  name: lora\n  target_modules: &x [query, *x]\n")  # an alias of itself
    with pytest.raises(PeftbenchError, match=f"^{re.escape(str(path))}:3: config key 'method.target_modules'"):
        config.load(path)
    path.write_text("model:\n  quantization: 8bit\nmethod:\n  name: full\n")
    with pytest.raises(PeftbenchError, match=f"^{re.escape(str(path))}:4: config keys 'method.name=full' and"):
        config.load(path)


def test_run_id_is_stable_and_ignores_output_dir():
    a = config.load(None, ["method.name=lora", "output_dir=/a"])
    b = config.load(None, ["output_dir=/b", "method.name=lora"])
    c = config.load(None, ["method.name=lora", "train.seed=1"])
    assert a.run_id == b.run_id != c.run_id
    assert config.resolve(a.to_dict()).to_dict() == a.to_dict()  # a saved config resolves to itself


def test_every_shipped_recipe_resolves():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
    recipes = [r for r in recipes if not {"accelerate", "sweeps", "pretrain"} & set(r.parts)]
    assert len(recipes) >= 22
    tasks = set()
    for path in recipes:
        cfg = config.load(path)
        tasks.add((cfg.task.name, cfg.method.name))
    for task in ("tnews", "iflytek", "afqmc", "ocnli", "cmnli", "csl", "cluewsc2020", "eprstmt", "bustm", "csldcp",
                 "cluener"):
        assert {(task, "full"), (task, "lora")} <= tasks


def test_pretrain_recipes_resolve():
    from pathlib import Path

    from peftbench.pretrain import load_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes" / "pretrain").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(str(path), [])
        assert cfg.corpus.files and all(Path(f).name in ("unlabeled.json", "train_few_all.json")
                                        for f in cfg.corpus.files)  # never a dev or test file


def test_keys_added_later_leave_earlier_run_ids_alone():
    """Sweeps resume by run id: a key added with a default must not change the ids of records written before it."""
    import json
    from pathlib import Path

    # the configs and run ids of five records written before the model's quantization key existed
    records = json.loads((Path(__file__).parent / "data" / "records_before_quantization.json").read_text("utf-8"))
    assert len(records) == 5 and all("quantization" not in r["config"]["model"] for r in records)
    assert all(config.resolve(r["config"]).run_id == r["run_id"] for r in records)
    base = config.load(None, [])
    assert config.load(None, ["model.quantization=8bit", "method.name=lora"]).run_id != base.run_id


def test_later_keys_at_any_depth_count_only_away_from_their_default():
    """A key (or a section) added after records were written leaves their run ids alone while it holds its
    default, however deep it sits."""
    defaults = {"train": {"lr": 1e-3, "distill": {"teacher": None, "temperature": 2.0}}, "method": {"name": "lora"}}
    later = ("train.distill.teacher", "train.distill.temperature", "method.init")
    body = {"train": {"lr": 1e-3, "distill": {"teacher": None, "temperature": 2.0}}, "method": {"name": "lora"}}
    config.drop_defaults(body, defaults, later)
    assert body == {"train": {"lr": 1e-3}, "method": {"name": "lora"}}  # as a record written before the section
    body = {"train": {"lr": 1e-3, "distill": {"teacher": "ckpt", "temperature": 2.0}}, "method": {"name": "lora"}}
    config.drop_defaults(body, defaults, later)
    assert body == {"train": {"lr": 1e-3, "distill": {"teacher": "ckpt"}}, "method": {"name": "lora"}}


def test_one_tracker_name_is_a_list_of_one():
    assert config.load(None, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert config.load(None, ["method.name=lora", "method.target_modules=query"]).method.target_modules == ["query"]
    with pytest.raises(PeftbenchError, match="config key 'train.report_to' must be a list of"):
        config.load(None, ["train.report_to=nosuch"])


def test_an_unset_learning_rate_is_the_methods_and_a_set_one_keeps_its_run_id():
    lora = config.load(None, ["method.name=lora"])
    assert lora.train.lr == 5e-4
    assert lora.run_id == config.load(None, ["method.name=lora", "train.lr=5e-4"]).run_id  # the same run
    full = config.load(None, ["method.name=full"])  # 2e-5 was every method's rate before: full keeps its id
    assert full.train.lr == 2e-5 and full.run_id == config.load(None, ["method.name=full", "train.lr=2e-5"]).run_id
