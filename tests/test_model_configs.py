"""configs/model/*.yaml compose, through model/_base (mqa_lm/config_store.py), to every MQAConfig
field: the dataclass defaults, vocab_size null, then what each file sets."""

from __future__ import annotations

from dataclasses import fields

import pytest
from helpers import CONFIGS, compose_cfg
from omegaconf import OmegaConf

from mqa_lm import MQAConfig

MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def composed_model(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_cfg(overrides).model, resolve=True)


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_to_every_field(name):
    model = composed_model([f"model={name}"])
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
    own.pop("defaults")
    assert list(model) == [f.name for f in fields(MQAConfig)]
    for f in fields(MQAConfig):
        if f.name in own:
            assert model[f.name] == own[f.name]
        elif f.name == "vocab_size":
            assert model[f.name] is None  # taken from the tokenizer
        else:
            assert model[f.name] == f.default, f.name
    for key in own:
        assert own[key] != {f.name: f.default for f in fields(MQAConfig)}[key], (
            f"{name}.yaml repeats the default of {key}"
        )
    config = MQAConfig.from_dict({**model, "vocab_size": 100})
    assert config.attn_impl == "auto" and config.loss_impl == "torch"


def test_the_recipes_still_compose_to_the_values_they_trained_with():
    # What each file said before it was reduced to its differences from MQAConfig.
    want = {
        "tiny": dict(max_seq_len=256, n_layers=4, d_model=128, heads=4),
        "gpt2_small": dict(max_seq_len=1024, n_layers=12, d_model=768, heads=12),
        "gpt2_medium": dict(max_seq_len=1024, n_layers=24, d_model=1024, heads=16),
        "mqa_1b": dict(max_seq_len=2048, n_layers=24, d_model=2048, heads=16),
    }
    assert sorted(want) == MODELS
    for name, values in want.items():
        model = composed_model([f"model={name}"])
        assert {k: model[k] for k in values} == values
        assert (model["kv_heads"], model["pos_emb"], model["norm_type"], model["mlp_type"]) == (
            1,
            "learned",
            "low_precision_layernorm",
            "gelu",
        )
        assert (model["bias"], model["tie_embeddings"], model["init_std"]) == (True, True, 0.02)


def test_overrides_and_unknown_keys_behave_as_before():
    model = composed_model(["model=tiny", "model.kv_heads=2", "model.loss_impl=chunked"])
    assert (model["kv_heads"], model["loss_impl"], model["heads"]) == (2, "chunked", 4)
    with pytest.raises(Exception, match="n_head"):
        composed_model(["model=tiny", "model.n_head=4"])
