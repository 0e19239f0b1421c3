"""Self-contained models: save_pretrained / load_pretrained, checkpoints that carry their tokenizer,
and the run directory's tokenizer.json and best-model export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CORPUS, compose_cfg
from safetensors import safe_open
from test_training import small_run

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.data.tokenizer import build_char
from mqa_lm.pretrained.directory import (
    MissingTokenizerError,
    PretrainedError,
    load_pretrained,
    save_pretrained,
)

TEXT = "hello pretrained world, with a few characters\n"


def tiny(**overrides) -> MQATransformer:
    fields = dict(vocab_size=64, max_seq_len=32, n_layers=2, d_model=32, heads=4, kv_heads=2, attn_impl="torch")
    torch.manual_seed(0)
    return MQATransformer(MQAConfig(**{**fields, **overrides})).eval()


def tokens(vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pos_emb": "rope", "mlp_type": "swiglu", "norm_type": "rmsnorm", "bias": False, "tie_embeddings": False},
        {"pos_emb": "alibi", "qk_ln": True, "clip_qkv": 4.0, "kv_heads": 1},
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, overrides):
    model = tiny(**overrides)
    with torch.no_grad():  # move every weight off its init so nothing matches by construction
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokenizer = build_char([TEXT])
    out = save_pretrained(model, tmp_path / "export", tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(out.glob(".*tmp"))

    loaded, tok = load_pretrained(out)
    assert not loaded.training
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert tok.encode(TEXT).ids == tokenizer.encode(TEXT).ids
    assert json.loads((out / "config.json").read_text()) == model.config.to_dict()

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    tied = model.config.tie_embeddings
    assert ("lm_head.weight" in stored) == (not tied)  # a tied head is stored once, as wte.weight
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied


def test_from_pretrained_dtype_device_and_rng(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "m")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    loaded = load_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cpu")[0]
    assert torch.equal(torch.rand(3), before)  # loading does not consume the caller's random numbers
    assert isinstance(loaded, MQATransformer)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.wte.weight, model.wte.weight.to(torch.bfloat16))
    # Stored bf16 stays bf16 by default.
    save_pretrained(loaded, tmp_path / "bf16")
    again, tok = load_pretrained(tmp_path / "bf16")
    assert tok is None and again.wte.weight.dtype == torch.bfloat16


def test_refuses_to_overwrite_a_different_model(tmp_path):
    save_pretrained(tiny(), tmp_path / "m")
    save_pretrained(tiny(attn_impl="auto"), tmp_path / "m")  # same architecture: an update
    with pytest.raises(PretrainedError, match=r"different model \(d_model 32 -> 64; heads 4 -> 8\)"):
        save_pretrained(tiny(d_model=64, heads=8), tmp_path / "m")
    assert load_pretrained(tmp_path / "m")[0].config.d_model == 32
    save_pretrained(tiny(d_model=64, heads=8), tmp_path / "m", overwrite=True)
    assert load_pretrained(tmp_path / "m")[0].config.d_model == 64


def test_clear_errors_for_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist; pass a directory written by save_pretrained"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="holds no model"):
        load_pretrained(tmp_path / "empty")

    out = save_pretrained(tiny(), tmp_path / "m")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="model.safetensors is corrupt or truncated"):
        load_pretrained(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="has no model.safetensors: the export is incomplete"):
        load_pretrained(out)

    out = save_pretrained(tiny(), tmp_path / "m2")
    (out / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="config.json is not valid JSON"):
        load_pretrained(out)
    (out / "config.json").write_text(json.dumps({**tiny().config.to_dict(), "n_head": 4}))
    with pytest.raises(PretrainedError, match=r"not a valid model config: unknown model config keys \['n_head'\]"):
        load_pretrained(out)
    (out / "config.json").write_text(json.dumps({**tiny().config.to_dict(), "n_layers": 3}))
    with pytest.raises(PretrainedError, match="do not match its model config: missing blocks.2"):
        load_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json lacks 'hidden_size', which a llama config must have"):
        load_pretrained(out)

    out = save_pretrained(tiny(), tmp_path / "m3")
    with pytest.raises(MissingTokenizerError, match="has no tokenizer.json; pass tokenizer_path="):
        load_pretrained(out, require_tokenizer=True)
    big = build_char(["".join(chr(0x4E00 + i) for i in range(100))])
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(PretrainedError, match="tokenizer has 102 ids but the model .* only 64"):
        load_pretrained(out, tokenizer_path=tmp_path / "big.json")
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PretrainedError, match="bad.ckpt"):
        load_pretrained(tmp_path / "bad.ckpt")


def test_a_training_run_is_self_contained(tmp_path):
    """A real short run: the checkpoint carries its tokenizer, the run directory has tokenizer.json
    and model/ holds the best checkpoint's weights."""
    from mqa_lm.data.tokenizer import load_tokenizer
    from mqa_lm.training.module import MQALitModule
    from mqa_lm.training.run import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    # A learning rate this high makes the second validation far worse than the first (3.49 -> 4.45),
    # so the best checkpoint is not the last one.
    metrics = train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "optim=adamw",  # one rate for every weight
                "optim.lr=0.1",
                "optim.min_lr=0.1",
                "optim.warmup_steps=2",
                "sample.max_new_tokens=0",
            )
        )
    )
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    raw = torch.load(last, map_location="cpu", weights_only=True)
    assert isinstance(raw["tokenizer"], str)
    data_tokenizer = load_tokenizer(next((tmp_path / "cache").rglob("tokenizer.json")))
    assert (run / "tokenizer.json").read_text() == data_tokenizer.to_str()

    model, tok = load_pretrained(last, require_tokenizer=True)
    assert tok.encode(CORPUS[:200]).ids == data_tokenizer.encode(CORPUS[:200]).ids
    reference = MQALitModule.load_from_checkpoint(last, weights_only=True, map_location="cpu").model.eval()
    idx = torch.tensor([data_tokenizer.encode(CORPUS[:16]).ids])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reference(idx)[0])

    # The run directory loads its export: the best checkpoint's weights, with the tokenizer.
    best = [p for p in ckpt_dir.glob("step*.ckpt")]
    assert [p.name[:10] for p in best] == ["step000002"]
    exported, tok2 = load_pretrained(run)
    best_model, _ = load_pretrained(best[0])
    for name, tensor in best_model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    # The worse step-4 weights (which Lightning keeps in no checkpoint) did not replace the export.
    assert metrics["val/loss"] > float(best[0].stem.split("-val")[1]) + 0.5
    assert tok2.to_str() == data_tokenizer.to_str()

    # A checkpoint from before tokenizers were saved, away from its run directory: the error names the fix.
    del raw["tokenizer"]
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    assert load_pretrained(old)[1] is None
    with pytest.raises(MissingTokenizerError, match="predates saved tokenizers; pass tokenizer_path=<data cache>"):
        load_pretrained(old, require_tokenizer=True)
    _, tok3 = load_pretrained(old, tokenizer_path=next((tmp_path / "cache").rglob("tokenizer.json")))
    assert tok3.encode(CORPUS[:50]).ids == data_tokenizer.encode(CORPUS[:50]).ids


@pytest.mark.parametrize("kind", ["hf", "run_dir", "ckpt"])
def test_init_from_starts_training_from_pretrained_weights(tmp_path, kind):
    """train.py init_from=...: the pretrained architecture, tokenizer and weights, whatever model.* says."""
    from mqa_lm.training.config import ConfigError
    from mqa_lm.training.run import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    first = tmp_path / "first"
    train(compose_cfg(small_run(first, corpus, "trainer.max_steps=2", "sample.max_new_tokens=0")))
    source_model, source_tok = load_pretrained(first / "run")
    if kind == "hf":
        pytest.importorskip("transformers")
        from mqa_lm.pretrained.hf import export_hf

        spec = "hf:" + str(export_hf(source_model, tmp_path / "hf", source_tok))
        source_model, _ = load_pretrained(spec[3:])  # the same weights; norm_type reads back as layernorm
    else:
        spec = str(first / "run" if kind == "run_dir" else first / "run" / "checkpoints" / "last.ckpt")
        source_model, _ = load_pretrained(spec)

    second = tmp_path / "second"
    # model.* asks for another architecture and data.tokenizer for BPE: init_from overrides both. A
    # learning rate of 1e-12 keeps the one step from moving the weights measurably.
    train(
        compose_cfg(
            small_run(
                second,
                corpus,
                f"init_from={spec}",
                "model.d_model=64",
                "model.n_layers=1",
                "data.tokenizer=bpe",
                "data.vocab_size=300",
                "trainer.max_steps=1",
                "optim=adamw",  # one rate for every weight
                "optim.lr=1e-12",
                "optim.min_lr=0",
                "optim.warmup_steps=0",
                "trainer.val_check_interval=1",
                "sample.max_new_tokens=0",
            )
        )
    )
    started, tok = load_pretrained(second / "run" / "checkpoints" / "last.ckpt")
    # Runtime fields (attn_impl, dropouts, ...) keep the run's model.* values; the rest is the source's.
    from mqa_lm.training.init_from import RUNTIME_FIELDS

    def architecture(config):
        return {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}

    assert architecture(started.config) == architecture(source_model.config)
    for name, tensor in source_model.state_dict().items():
        torch.testing.assert_close(started.state_dict()[name], tensor, rtol=0, atol=1e-9, msg=name)
    assert tok.encode(CORPUS[:100]).ids == source_tok.encode(CORPUS[:100]).ids

    with pytest.raises(ConfigError, match="init_from='/nope' does not exist"):
        train(compose_cfg(small_run(tmp_path / "third", corpus, "init_from=/nope")))


def test_a_tokenizer_path_unlike_the_saved_tokenizer_is_refused_or_warned(tmp_path, caplog):
    """tokenizer_path overrides the model's own tokenizer: another vocabulary size is refused (its ids
    would decode to other text), another tokenizer of the same size is one warning line."""
    import logging

    from mqa_lm.data.tokenizer import vocab_size_of

    own = build_char([TEXT])
    source = save_pretrained(tiny(), tmp_path / "model", own)
    smaller = build_char(["abc"])  # fewer ids: the check against the model's vocab_size cannot catch it
    smaller.save(str(tmp_path / "smaller.json"))
    n_own, n_smaller = vocab_size_of(own), vocab_size_of(smaller)
    with pytest.raises(PretrainedError) as err:
        load_pretrained(source, tokenizer_path=tmp_path / "smaller.json")
    message = str(err.value)
    assert f"tokenizer_path={tmp_path / 'smaller.json'} has {n_smaller} ids" in message, message
    assert f"the tokenizer saved with {source} has {n_own}" in message, message
    assert "leave tokenizer_path unset" in message and "\n" not in message

    # Same number of ids, other characters: the ids mean other text, but it may be intended.
    swapped = build_char([TEXT.replace("h", "Q")])
    assert vocab_size_of(swapped) == n_own
    swapped.save(str(tmp_path / "swapped.json"))
    with caplog.at_level(logging.WARNING, logger="mqa_lm"):
        _, tok = load_pretrained(source, tokenizer_path=tmp_path / "swapped.json")
    assert tok.to_str() == swapped.to_str()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert str(tmp_path / "swapped.json") in warned[0] and "differs from the tokenizer saved with" in warned[0]

    # The same tokenizer from another file: nothing to say.
    caplog.clear()
    own.save(str(tmp_path / "copy.json"))
    with caplog.at_level(logging.WARNING, logger="mqa_lm"):
        load_pretrained(source, tokenizer_path=tmp_path / "copy.json")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_init_from_a_transformers_llama_with_its_default_norm_epsilon_trains(tmp_path):
    """train.py init_from=hf:<dir> on a LlamaConfig() as transformers saves it (rms_norm_eps 1e-6)."""
    transformers = pytest.importorskip("transformers")
    from mqa_lm.training.run import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tokenizer = build_char([CORPUS])
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    tokenizer.save(str(tmp_path / "llama" / "tokenizer.json"))
    metrics = train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                f"init_from=hf:{tmp_path / 'llama'}",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "sample.max_new_tokens=0",
            )
        )
    )
    assert metrics["val/loss"] > 0
    trained, _ = load_pretrained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert trained.config.norm_eps == 1e-6 and trained.config.norm_type == "rmsnorm"


def test_model_source_peeks_an_exports_config_without_its_weights(tmp_path):
    """ModelSource.peek_config (generate.py's device warm-up reads the widths with it before the load)
    reads config.json alone: the saved config from an export or a run's model/, None where only a
    load could tell (a checkpoint, a damaged config, nothing there)."""
    from mqa_lm.cli.options import ModelSource

    model = tiny(d_model=64, heads=8, kv_heads=1)
    out = save_pretrained(model, tmp_path / "run" / "model")
    (out / "model.safetensors").write_bytes(b"not read")  # the weights are not touched
    assert ModelSource(str(out)).peek_config() == model.config
    assert ModelSource(str(tmp_path / "run")).peek_config() == model.config
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    assert ModelSource(str(tmp_path / "x.ckpt")).peek_config() is None
    assert ModelSource(str(tmp_path / "nothing")).peek_config() is None
    (out / "config.json").write_text("{not json", encoding="utf-8")
    assert ModelSource(str(out)).peek_config() is None
