"""Config loading, overrides and validation fail fast with the key named (tagi_jax/config.py)."""
import textwrap

import pytest
from tagi_jax.trainer import config as trainer_config
from tagi_jax import config as cfg_lib
from tagi_jax.config import ConfigError

CONFIG_FILE = textwrap.dedent(
    """
    from ml_collections import config_dict
    from tagi_jax.trainer import config as trainer_config

    def get_config(arg=None):
        config = trainer_config.default_config()
        config.model = config_dict.ConfigDict({"checkpoint": config_dict.placeholder(str), "size": arg or "tiny"})
        config.optimizer.frozen = ("^t5/",)
        config.optimizer.groups = {"hypernet": {"pattern": "^hypernet/", "lr_scale": 10.0}}
        return config
    """
)


@pytest.fixture()
def config_path(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(CONFIG_FILE)
    return str(path)


def test_load_config_applies_typed_overrides(config_path):
    config = cfg_lib.load_config(
        config_path,
        [
            "train.steps=7",
            "--config.optimizer.learning_rate=3e-4",
            "config.train.progress_bar=false",
            "optimizer.frozen=('^a/', '^b/')",
            "optimizer.weight_decay_exclude=norm,bias$",
            "optimizer.groups.hypernet.lr_scale=5",
            "model.checkpoint=/tmp/x",
            "optimizer.name=adafactor",
        ],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optimizer.learning_rate == 3e-4
    assert config.train.progress_bar is False
    assert config.optimizer.frozen == ("^a/", "^b/")
    assert config.optimizer.weight_decay_exclude == ("norm", "bias$")
    assert config.optimizer.groups.hypernet.lr_scale == 5.0
    assert config.model.checkpoint == "/tmp/x"
    assert config.optimizer.name == "adafactor"


def test_load_config_passes_the_argument(config_path):
    assert cfg_lib.load_config(config_path + ":xl").model.size == "xl"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=3", r"unknown config key 'train.stpes' \(known there: .*steps"),
        ("trian.steps=3", r"unknown config key 'trian.steps' \('trian' does not exist"),
        ("train.steps=three", r"config key 'train.steps' expects an int, got 'three'"),
        ("train.progress_bar=maybe", r"config key 'train.progress_bar' expects a bool"),
        ("train=3", r"config key 'train' is a section"),
        ("train.steps", r"not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(config_path, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg_lib.load_config(config_path, [override])


def test_missing_config_file_and_get_config(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        cfg_lib.load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        cfg_lib.load_config(str(bad))


def test_require_path(config_path, tmp_path):
    config = cfg_lib.load_config(config_path)
    with pytest.raises(ConfigError, match="config key 'model.checkpoint' is required"):
        cfg_lib.require_path(config, "model.checkpoint")
    config.model.checkpoint = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="config key 'model.checkpoint': path does not exist"):
        cfg_lib.require_path(config, "model.checkpoint")
    with pytest.raises(ConfigError, match="config key 'model.vocabulary' is missing"):
        cfg_lib.require_path(config, "model.vocabulary")
    config.model.checkpoint = str(tmp_path)
    assert cfg_lib.require_path(config, "model.checkpoint", kind="dir") == str(tmp_path)
    with pytest.raises(ConfigError, match="expected a file"):
        cfg_lib.require_path(config, "model.checkpoint", kind="file")


def _valid():
    config = trainer_config.default_config()
    config.train.batch_size = 16
    config.train.num_microbatches = 2
    config.train.steps = 100
    return config


@pytest.mark.parametrize(
    "key, value, data, message",
    [
        ("optimizer.schedule", "cosine_restarts", None, r"config key 'optimizer.schedule' is 'cosine_restarts'"),
        ("optimizer.name", "sgd", None, r"config key 'optimizer.name' is 'sgd'"),
        ("train.num_microbatches", 3, None, r"'train.num_microbatches'=3 does not divide 'train.batch_size'=16"),
        ("train.num_microbatches", 4, 8, r"'train.batch_size'=16.*not divisible by the mesh's data axis"),
        ("mesh.data", 3, None, r"'train.batch_size'=16.*\(mesh.data=3\)"),
        ("train.steps", 0, None, r"config key 'train.steps' must be >= 1"),
        ("mesh.model", 0, None, r"config key 'mesh.model'"),
        ("optimizer.warmup_steps", 200, None, r"config key 'optimizer.warmup_steps'=200"),
    ],
)
def test_incompatible_trainer_settings_are_named(key, value, data, message):
    config = _valid()
    if key == "optimizer.warmup_steps":
        config.optimizer.schedule = "linear"
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        trainer_config.validate_trainer_config(config, data_parallel_size=data)


def test_valid_trainer_config_passes():
    trainer_config.validate_trainer_config(_valid(), data_parallel_size=8)


def test_section_names_rename_keys_in_messages():
    config = _valid()
    config.train.num_microbatches = 4
    names = {"train": "stages.finetune.train", "optimizer": "stages.finetune.optimizer"}
    with pytest.raises(ConfigError) as e:
        trainer_config.validate_trainer_config(config, data_parallel_size=8, section_names=names)
    message = str(e.value)
    assert "'stages.finetune.train.batch_size'=16" in message
    assert "stages.finetune.train.num_microbatches=4" in message and "(mesh.data=8)" in message
    assert cfg_lib.rename_sections("config key 'optimizer.frozen[0]'", names) == \
        "config key 'stages.finetune.optimizer.frozen[0]'"
