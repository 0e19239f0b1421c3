"""The training slice end to end: config composition, validation messages, fast_dev_run, resume."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, CORPUS, ROOT, compose_cfg, tiny_run
from hydra.utils import instantiate
from lightning.fabric.plugins.precision.precision import (
    _PRECISION_INPUT_INT,
    _PRECISION_INPUT_STR,
    _PRECISION_INPUT_STR_ALIAS,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from mqa_lm.training.checkpointing import SPECIAL_CKPT_PATHS
from mqa_lm.training.config import PRECISION_VALUES, ConfigError, DataError, validate_config
from mqa_lm.training.run import build_callbacks, build_loggers, train

os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def small_run(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run on a character corpus."""
    return [
        "data=text",
        f"data.paths=[{corpus}]",
        *tiny_run(tmp_path / "cache"),
        f"paths.output_dir={tmp_path / 'run'}",
        "sample.max_new_tokens=8",
        *extra,
    ]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in ("model", "trainer", "logger", "callbacks", "optim", "module", "debug", "experiment", "data")
        for o in group_options(g)
    ],
)
def test_every_config_option_composes_and_instantiates(tmp_path, corpus, group, option):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    if (group, option) == ("data", "hf"):  # a local .txt file is a datasets "text" dataset (a line per record)
        overrides += [f"data.name={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    elif group == "data" or group == "experiment":
        overrides += [f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_cfg(overrides)
    validate_config(cfg)
    instantiate(cfg.data)
    for cb in build_callbacks(cfg):
        assert cb is not None
    build_loggers(cfg)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(precision="32-true", accelerator="cpu", devices=1)
    # trainer=fsdp's FSDP2Strategy (Lightning's ModelParallelStrategy) builds on the CPU as well.
    instantiate(trainer_cfg, logger=False, enable_checkpointing=False)


def test_experiments_match_the_nanogpt_recipes(tmp_path, corpus):
    gpu = compose_cfg(["experiment=shakespeare_char", f"data.paths=[{corpus}]"])
    assert (gpu.model.n_layers, gpu.model.d_model, gpu.model.heads, gpu.model.kv_heads) == (6, 384, 6, 1)
    assert (gpu.data.block_size, gpu.data.batch_size, gpu.model.resid_pdrop) == (256, 64, 0.2)
    # nanoGPT's optimizer and schedule (the recipe measured beside it on a GPU).
    assert (gpu.optim.name, gpu.optim.lr, gpu.model.pos_emb, gpu.trainer.max_steps) == ("adamw", 1e-3, "learned", 5000)
    # The time-to-quality candidate: Muon, rotary positions, a 1000-step schedule.
    muon = compose_cfg(["experiment=shakespeare_char_muon", f"data.paths=[{corpus}]"])
    assert (muon.optim.name, muon.optim.muon_lr, muon.model.pos_emb, muon.trainer.max_steps) == (
        "muon",
        0.02,
        "rope",
        1000,
    )
    assert (muon.model.n_layers, muon.model.d_model, muon.data.batch_size) == (6, 384, 64)
    cpu = compose_cfg(["experiment=shakespeare_char_cpu", f"data.paths=[{corpus}]"])
    assert (cpu.model.n_layers, cpu.model.d_model, cpu.model.heads, cpu.data.block_size, cpu.data.batch_size) == (
        4,
        128,
        4,
        64,
        12,
    )
    assert (cpu.trainer.max_steps, cpu.model.resid_pdrop, cpu.optim.name, cpu.optim.lr) == (2000, 0.0, "adamw", 1e-3)
    # MQA parameter-matched to nanoGPT's MHA model: the MLP takes what K/V no longer use.
    from mqa_lm import MQAConfig, MQATransformer

    for cfg in (gpu, cpu):
        fields = {k: v for k, v in cfg.model.items()}
        mqa = MQATransformer(MQAConfig(**{**fields, "vocab_size": 65})).num_params()
        mha = MQATransformer(
            MQAConfig(**{**fields, "vocab_size": 65, "kv_heads": fields["heads"], "mlp_hidden": None})
        ).num_params()
        assert mqa == mha


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.heads=7", "model.d_model=512"], "model.d_model=512 is not divisible by model.heads=7"),
        (["model.attn_impl=foo"], "unknown model.attn_impl 'foo'; valid choices are: auto, flash, torch, triton"),
        (["model.norm_type=batchnorm"], "unknown model.norm_type 'batchnorm'"),
        (["model.kv_heads=3"], "kv_heads=3"),
        (["optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
        (["optim.min_lr=1.0"], "optim.min_lr must be in [0, optim.lr="),
        (["model.max_seq_len=64", "data.block_size=128"], "data.block_size=128 is longer than model.max_seq_len=64"),
        (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
        (["trainer.max_steps=many"], "trainer.max_steps must be an integer, got 'many'"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
        (["+model.n_head=4"], "unknown model config keys ['n_head']"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt' does not exist"),
        # Lightning's model-registry download is not supported: the same message as any missing file.
        (["ckpt_path=registry"], "ckpt_path='registry' does not exist"),
        (["resume=sometimes"], "resume='sometimes' is not one of auto, never"),
        (["data.block_size=0"], "data.block_size must be an integer >= 1, got 0"),
        (["data.tokenizer=words"], "unknown data.tokenizer 'words'"),
        (["+data.block=4"], "unknown data keys ['block']"),
        (["sample.max_new_tokens=-1"], "sample.max_new_tokens must be an integer >= 0, got -1"),
        (["sample.top_k=0"], "sample.top_k must be null or an integer >= 1, got 0; null keeps all tokens"),
        (["module.compile=sometimes"], "module.compile must be auto, true or false, got 'sometimes'"),
        (["sample.temperature=-1"], "sample.temperature must be >= 0 (0 = greedy), got -1"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval must be an integer >= 1"),
        (["trainer.val_check_interval=1.5"], "trainer.val_check_interval must be an integer >= 1"),
        (["trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5 is a fraction of an epoch"),
        (["trainer.precision=foo"], "trainer.precision='foo' is not one of auto, transformer-engine"),
        (["seed=abc"], "seed must be an integer, got 'abc'; e.g. seed=1337"),
        # torch only warns (and keeps its precision) for another value: the run went on silently.
        (["matmul_precision=ultra"], "matmul_precision='ultra' is not one of highest, high, medium or null"),
    ],
)
def test_bad_config_values_stop_with_one_clear_message(tmp_path, overrides, message):
    cfg = compose_cfg([f"paths.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_validated_groups_are_the_objects_the_run_uses(tmp_path):
    from mqa_lm.data import DataConfig
    from mqa_lm.model import MQAConfig
    from mqa_lm.optim import OptimConfig

    run = validate_config(compose_cfg([f"paths.output_dir={tmp_path}", "seed=42", "optim.lr=3e-4"]))
    assert isinstance(run.model, MQAConfig) and run.vocab_from_data  # the model configs leave vocab_size null
    assert isinstance(run.optim, OptimConfig) and run.optim.lr == 3e-4
    assert isinstance(run.data, DataConfig) and run.data.seed == 42 and run.data.paths == ["stdlib"]
    assert run.compile == "auto" and run.sample.max_new_tokens == 200
    assert not validate_config(compose_cfg([f"paths.output_dir={tmp_path}", "model.vocab_size=300"])).vocab_from_data
    # Written out so that the check runs before Lightning's import: the list is Lightning's own.
    lightning_values = {
        str(v)
        for literal in (_PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS, _PRECISION_INPUT_INT)
        for v in typing.get_args(literal)
    }
    assert len(PRECISION_VALUES) == len(set(PRECISION_VALUES)) and set(PRECISION_VALUES) == lightning_values
    for precision in ("16", "bf16-mixed", "32-true", "auto"):  # Lightning's values pass (16 arrives as an int)
        validate_config(compose_cfg([f"paths.output_dir={tmp_path}", f"trainer.precision={precision}"]))
    # Lightning resolves these names itself: they pass validation without a file.
    for name in SPECIAL_CKPT_PATHS:
        assert validate_config(compose_cfg([f"paths.output_dir={tmp_path}", f"ckpt_path={name}"])).ckpt_path == name


def test_bad_callback_values_stop_with_one_clear_message(tmp_path):
    cfg = compose_cfg([f"paths.output_dir={tmp_path}", "callbacks.preemption.check_every_n_steps=0"])
    with pytest.raises(ConfigError, match="callbacks.preemption.check_every_n_steps must be an integer >= 1, got 0"):
        build_callbacks(cfg)
    cfg = compose_cfg([f"paths.output_dir={tmp_path}", "callbacks.preemption.requeue_signals=[SIGHUP]"])
    with pytest.raises(ConfigError, match=r"callbacks.preemption.requeue_signals \['SIGHUP'\] are not in"):
        build_callbacks(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        # Ours: the comparison in its checks would have said "'<' not supported between 'int' and 'str'".
        ("callbacks.attention_maps.gamma=x", "callbacks.attention_maps.gamma must be a number, got 'x'"),
        ("callbacks.throughput.peak_flops=1e15x", "callbacks.throughput.peak_flops must be a number or null"),
        ("callbacks.grad_norm.norm_type=two", "callbacks.grad_norm.norm_type must be a number, got 'two'"),
        # Lightning's own (EarlyStopping's min_delta: float), from its annotations too.
        (
            "callbacks=[default,early_stopping] callbacks.early_stopping.min_delta=x",
            "callbacks.early_stopping.min_delta must be a number, got 'x'",
        ),
        ("callbacks.model_checkpoint.save_top_k=x", "callbacks.model_checkpoint.save_top_k must be an integer"),
        # Lightning's MisconfigurationException (neither a ValueError nor a TypeError) was a traceback.
        ("callbacks.lr_monitor.logging_interval=hour", "callbacks.lr_monitor: logging_interval should be"),
    ],
)
def test_a_callback_number_given_text_names_its_key(tmp_path, override, message):
    cfg = compose_cfg([f"paths.output_dir={tmp_path}", *override.split()])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        build_callbacks(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        # Lightning compared it with the batch count inside fit(): a traceback after the data was prepared.
        ("trainer.log_every_n_steps=x", "trainer.log_every_n_steps must be an integer or null, got 'x'"),
        ("trainer.gradient_clip_val=1e0x", "trainer.gradient_clip_val must be a number or null, got '1e0x'"),
        ("trainer.limit_val_batches=all", "trainer.limit_val_batches must be a number or null, got 'all'"),
        ("data._target_=nope.Nope", "data._target_='nope.Nope' is not an importable class ("),
        # The loggers were built after the data was prepared, and their errors were tracebacks.
        ("logger=wandb logger.wandb.mode=sometimes", "logger.wandb.mode must be online, offline, disabled or null"),
    ],
)
def test_bad_trainer_and_datamodule_values_stop_the_run_before_the_data(tmp_path, caplog, override, message):
    cache = tmp_path / "cache"
    cfg = compose_cfg([f"paths.output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}", *override.split()])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        train(cfg)
    assert not cache.exists()  # nothing was prepared
    # Hydra's own ERROR record of a name that does not import would land in train.log and keep the
    # run directory of a run that never started (train.py removes it only when the log is empty).
    assert [r for r in caplog.records if r.name.startswith("hydra")] == []


def test_an_accelerator_whose_package_is_missing_is_a_config_error(tmp_path):
    """Lightning's Trainer raises an ImportError for it (a traceback before): one line naming the package."""
    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    overrides = [f"data.paths=[{corpus}]", f"paths.output_dir={tmp_path / 'run'}", "trainer.accelerator=tpu"]
    with pytest.raises(ConfigError, match=r"^trainer: Requirement 'torch_xla"):
        train(compose_cfg(tiny_run(tmp_path / "cache") + overrides))


def test_preemption_defaults_are_one_set():
    """The callback's defaults and configs/callbacks/preemption.yaml name the same signals."""
    from mqa_lm.training.checkpointing import DEFAULT_REQUEUE_SIGNALS, DEFAULT_SIGNALS, PreemptionCallback

    yaml = OmegaConf.load(CONFIGS / "callbacks" / "preemption.yaml").preemption
    assert list(yaml.signals) == list(DEFAULT_SIGNALS) and list(yaml.requeue_signals) == list(DEFAULT_REQUEUE_SIGNALS)
    assert "SIGUSR2" in DEFAULT_SIGNALS  # submitit's warning signal (configs/hydra/launcher/slurm.yaml)
    cb = PreemptionCallback()
    assert [s.name for s in cb.signals] == list(DEFAULT_SIGNALS)
    assert sorted(s.name for s in cb.requeue_signals) == sorted(DEFAULT_REQUEUE_SIGNALS)


def test_compile_auto_follows_the_accelerator():
    import lightning as L

    from mqa_lm.training.distributed import FSDP2Strategy
    from mqa_lm.training.run import resolve_compile, resolve_compile_scope

    cpu = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert resolve_compile("auto", cpu) is False
    assert resolve_compile(True, cpu) is True and resolve_compile(False, cpu) is False
    fsdp_cpu = L.Trainer(
        accelerator="cpu", devices=1, strategy=FSDP2Strategy(), logger=False, enable_checkpointing=False
    )
    assert resolve_compile("auto", fsdp_cpu) is False
    # compile_scope=auto: each block on its own under FSDP2 (its collectives between the graphs).
    assert resolve_compile_scope("auto", cpu) == "model" and resolve_compile_scope("auto", fsdp_cpu) == "blocks"
    assert resolve_compile_scope("model", fsdp_cpu) == "model"
    if torch.cuda.is_available():
        gpu = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False)
        assert resolve_compile("auto", gpu) is True
        fsdp_gpu = L.Trainer(
            accelerator="gpu", devices=1, strategy=FSDP2Strategy(), logger=False, enable_checkpointing=False
        )
        assert resolve_compile("auto", fsdp_gpu) is True


def test_callbacks_none_trains_without_checkpoints_or_fault_tolerance(tmp_path, corpus):
    metrics = train(
        compose_cfg(
            small_run(tmp_path, corpus, "callbacks=none", "trainer.max_steps=4", "trainer.val_check_interval=4")
        )
    )
    assert metrics["val/loss"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_path_stops_before_work(tmp_path):
    cfg = compose_cfg(small_run(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="nope.txt"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resumed_run_reaches_the_weights_of_an_uninterrupted_run(tmp_path, corpus, optim):
    common = [
        f"optim={optim}",
        "optim.decay_steps=16",
        "optim.warmup_steps=4",
        "trainer.val_check_interval=8",
        "trainer.deterministic=true",
        "sample.max_new_tokens=0",
    ]
    straight = tmp_path / "straight"
    train(compose_cfg(small_run(straight, corpus, "trainer.max_steps=16", *common)))
    first = tmp_path / "first"
    train(compose_cfg(small_run(first, corpus, "trainer.max_steps=8", *common)))
    last = first / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    resumed = tmp_path / "resumed"
    train(compose_cfg(small_run(resumed, corpus, "trainer.max_steps=16", f"ckpt_path={last}", *common)))

    a = _weights(straight / "run" / "checkpoints" / "last.ckpt")
    b = _weights(resumed / "run" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # and the run did learn: the resumed weights moved away from the step-8 checkpoint
    mid = _weights(last)
    assert any(not torch.equal(mid[n], b[n]) for n in mid)


def test_checkpoint_hyperparameters_are_plain_and_rebuild_the_model(tmp_path, corpus):
    train(compose_cfg(small_run(tmp_path, corpus, "trainer.max_steps=4", "trainer.val_check_interval=4")))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert type(hp["model"]) is dict and hp["model"]["vocab_size"] > 1
    from mqa_lm.training.module import MQALitModule

    module = MQALitModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.model.config.vocab_size == hp["model"]["vocab_size"]


def test_train_py_fast_dev_run_of_the_default_prints_a_sample(tmp_path):
    """The real entry point on the embedded default corpus (capped so the test stays quick)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "debug=fdr",
        "data.max_chars=200000",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sample (" in proc.stdout
    assert (tmp_path / "run" / "sample.txt").read_text(encoding="utf-8").strip()


def _train_py(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


# One value per place a ConfigError is raised (the config's validation; the callbacks' own checks):
# every other value's message is asserted in-process above, and train.py prints them all alike.
@pytest.mark.parametrize(
    "override,line",
    [
        ("seed=abc", "config error: seed must be an integer, got 'abc'"),
        (
            "callbacks.preemption.check_every_n_steps=0",
            "config error: callbacks.preemption.check_every_n_steps must be an integer >= 1, got 0",
        ),
    ],
)
def test_train_py_bad_values_give_one_line_and_exit_2(tmp_path, override, line):
    """The real entry point: nothing but the one line on stderr, rc 2, no run directory work."""
    proc = _train_py(tmp_path, override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fused_adamw_under_bf16_mixed_clips_gradients(optim):
    """Lightning refuses to clip for fused optimizers; the module clips itself when no scaler exists.
    Under optim=muon the fused AdamW sits inside MuonAdamW, which Lightning clips itself."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from mqa_lm.training.module import MQALitModule

    torch.manual_seed(0)
    data = torch.randint(0, 32, (8, 17))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
    module = MQALitModule(
        model=dict(vocab_size=32, max_seq_len=16, n_layers=1, d_model=32, heads=4, attn_impl="torch"),
        optim=dict(name=optim, lr=1e-3, warmup_steps=1, fused=True),
    )
    seen: list[float] = []

    class RecordNorm(L.Callback):
        def on_train_start(self, trainer, pl_module):
            # A post-hook: Lightning runs backward and clipping inside optimizer.step(closure), and the
            # step leaves the (clipped) gradients in place.
            def post_step(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(post_step)

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordNorm()],
    )
    trainer.fit(module, loader)
    assert any(group.get("fused") for group in trainer.optimizers[0].param_groups)
    assert len(seen) == 2 and all(n <= 1e-3 * 1.01 for n in seen), seen


def test_compiled_module_reports_its_first_step_time(caplog):
    """The first compiled step (tracing and compiling included) is timed once; eager runs say nothing."""
    import logging

    from mqa_lm.training.module import MQALitModule

    model = dict(vocab_size=32, max_seq_len=16, n_layers=1, d_model=32, heads=4, attn_impl="torch")
    with caplog.at_level(logging.INFO):
        for compiled in (False, True):
            module = MQALitModule(model=model, compile=compiled)  # torch.compile is lazy: nothing compiles here
            for batch_idx in range(2):
                module.on_train_batch_start(None, batch_idx)
                module.on_train_batch_end(None, None, batch_idx)
    timed = [r.getMessage() for r in caplog.records if "compile + first step" in r.getMessage()]
    assert len(timed) == 1 and timed[0].endswith(" s"), timed


def test_module_takes_the_validated_configs_and_waits_for_the_vocabulary(tmp_path):
    """With model.vocab_size null the module builds nothing until the trainer's datamodule gives the
    size (test_checkpoint_hyperparameters_are_plain_and_rebuild_the_model covers that end to end)."""
    from mqa_lm.training.module import MQALitModule

    run = validate_config(compose_cfg([f"paths.output_dir={tmp_path}", "model.n_layers=1", "model.d_model=32"]))
    module = MQALitModule(model=run.model, optim=run.optim, vocab_from_data=run.vocab_from_data)
    assert module.model is None and module.hparams["model"]["vocab_size"] is None
    assert module.optim_config is run.optim
    built = MQALitModule(model=run.model.to_dict() | {"vocab_size": 77}, optim=run.optim.to_dict())
    assert built.config.vocab_size == 77 and built.config.n_layers == 1


def test_compile_scope_blocks_compiles_each_block_in_place():
    """compile_scope=blocks: every block compiled on its own, state_dict keys as in eager; a bad
    scope is one config error naming the key."""
    from mqa_lm.model import MQAConfig
    from mqa_lm.training.module import MQALitModule

    config = MQAConfig(vocab_size=50, max_seq_len=16, n_layers=2, d_model=32, heads=4)
    eager = MQALitModule(model=config, compile=False)
    blocks = MQALitModule(model=config, compile=True, compile_scope="blocks")
    assert all(block._compiled_call_impl is not None for block in blocks.model.blocks)
    assert blocks.model._compiled_call_impl is None
    assert list(blocks.state_dict()) == list(eager.state_dict())
    with pytest.raises(ConfigError, match="module.compile_scope must be one of auto, model, blocks, got 'layers'"):
        validate_config(compose_cfg(["module.compile_scope=layers"]))


def test_resume_target_past_max_steps_or_of_another_shape_stops_before_training(tmp_path, corpus, capsys):
    first = tmp_path / "first"
    train(
        compose_cfg(
            small_run(first, corpus, "trainer.max_steps=8", "trainer.val_check_interval=8", "sample.max_new_tokens=0")
        )
    )
    last = first / "run" / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(small_run(second, corpus, f"ckpt_path={last}", "trainer.max_steps=4")))
    assert str(err.value).startswith(
        f"the checkpoint {last} is at step 8, already past trainer.max_steps=4, "
        "so nothing would be trained; raise trainer.max_steps above 8"
    )
    with pytest.raises(ConfigError, match="already at trainer.max_steps=8"):
        train(compose_cfg(small_run(second, corpus, f"ckpt_path={last}", "trainer.max_steps=8")))
    # An optimizer's state loads only into the same kind of optimizer (the first run had the default, muon).
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(small_run(second, corpus, f"ckpt_path={last}", "trainer.max_steps=16", "optim=adamw")))
    assert str(err.value) == (
        f"the checkpoint {last} was trained with optim=muon; this command has optim=adamw; use optim=muon to "
        "continue it, or start a new run (resume=never, or another hydra.run.dir)"
    )
    # small_run has model.d_model=32, model.n_layers=2; Hydra keeps the last override of a key.
    with pytest.raises(ConfigError) as err:
        train(
            compose_cfg(
                small_run(
                    second,
                    corpus,
                    f"ckpt_path={last}",
                    "trainer.max_steps=16",
                    "model.d_model=64",
                    "model.n_layers=1",
                    "model.resid_pdrop=0.1",
                )
            )
        )
    assert str(err.value).startswith(
        f"the checkpoint {last} was trained with model.n_layers=2, model.d_model=32; "
        "this command has model.n_layers=1, model.d_model=64; use the checkpoint's"
    )
    assert not (second / "run" / "checkpoints").exists()
    # Dropout and the attention kernel may change on resume. No validation runs, so there is no best
    # score: the first run's best path (all Lightning restores from another directory) is not reported.
    capsys.readouterr()
    train(
        compose_cfg(
            small_run(
                second,
                corpus,
                f"ckpt_path={last}",
                "trainer.max_steps=9",
                "trainer.val_check_interval=100",
                "model.resid_pdrop=0.1",
                "model.attn_impl=torch",
                "sample.max_new_tokens=0",
            )
        )
    )
    out = capsys.readouterr().out
    assert "final metrics: {'train/loss'" in out and "best checkpoint" not in out, out


def _csv_steps(run_dir: Path) -> list[tuple[int, bool]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), bool(r.get("val/loss"))) for r in csv.DictReader(f)]


def test_resume_rotates_out_old_recovery_files_and_drops_replayed_csv_rows(tmp_path, corpus):
    """An attempt that ran to step 8 is continued from its step-4 recovery checkpoint (as after a kill -9
    whose newest files were damaged): the recovery files of the first attempt, the resumed one included,
    are rotated out, and metrics.csv holds each step once, as an uninterrupted run logs them."""
    common = [
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "callbacks.recovery_checkpoint.every_n_train_steps=4",
        "sample.max_new_tokens=0",
    ]
    straight = tmp_path / "straight"
    train(compose_cfg(small_run(straight, corpus, "trainer.max_steps=16", *common)))
    run = tmp_path / "resumed"
    train(compose_cfg(small_run(run, corpus, "trainer.max_steps=8", *common)))
    ckpts = run / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("recovery-*")) == ["recovery-step000004.ckpt", "recovery-step000008.ckpt"]
    train(
        compose_cfg(
            small_run(run, corpus, "trainer.max_steps=16", f"ckpt_path={ckpts / 'recovery-step000004.ckpt'}", *common)
        )
    )
    assert sorted(p.name for p in ckpts.glob("recovery-*")) == ["recovery-step000012.ckpt", "recovery-step000016.ckpt"]
    assert _csv_steps(run / "run") == _csv_steps(straight / "run")


# -- data errors and the vocabulary: found after data preparation, before the Trainer -----------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"  # nothing listens there: connection refused


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", "data.paths: {path} is empty; remove it from data.paths or add text"),
        (
            "latin1.txt",
            "caf\u00e9 au lait ".encode("latin-1") * 50,
            "{path}: not UTF-8 at byte 3 (invalid continuation byte); convert it",
        ),
        ("binary.bin", bytes(range(256)) * 8, "{path}: not UTF-8 at byte 128 (invalid start byte); convert it"),
        (
            "ten.txt",
            b"0123456789",
            "the train split has 9 tokens but one window needs data.block_size + 1 = 17; add text",
        ),
        (
            "records.jsonl",
            b'{"body": "hello"}\n' * 20,
            "{path}:1 has no 'text' field (it has: ['body']); set data.jsonl_field",
        ),
    ],
)
def test_unusable_sources_are_one_data_error_before_the_trainer(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        train(compose_cfg(small_run(tmp_path, path)))
    assert str(err.value).startswith(message.format(path=path)), str(err.value)
    assert not (tmp_path / "run").exists()  # no logger, checkpoint or run file was made
    assert not (tmp_path / "cache").exists()  # nor an empty data cache, one more per try


def test_silent_url_is_one_data_error(tmp_path, monkeypatch):
    import mqa_lm.data.sources as sources

    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts connections (kernel backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/input.txt"
        with pytest.raises(DataError, match=f"could not download {url}: .*timed out; check the URL"):
            train(compose_cfg(small_run(tmp_path, url)))  # type: ignore[arg-type]


def test_model_vocab_below_the_tokenizer_is_a_config_error_before_the_trainer(tmp_path, corpus):
    vocab = len(set(CORPUS)) + 2  # the char tokenizer: its characters, <unk> and <|endoftext|>
    with pytest.raises(
        ConfigError,
        match=(
            f"model.vocab_size=10 is smaller than the tokenizer's vocabulary of {vocab} ids; raise model.vocab_size "
            f"to at least {vocab}, or set model.vocab_size=null to take the tokenizer's size"
        ),
    ):
        train(compose_cfg(small_run(tmp_path, corpus, "model.vocab_size=10")))
    assert not (tmp_path / "run").exists()
    # exactly the tokenizer's size is enough
    metrics = train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                f"model.vocab_size={vocab}",
                "callbacks=none",
                "trainer.max_steps=1",
                "trainer.val_check_interval=1",
            )
        )
    )
    assert metrics["val/loss"] > 0


def test_module_refuses_a_tokenizer_larger_than_its_vocabulary(tmp_path, corpus):
    """The Python API (no train.py): the module checks once the datamodule's tokenizer exists."""
    import lightning as L

    from mqa_lm.model import MQAConfig
    from mqa_lm.training import TextDataModule
    from mqa_lm.training.module import MQALitModule

    dm = TextDataModule(str(corpus), tokenizer="char", block_size=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    module = MQALitModule(MQAConfig(vocab_size=10, n_layers=1, d_model=32, heads=4, max_seq_len=16))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        ValueError,
        match=f"model.vocab_size=10 is smaller than the tokenizer's vocabulary of {len(set(CORPUS)) + 2} ids",
    ):
        trainer.fit(module, datamodule=dm)


def test_refused_url_is_one_data_error(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataError, match=f"could not download {url}: .*refused"):
        train(compose_cfg(small_run(tmp_path, url)))  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_train_py_data_error_is_one_line_and_exit_2(tmp_path, corpus):
    """A DataError through the real entry point (a ConfigError's is above; the messages in-process)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = f"data error: data.paths: {empty} is empty; remove it from data.paths"
    small = [o for o in small_run(tmp_path, corpus) if not o.startswith("paths.output_dir")]
    proc = _train_py(tmp_path, *small, f"data.paths=[{empty}]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_last_checkpoint_holds_the_final_weights_when_later_validations_do_not_improve(tmp_path, corpus):
    """mode=max makes the first validation (the highest loss) the best, so no later one saves a top-k
    checkpoint; last.ckpt must still follow the run to its final step (10: no validation there)."""
    train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                "trainer.max_steps=10",
                "trainer.val_check_interval=4",
                "callbacks.model_checkpoint.mode=max",
                "sample.max_new_tokens=0",
            )
        )
    )
    ckpts = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10
    best = [p.name for p in ckpts.glob("step*.ckpt")]
    assert len(best) == 1 and best[0].startswith("step000004-"), best


def _same_checkpoint(a: object, b: object, where: str = "") -> None:
    """Equal checkpoint contents: tensors bit for bit, paths compared relative to their run."""
    if isinstance(a, dict):

        def in_run(key: object) -> object:
            return key.split("/run", 1)[-1] if isinstance(key, str) else key

        assert isinstance(b, dict), where
        a, b = {in_run(k): v for k, v in a.items()}, {in_run(k): v for k, v in b.items()}
        assert a.keys() == b.keys(), where
        for key in a:
            _same_checkpoint(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_checkpoint(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, str) and "/run" in a:
        assert isinstance(b, str) and a.split("/run", 1)[1] == b.split("/run", 1)[1], where
    else:
        assert a == b, where


def test_last_checkpoint_of_an_improving_validation_is_the_best_file_written_once(tmp_path, corpus, monkeypatch):
    """At a validation that saves a top-k checkpoint, last.ckpt is a hard link to that file, not a
    second write; its contents are those of the full write that a file system without hard links gets,
    and it outlives the best file it shared when a better one replaces it."""
    # One validation: the first top-k save of a run, before which last_model_path was still unset.
    common = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.deterministic=true"]
    common += ["sample.max_new_tokens=0", "callbacks.recovery_checkpoint=null"]
    train(compose_cfg(small_run(tmp_path / "linked", corpus, *common)))
    ckpts = tmp_path / "linked" / "run" / "checkpoints"
    best = sorted(ckpts.glob("step*.ckpt"))
    assert [p.name[:10] for p in best] == ["step000004"], best
    assert os.path.samefile(ckpts / "last.ckpt", best[0])
    assert not list(ckpts.glob(".*.tmp"))

    def no_hard_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported", dst)

    monkeypatch.setattr(os, "link", no_hard_links)
    train(compose_cfg(small_run(tmp_path / "written", corpus, *common)))
    monkeypatch.undo()
    written = tmp_path / "written" / "run" / "checkpoints"
    assert not os.path.samefile(written / "last.ckpt", next(written.glob("step*.ckpt")))
    linked = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    full = torch.load(written / "last.ckpt", map_location="cpu", weights_only=True)
    _same_checkpoint(linked, full)
    (state,) = [v for k, v in linked["callbacks"].items() if k.startswith("LastAndBestCheckpoint")]
    assert state["last_model_path"] == str(ckpts / "last.ckpt")

    # Continued to step 12 from last.ckpt: the validations at 8 and 12 improve, so the step-4 and
    # step-8 files go, and last.ckpt follows the new best under its own name (no last-v1.ckpt).
    resumed = [o for o in small_run(tmp_path / "linked", corpus, *common) if not o.startswith("trainer.max_steps")]
    train(compose_cfg([*resumed, "trainer.max_steps=12", f"ckpt_path={ckpts / 'last.ckpt'}"]))
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[0] == "last.ckpt" and len(names) == 2 and names[1].startswith("step000012"), names
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 12


class InPlaceCheckpointIO(TorchCheckpointIO):
    """A user's checkpoint writer that rewrites a file in place (``torch.save`` to the path). Lightning's
    own does too where fsspec's temp dir is on another file system than the checkpoints (it copies)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)


def test_a_checkpoint_writer_that_writes_in_place_gets_no_hard_link(tmp_path, corpus):
    """A hard-linked last.ckpt would carry such a writer's next full write into the best checkpoint:
    here the best stays step 4's."""
    writer = "{_target_:test_training.InPlaceCheckpointIO}"
    train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                "trainer.max_steps=8",
                "trainer.val_check_interval=4",
                "callbacks.model_checkpoint.mode=max",  # step 4's validation stays the best
                "callbacks.recovery_checkpoint=null",
                "sample.max_new_tokens=0",
                f"+trainer.plugins=[{writer}]",
            )
        )
    )
    ckpts = tmp_path / "run" / "checkpoints"
    (best,) = ckpts.glob("step*.ckpt")
    assert not os.path.samefile(best, ckpts / "last.ckpt")
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 4
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8


class MoveDataAway:
    """A callback that moves the prepared data directory away once the datamodule is set up, as a user
    tidying the cache while a run lives would (Lightning sets the datamodule up before callbacks)."""

    def __new__(cls, destination: str):
        import lightning as L

        class _Move(L.Callback):
            def setup(self, trainer, pl_module, stage):
                os.rename(trainer.datamodule._dir, destination)

        return _Move()


def test_a_run_keeps_reading_its_data_after_the_prepared_directory_moves(tmp_path, corpus):
    moved = tmp_path / "moved-away"
    metrics = train(
        compose_cfg(
            small_run(
                tmp_path,
                corpus,
                "callbacks=none",
                "+callbacks.move._target_=test_training.MoveDataAway",
                f"+callbacks.move.destination={moved}",
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "sample.max_new_tokens=0",
            )
        )
    )
    assert moved.is_dir() and not list((tmp_path / "cache").glob("*/train.bin"))
    assert metrics["val/loss"] > 0  # two validations read val.bin from the moved directory
