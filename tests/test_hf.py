"""Hugging Face transformers interop: export (python -m mqa_lm.export), import (from_hf), refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.data.tokenizer import train_bpe
from mqa_lm.inference import generate
from mqa_lm.pretrained.directory import from_hf, save_pretrained
from mqa_lm.pretrained.hf import HFExportError, HFImportError, export_hf

transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20
BASE = {"vocab_size": 300, "max_seq_len": 32, "n_layers": 2, "d_model": 32, "heads": 4, "attn_impl": "torch"}
GPT_BIGCODE = {"pos_emb": "learned", "mlp_type": "gelu", "norm_type": "low_precision_layernorm"}
LLAMA = {"pos_emb": "rope", "mlp_type": "swiglu", "norm_type": "rmsnorm", "rope_theta": 500.0}

FAMILIES = {
    "gpt_bigcode_mqa": ({**GPT_BIGCODE, "kv_heads": 1}, "GPTBigCodeForCausalLM"),
    "gpt_bigcode_mha_untied_nobias": (
        {**GPT_BIGCODE, "kv_heads": 4, "bias": False, "tie_embeddings": False, "mlp_hidden": 48},
        "GPTBigCodeForCausalLM",
    ),
    "llama_gqa": ({**LLAMA, "kv_heads": 2, "bias": False}, "LlamaForCausalLM"),
    "llama_mqa_bias_untied": ({**LLAMA, "kv_heads": 1, "bias": True, "tie_embeddings": False}, "LlamaForCausalLM"),
}


def perturbed(**fields) -> MQATransformer:
    """A model whose every weight is off its init (unit norms, zero biases), so a dropped or
    misplaced tensor cannot go unnoticed."""
    torch.manual_seed(0)
    model = MQATransformer(MQAConfig(**{**BASE, **fields})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(tmp_path, tokenizer, name):
    fields, cls = FAMILIES[name]
    model = perturbed(**fields)
    out = export_hf(model, tmp_path / "hf", tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    prompt = idx[:1, :5]
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert hf.config.eos_token_id == eot
    expected = generate(model, prompt, max_new_tokens=12, temperature=0, eos_token_id=eot)
    got = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert got.tolist() == expected.tolist()

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(TEXT[:80], add_special_tokens=False) == tokenizer.encode(TEXT[:80]).ids
    assert hf_tok.decode(tokenizer.encode(TEXT[:80]).ids) == TEXT[:80]

    # ... and back: the imported model computes exactly what the original did.
    from mqa_lm.pretrained.directory import load_pretrained

    back, tok = from_hf(out) if "llama" in name else load_pretrained(out, require_tokenizer=True)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours)
    assert tok.encode(TEXT).ids == tokenizer.encode(TEXT).ids


def test_gpt_bigcode_mqa_round_trip_keeps_the_config(tmp_path):
    model = perturbed(**{**GPT_BIGCODE, "kv_heads": 1, "norm_type": "layernorm"})
    back, tok = from_hf(export_hf(model, tmp_path / "hf"))
    assert tok is None
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "fields,family,named",
    [
        ({"pos_emb": "alibi"}, None, "model.pos_emb='alibi'"),
        ({**GPT_BIGCODE, "qk_ln": True}, None, "model.qk_ln=true"),
        ({**LLAMA, "clip_qkv": 6.0}, None, "model.clip_qkv=6.0"),
        ({**GPT_BIGCODE, "softmax_scale": 0.5}, None, "model.softmax_scale=0.5"),
        ({**GPT_BIGCODE, "kv_heads": 2}, None, "model.kv_heads=2: GPTBigCode has MQA"),
        ({**GPT_BIGCODE, "mlp_type": "swiglu"}, None, "model.mlp_type='swiglu'"),
        ({**GPT_BIGCODE, "norm_type": "rmsnorm"}, None, "model.norm_type='rmsnorm'"),
        ({**LLAMA, "mlp_type": "gelu"}, None, "model.mlp_type='gelu': Llama"),
        ({**LLAMA, "norm_type": "layernorm"}, None, "model.norm_type='layernorm': Llama"),
        ({**GPT_BIGCODE}, "llama", "model.pos_emb='learned': Llama uses RoPE"),
        ({**LLAMA}, "gpt_bigcode", "model.pos_emb='rope': GPTBigCode"),
    ],
)
def test_each_blocking_option_is_named(tmp_path, fields, family, named):
    model = perturbed(**fields)
    with pytest.raises(HFExportError) as err:
        export_hf(model, tmp_path / "hf", family=family)
    assert named in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_one_error_lists_every_blocking_option(tmp_path):
    model = perturbed(
        **{**GPT_BIGCODE, "kv_heads": 2, "qk_ln": True, "clip_qkv": 4.0, "mlp_type": "swiglu", "softmax_scale": 1.0}
    )
    with pytest.raises(HFExportError) as err:
        export_hf(model, tmp_path / "hf")
    message = str(err.value)
    for named in (
        "model.kv_heads=2",
        "model.qk_ln=true",
        "model.clip_qkv=4.0",
        "model.mlp_type='swiglu'",
        "model.softmax_scale=1.0",
    ):
        assert named in message
    # A scale written out that equals the default is no obstacle.
    export_hf(perturbed(**GPT_BIGCODE, softmax_scale=8**-0.5), tmp_path / "ok")


def test_cli_exports_a_saved_model_and_refuses_to_overwrite(tmp_path, tokenizer, capsys):
    from mqa_lm.export import main

    model = perturbed(**LLAMA, kv_heads=2)
    src = save_pretrained(model, tmp_path / "ours", tokenizer)
    out = main([str(src), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, model.wte.weight.to(torch.bfloat16))
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "hf")])
    assert exit_.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "hf2")])
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_from_hf_matches_a_random_transformers_model(tmp_path, family):
    """A model transformers itself initialised and saved (not one we exported)."""
    if family == "gpt_bigcode":
        config = transformers.GPTBigCodeConfig(
            vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=6, multi_query=True, n_inner=80
        )
    else:
        config = transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            max_position_embeddings=40,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")  # sharded: an index and several files
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = from_hf(tmp_path / "hf")[0]
    from mqa_lm.pretrained.directory import load_pretrained

    assert torch.equal(load_pretrained(tmp_path / "hf")[0].wte.weight, model.wte.weight)
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_from_hf_refuses_what_it_cannot_compute(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        hidden_act="gelu",
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(HFImportError) as err:
        from_hf(tmp_path / "llama")
    assert "hidden_act='gelu'" in str(err.value) and "rms_norm_eps" not in str(err.value)  # any epsilon maps

    gpt2 = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    transformers.AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(HFImportError, match="model_type='gpt2' is not supported; mqa-lm imports gpt_bigcode, llama"):
        from_hf(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_hf(tmp_path)

    # load_pretrained reads transformers directories through the same mapping.
    from mqa_lm.pretrained.directory import load_pretrained

    with pytest.raises(HFImportError, match="model_type='gpt2' is not supported"):
        load_pretrained(tmp_path / "gpt2")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"


# ---- norm epsilons, sharded checkpoints and what the export CLI says -------------------------------

TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=3,
    max_position_embeddings=40,
)
TINY_GPT_BIGCODE = dict(vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=6, multi_query=True, n_inner=80)


def random_hf(config) -> torch.nn.Module:
    """A transformers model as transformers initialises it, every weight then moved off its init."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_a_norm_epsilon_other_than_ours_round_trips_exactly(tmp_path, family):
    """LlamaConfig's own default rms_norm_eps (1e-6), and GPTBigCode's layer_norm_epsilon=1e-6, import
    with that epsilon (logits equal to transformers') and export with it again."""
    if family == "llama":
        config = transformers.LlamaConfig(**TINY_LLAMA)  # rms_norm_eps left at transformers' default
        assert config.rms_norm_eps == 1e-6
    else:
        config = transformers.GPTBigCodeConfig(**TINY_GPT_BIGCODE, layer_norm_epsilon=1e-6)
    hf = random_hf(config)
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")[0]
    assert model.config.norm_eps == 1e-6
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-5)
        # The epsilon is visible at this tolerance: ours at 1e-5 would not pass the check above.
        at_ours = MQATransformer(replace(model.config, norm_eps=1e-5)).eval()
        at_ours.load_state_dict(model.state_dict())
        assert not torch.allclose(at_ours(idx)[0], expected, rtol=0, atol=1e-5)

    out = export_hf(model, tmp_path / "back")
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert saved["rms_norm_eps" if family == "llama" else "layer_norm_epsilon"] == 1e-6
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, expected, rtol=0, atol=1e-5)


def test_a_sharded_checkpoint_loads_bit_exactly_and_a_missing_shard_is_named(tmp_path):
    hf = random_hf(transformers.LlamaConfig(**TINY_LLAMA, rms_norm_eps=1e-5))
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "sharded" / "model.safetensors").exists()

    whole, sharded = from_hf(tmp_path / "whole")[0].state_dict(), from_hf(tmp_path / "sharded")[0].state_dict()
    assert sharded.keys() == whole.keys()
    for name, tensor in whole.items():
        assert torch.equal(sharded[name], tensor), name
    assert torch.equal(sharded["wte.weight"], hf.model.embed_tokens.weight)
    assert torch.equal(sharded["blocks.1.norm_2.weight"], hf.model.layers[1].post_attention_layernorm.weight)

    (tmp_path / "sharded" / shards[1]).unlink()
    from mqa_lm.pretrained.directory import load_pretrained

    for load in (from_hf, load_pretrained):
        with pytest.raises(HFImportError) as err:
            load(tmp_path / "sharded")
        message = str(err.value)
        assert f"{tmp_path / 'sharded' / shards[1]} is missing" in message, message
        assert f"1 of the {len(shards)} shard files listed in model.safetensors.index.json" in message, message
        assert "copy every shard" in message and "\n" not in message

    # train.py init_from=hf:<it> stops before any work (the weights are read after the Trainer is built).
    from helpers import compose_cfg, tiny_run

    from mqa_lm.training.config import ConfigError
    from mqa_lm.training.run import train

    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    overrides = ["data=text", f"data.paths=[{tmp_path / 'corpus.txt'}]", *tiny_run(tmp_path / "cache")]
    overrides += [f"paths.output_dir={tmp_path / 'run'}", f"init_from=hf:{tmp_path / 'sharded'}"]
    with pytest.raises(ConfigError, match=f"{shards[1]} is missing: 1 of the {len(shards)} shard files"):
        train(compose_cfg(overrides))
    assert not (tmp_path / "cache").exists()


def _truncated_export(tmp_path, tokenizer):
    directory = save_pretrained(perturbed(**LLAMA), tmp_path / "src", tokenizer)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return directory


def _binary_config(tmp_path, tokenizer):
    directory = tmp_path / "src"
    directory.mkdir()
    (directory / "config.json").write_bytes(bytes(range(256)))
    return directory


def _gpt2_dir(tmp_path, tokenizer):
    gpt2 = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    transformers.AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _random_bytes(tmp_path, tokenizer):
    path = tmp_path / "src.ckpt"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _empty_dir(tmp_path, tokenizer):
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


@pytest.mark.parametrize(
    "make_source,extra,expected",
    [
        (_empty_dir, [], "holds no model"),
        (_truncated_export, [], "model.safetensors is corrupt or truncated"),
        (_binary_config, [], "config.json is not valid JSON"),
        (_gpt2_dir, [], "model_type='gpt2' is not supported"),
        (_random_bytes, [], "is corrupt"),
        (lambda tmp_path, tok: save_pretrained(perturbed(**LLAMA), tmp_path / "src"), [], "has no tokenizer.json"),
        (
            lambda tmp_path, tok: save_pretrained(perturbed(**LLAMA), tmp_path / "src", tok),
            ["--tokenizer-path", "{tmp}"],
            "does not exist",
        ),
        (
            lambda tmp_path, tok: save_pretrained(perturbed(**LLAMA), tmp_path / "src", tok),
            ["OUT_UNDER_A_FILE"],
            "is a file, not a directory",
        ),
    ],
)
def test_export_cli_errors_are_one_line_and_exit_2(tmp_path, tokenizer, capsys, make_source, extra, expected):
    from mqa_lm.export import main

    source = make_source(tmp_path, tokenizer)
    out = tmp_path / "out"
    if extra == ["OUT_UNDER_A_FILE"]:
        (tmp_path / "file").write_text("keep me\n", encoding="utf-8")
        out, extra = tmp_path / "file" / "out", []
    args = [str(source), str(out), *(a.replace("{tmp}", str(tmp_path / "nothing.json")) for a in extra)]
    capsys.readouterr()  # what making the source printed (transformers' progress bars)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists()
    if (tmp_path / "file").exists():
        assert (tmp_path / "file").read_text(encoding="utf-8") == "keep me\n"
