"""The config tree's errors: each bad key, type, value, file or override raises ConfigError naming
it and what is accepted; hypothesis feeds random and mutated dicts, overrides and YAML files,
which either load or raise ConfigError, never another exception."""

from __future__ import annotations

import dataclasses
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtune.train.config import Config, ConfigError, describe, from_dict, load_config

PROPS = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
SECTIONS = [f.name for f in dataclasses.fields(Config)]
KEYS = [row[0] for row in describe()]  # every dotted leaf key

BAD_DICTS = [
    ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?); accepted: model, finetune, data"),
    ({"train": {"max_step": 5}}, "unknown key 'train.max_step' (did you mean 'max_steps'?); accepted: output_dir"),
    ({"train": {"batch_size": "eight"}}, "train.batch_size: 'eight' is not valid; expected int"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size: 2.5 is not valid; expected int"),
    ({"train": {"progress": "yes"}}, "train.progress: 'yes' is not valid; expected bool"),
    ({"optimizer": {"name": "sgd"}}, "optimizer.name: 'sgd' is not valid; expected 'adamw' | 'balanced_adamw'"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr: 'fast' is not valid; expected float"),
    ({"finetune": {"lora_targets": 5}}, "finetune.lora_targets: 5 is not valid; expected list of str"),
    ({"finetune": {"lora_targets": ["q_proj", {"x": 1}]}}, "finetune.lora_targets[1]: {'x': 1} is not valid; expected str"),
    ({"data": {"valid_file": []}}, "data.valid_file: [] is not valid; expected a file or a non-empty list of files"),
    ({"data": {"valid_file": {"a": 1}}}, "data.valid_file: {'a': 1} is not valid; expected str or list of str or null"),
    ({"train": 5}, "train: expected a mapping of keys, got 5"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: 0.0 is not valid; expected a number > 0"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: [0.9] is not valid; expected two numbers in [0, 1)"),
    ({"data": {"valid_ratio": 1.5}}, "data.valid_ratio: 1.5 is not valid; expected 0 <= x < 1"),
    ({"train": {"device": "gpu"}}, "train.device: 'gpu' is not valid; expected auto, cpu, cuda or cuda:N"),
    ({"method": {"penalty": "coupled"}}, "method.direction_weight: 0 with method.penalty='coupled' does nothing"),
    ({"method": {"penalty": "decoupled", "direction_weight": 1.0}}, "it needs optimizer.name: balanced_adamw"),
    # issue 13: values that passed here and failed later, after --overwrite had cleared the old run
    ({"train": {"save_every": 3, "eval_every": 2}}, "train.save_every: 3 is not a multiple of train.eval_every=2"),
    ({"train": {"num_workers": -1}}, "train.num_workers: -1 is not valid; expected an integer >= 0"),
    ({"optimizer": {"lr": "inf"}}, "optimizer.lr: inf is not valid; expected a finite number"),
    ({"optimizer": {"betas": [0.9, "nan"]}}, "optimizer.betas[1]: nan is not valid; expected a finite number"),
    ({"train": {"target_loss": "-inf"}}, "train.target_loss: -inf is not valid; expected a finite number"),
    ({"train": {"seed": -1}}, "train.seed: -1 is not valid; expected an integer in [0, 2**32)"),
    ({"data": {"seed": 2**32}}, "data.seed: 4294967296 is not valid; expected an integer in [0, 2**32)"),
    ({"optimizer": {"eps": 0}}, "optimizer.eps: 0.0 is not valid; expected a number > 0"),
]


@pytest.mark.parametrize("data, message", BAD_DICTS, ids=[m.split(":")[0][:40] for _, m in BAD_DICTS])
def test_bad_dicts_name_the_key_and_what_is_accepted(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data, "run.yaml")
    assert str(e.value).startswith("run.yaml: ") and message in str(e.value)


def test_defaults_and_yaml_scalars_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("optimizer:\n  lr: 1e-4   # YAML reads this as a string\ntrain:\n  report_to: [none]\n")
    cfg = load_config(path, ["finetune.lora_targets=q_proj,v_proj", "train.target_loss=null"])
    assert cfg.optimizer.lr == 1e-4 and cfg.finetune.lora_targets == ["q_proj", "v_proj"]
    assert cfg.train.target_loss is None and cfg.train.report_to == ["none"]


def write(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_FILES = [
    ("missing", None, "config file not found"),
    ("yaml syntax", "train:\n  seed: [1, 2\n", "is not valid YAML"),
    ("tab indent", "train:\n\tseed: 1\n", "line 2 is not valid YAML"),
    ("not utf-8", b"train:\n  output_dir: caf\xe9\n", "not UTF-8 text (byte 24)"),
    ("top-level list", "- train\n- data\n", "the top level must be a mapping of sections (model, finetune"),
    ("top-level scalar", "42\n", "the top level must be a mapping"),
    ("unknown key", "train:\n  sed: 1\n", "unknown key 'train.sed' (did you mean 'seed'?)"),
]


@pytest.mark.parametrize("what, content, message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_files_name_the_file(tmp_path, what, content, message):
    path = tmp_path / "absent.yaml" if content is None else write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


BAD_OVERRIDES = [
    (["optimizer.lr"], "override 'optimizer.lr' is not of the form key=value (e.g. optimizer.lr=1e-4)"),
    (["train=5"], "train: expected a mapping of keys, got 5"),
    (["train.seed=1", "train.seed.x=2"], "override 'train.seed.x=2': 'seed' is not a section"),
    (["train.max_steps=many"], "train.max_steps: 'many' is not valid; expected int"),
    (["optimizer.lrr=1e-3"], "unknown key 'optimizer.lrr' (did you mean 'lr'?)"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_overrides_name_the_override(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert message in str(e.value)


# YAML builds dates (and tagged ints/floats) from some scalars and raises ValueError when they
# are impossible; config.py catches only yaml.YAMLError there. Fixed in config.py, not here.
YAML_VALUE_ERRORS = ["2020-13-45", "2021-02-30 10:00:00", "!!int x", "!!float y", "0x_"]


@pytest.mark.parametrize("value", YAML_VALUE_ERRORS)
def test_impossible_yaml_scalars_are_config_errors(tmp_path, value):
    try:
        load_config(None, [f"train.output_dir={value}"])
    except ConfigError:
        pass
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, f"train:\n  output_dir: {value}\n"))


# ---------------------------------------------------------------- properties

def loads_or_config_error(fn, *args):
    """Call fn; a ConfigError is an answer, any other exception fails the test (propagates)."""
    try:
        cfg = fn(*args)
    except ConfigError as e:
        assert str(e), "a ConfigError must say something"
        return None
    assert isinstance(cfg, Config)
    return cfg


scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["auto", "lora", "full", "cpu", "q_proj", "1e-4", "none"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
field_names = st.sampled_from(sorted({k.split(".")[1] for k in KEYS})) | st.text(max_size=8)
sections = st.dictionaries(field_names, values, max_size=5) | values
config_dicts = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=6), sections, max_size=4)


@PROPS
@given(config_dicts)
def test_random_dicts_load_or_raise_config_error(data):
    loads_or_config_error(from_dict, data, "random.yaml")


@PROPS
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_mutated_defaults_load_or_raise_config_error(edits):
    data = Config().to_dict()
    for key, value in edits:
        section, leaf = key.split(".")
        data[section][leaf] = value
    cfg = loads_or_config_error(from_dict, data, "mutated.yaml")
    if cfg is not None:  # what loads is what was written, after coercion
        assert set(cfg.to_dict()) == set(SECTIONS)


override_text = st.text(alphabet=string.printable, max_size=12)
override_values = override_text | st.sampled_from(["null", "true", "[q_proj, v_proj]", "{a: 1}", "1e-4", ".nan",
                                                    "-.inf", "''", "[", "- x", "&a b", "*a", "!!str 5", "~"])


@PROPS
@given(st.lists(st.tuples(st.sampled_from(KEYS) | override_text, override_values).map("=".join)
                | override_text, max_size=4))
def test_random_overrides_load_or_raise_config_error(overrides):
    loads_or_config_error(load_config, None, overrides)


yaml_lines = st.lists(st.sampled_from(["train:", "  seed: 1", "optimizer:", "  lr: 1e-4", "data: {max_length: 8}",
                                       "  - a", "model: [", "]", "key: value", "\t", "---", "...", "# c", ": x"])
                      | st.text(max_size=20), max_size=8).map("\n".join)


@PROPS
@given(yaml_lines | st.binary(max_size=60).map(lambda b: b.decode("latin-1")), st.booleans())
def test_random_yaml_files_load_or_raise_config_error(text, as_bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_bytes(text.encode("latin-1", "replace") if as_bytes else text.encode("utf-8", "surrogatepass"))
        loads_or_config_error(load_config, path)


CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_the_method_ones_turn_it_on(path):
    cfg = load_config(path, [])
    if cfg.method.penalty != "none":  # an example of the method uses both of its parts
        assert cfg.optimizer.name == "balanced_adamw" and cfg.method.direction_weight > 0


def test_test_ratio_and_test_file_together_are_refused():
    with pytest.raises(ConfigError, match="data.test_ratio: 0.1 holds out a test split of train_file, but "
                                          "data.test_file is set too; use one of them"):
        load_config(None, ["data.train_file=a.json", "data.test_file=b.json", "data.test_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"data.test_ratio: 1.0 is not valid; expected 0 <= x < 1"):
        load_config(None, ["data.train_file=a.json", "data.test_ratio=1.0"])


def test_a_schedule_with_nothing_to_schedule_is_refused():
    with pytest.raises(ConfigError, match="method.schedule: 'decay' schedules the method's strengths, but there are none"):
        load_config(None, ["data.train_file=a.json", "method.schedule=decay"])
    cfg = load_config(None, ["data.train_file=a.json", "method.schedule=warmup", "optimizer.name=balanced_adamw"])
    assert cfg.method.schedule == "warmup"


def test_save_every_off_the_evaluations_is_fine_without_validation_data():
    cfg = from_dict({"data": {"valid_ratio": 0}, "train": {"save_every": 3, "eval_every": 2}})
    assert cfg.train.save_every == 3


@pytest.mark.parametrize("overrides, blamed", [
    (["train.batch_size=eight"], "command line: train.batch_size: 'eight' is not valid"),
    (["train.max_step=3"], "command line: unknown key 'train.max_step'"),
    (["method.penalty=coupled"], "command line: method.direction_weight: 0 with method.penalty='coupled'"),
    (["train.seed=3"], "{file}: train.max_steps: -5 is not valid"),  # the file's own mistake
])
def test_a_bad_value_is_blamed_on_where_it_was_given(tmp_path, overrides, blamed):
    path = tmp_path / "run.yaml"
    path.write_text("train: {batch_size: 2, max_steps: 5}\n" if "-5" not in blamed else "train: {max_steps: -5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert str(e.value).startswith(blamed.replace("{file}", str(path)))


def test_device_cuda_without_a_gpu_is_refused(monkeypatch):
    import torch

    from dirtune.train.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"train.device: '{device}', but this process sees no CUDA GPU"):
            check_device(device)
    check_device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device("cuda")


def test_a_string_stays_a_string_whatever_order_the_union_was_spelled_in():
    # typing caches Union[list[str], str] and Union[str, list[str]] as one object: a file name
    # must not turn into a list of its comma-separated parts because of another module's spelling
    from typing import Union

    from dirtune.train.config import _coerce

    for tp in (Union[list[str], str], Union[str, list[str]]):
        assert _coerce("valid.jsonl", tp, "data.valid_file") == "valid.jsonl"
        assert _coerce(["a.jsonl", "b.jsonl"], tp, "data.valid_file") == ["a.jsonl", "b.jsonl"]
        with pytest.raises(ConfigError, match=r"expected str or list of str$"):
            _coerce({"a": 1}, tp, "data.valid_file")
