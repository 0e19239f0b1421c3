"""Each default is stated once: configs/optim and configs/data compose to their dataclasses' defaults
except what a file sets (and a file sets only what differs), experiments set only what differs from
the groups they pick, and the Python API and train.py start from the same optimizer settings."""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING, fields
from typing import Any

import pytest
from helpers import CONFIGS, compose_cfg
from omegaconf import OmegaConf

from mqa_lm.data import DataConfig
from mqa_lm.inference import GenerationConfig
from mqa_lm.model import MQAConfig
from mqa_lm.optim import OPTIMIZERS, MuonConfig, OptimConfig

OPTIM_FILES = sorted(p.stem for p in (CONFIGS / "optim").glob("*.yaml"))
DATA_FILES = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def own_settings(group: str, name: str) -> dict[str, Any]:
    """What configs/<group>/<name>.yaml itself sets (its defaults list left out)."""
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))
    assert isinstance(own, dict)
    own.pop("defaults", None)
    return own


def field_defaults(config_cls: type) -> dict[str, Any]:
    return {
        f.name: f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        for f in fields(config_cls)
    }


def test_every_optimizer_has_its_option():
    assert OPTIM_FILES == sorted(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIM_FILES)
def test_optim_option_composes_to_its_dataclass_defaults_except_what_it_sets(name, tmp_path):
    composed = OmegaConf.to_container(compose_cfg([f"optim={name}", f"paths.output_dir={tmp_path}"]).optim)
    own = own_settings("optim", name)
    # The validated object's values (after __post_init__), not the field declarations.
    defaults = OPTIMIZERS[name]().to_dict()
    assert list(composed) == list(defaults)
    for key, value in composed.items():
        assert value == (own[key] if key in own else defaults[key]), key
    for key in own:
        assert own[key] != defaults[key], f"optim/{name}.yaml repeats the default of {key}"


@pytest.mark.parametrize("name", DATA_FILES)
def test_data_option_composes_to_the_dataclass_defaults_except_what_it_sets(name, tmp_path):
    composed = OmegaConf.to_container(compose_cfg([f"data={name}", f"paths.output_dir={tmp_path}"]).data)
    own = own_settings("data", name)
    defaults = field_defaults(DataConfig)
    assert composed.pop("_target_") == "mqa_lm.training.datamodule.TextDataModule"
    assert list(composed) == list(defaults)
    # The two settings that follow the run rather than a default.
    assert (composed.pop("seed"), composed.pop("cache_dir")) == ("${seed}", "${paths.data_dir}")
    for key, value in composed.items():
        assert value == (own[key] if key in own else defaults[key]), key
    for key in own:
        assert own[key] != defaults[key], f"data/{name}.yaml repeats the default of {key}"


def test_data_interpolations_follow_the_run(tmp_path):
    data = compose_cfg(["seed=7", "paths.data_dir=/somewhere/data", f"paths.output_dir={tmp_path}"]).data
    assert (data.seed, data.cache_dir) == (7, "/somewhere/data")


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def group_choices(defaults: list[Any]) -> list[str]:
    """An experiment's ``override /group: option`` entries as command-line choices."""
    choices = []
    for entry in defaults:
        for key, value in entry.items():
            assert key.startswith("override /"), entry
            option = f"[{','.join(value)}]" if isinstance(value, list) else value
            choices.append(f"{key.removeprefix('override /')}={option}")
    return choices


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sets_only_what_differs_from_the_groups_it_picks(name, tmp_path):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{name}.yaml"))
    assert isinstance(raw, dict)
    picked = group_choices(raw.pop("defaults", []))
    without = OmegaConf.to_container(compose_cfg([*picked, f"paths.output_dir={tmp_path}"]))
    with_it = OmegaConf.to_container(compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}"]))
    base, result = leaves(without), leaves(with_it)
    for key, value in leaves(raw).items():
        assert result[key] == value, key  # the experiment's value is what runs
        if key in base:
            assert base[key] != value, f"experiment/{name}.yaml repeats {key}={value!r} of the groups it picks"


def test_the_python_api_and_train_py_default_to_the_same_optimizer(tmp_path):
    from mqa_lm.training.config import validate_config
    from mqa_lm.training.module import MQALitModule

    cli = validate_config(compose_cfg([f"paths.output_dir={tmp_path}"])).optim
    api = MQALitModule(model={"vocab_size": 50, "n_layers": 1, "d_model": 32, "heads": 4}).optim_config
    assert api == cli and type(api) is type(cli)
    assert isinstance(cli, OptimConfig)


FLOAT_FIELDS = [
    (config_cls, prefix, name)
    for config_cls, prefix in (
        (MQAConfig, "model."),
        (OptimConfig, "optim."),
        (MuonConfig, "optim."),
        (DataConfig, "data."),
        (GenerationConfig, "sample."),
    )
    for name, hint in typing.get_type_hints(config_cls).items()
    if hint in (float, float | None, list[float])
]


@pytest.mark.parametrize("config_cls,prefix,name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, _, n in FLOAT_FIELDS])
def test_a_float_field_given_text_is_an_error_naming_its_key(config_cls, prefix, name):
    """What a command-line typo (``optim.lr=1e-3x``) reaches: one error naming the key, not Python's
    comparison of a str with an int from deep inside the config's checks."""
    kwargs = {"prefix": prefix} if config_cls is GenerationConfig else {}
    bad = ["1e-3x", 0.9] if name == "betas" else "1e-3x"
    with pytest.raises(ValueError, match=rf"^{re.escape(prefix + name)} must be (a number|a list of numbers)"):
        config_cls.from_dict({name: bad}, **kwargs)
    with pytest.raises(ValueError, match=rf"^{re.escape(prefix + name)} must be"):
        config_cls.from_dict({name: True}, **kwargs)  # a bool is no number to a config


def test_the_number_check_takes_integers_and_nulls_where_the_field_does():
    assert OptimConfig.from_dict({"lr": 1, "min_lr": None, "betas": [0, 0.5]}).lr == 1
    assert MQAConfig.from_dict({"vocab_size": 16, "clip_qkv": None, "init_std": 1}).init_std == 1
    with pytest.raises(ValueError, match=r"^optim\.min_lr must be a number or null, got 'x'$"):
        OptimConfig.from_dict({"min_lr": "x"})
