"""Scale-out on CPU: trainer=ddp and trainer=fsdp (FSDP2) with 2 gloo processes equal one process on the
same global batch; FSDP2 checkpoints (full and sharded) resume exactly and its export holds the whole
weights; launch checks; the SLURM launcher config renders a valid submitit job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, ROOT, compose_cfg, run_env, run_train_py
from omegaconf import OmegaConf

from mqa_lm.data.datasets import TrainBatches
from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.optim import OptimConfig, build_optimizer, build_scheduler
from mqa_lm.training import TextDataModule

STEPS, MICRO, BLOCK, SEED = 12, 4, 16, 1337
MODEL = dict(n_layers=2, d_model=32, heads=4, max_seq_len=BLOCK)


def run_args(base: Path, run_dir: Path, optim: str = "muon") -> list[str]:
    return [
        f"optim={optim}",
        "data=text",
        f"data.paths=[{base / 'corpus.txt'}]",
        "data.tokenizer=char",
        f"data.block_size={BLOCK}",
        f"data.batch_size={MICRO}",
        "data.val_batches=2",
        f"data.cache_dir={base / 'cache'}",
        *(f"model.{k}={v}" for k, v in MODEL.items()),
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=6",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "optim.warmup_steps=3",
        "callbacks=[model_checkpoint,rng_state,preemption]",
        f"hydra.run.dir={run_dir}",
        "sample.max_new_tokens=0",
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("dist")
    (base / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    return base


def reference_weights(base: Path, ranks: list[int], optim: str) -> dict[str, torch.Tensor]:
    """A plain PyTorch loop: each step averages the loss over the micro-batches that ``ranks`` draw,
    i.e. what DDP's gradient all-reduce over those ranks must compute."""
    dm = TextDataModule(
        paths=[str(base / "corpus.txt")],
        tokenizer="char",
        block_size=BLOCK,
        batch_size=MICRO,
        val_batches=2,
        seed=SEED,
        cache_dir=str(base / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    # The model and optim settings of the run.
    cfg = compose_cfg(run_args(base, base / "unused", optim), return_hydra_config=True)
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(SEED)
    model = MQATransformer(MQAConfig.from_dict({**fields, "vocab_size": dm.vocab_size}))
    optim_cfg = OptimConfig.from_dict(OmegaConf.to_container(cfg.optim, resolve=True))
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, STEPS)
    batches = [TrainBatches(dm._splits["train"], BLOCK, MICRO, SEED, rank) for rank in ranks]
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = [model(*b[step])[1] for b in batches]
        torch.stack(losses).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def distances_to_reference(base: Path, weights: dict[str, torch.Tensor], optim: str) -> tuple[float, float]:
    """(to the one-process loop on both ranks' batches, to the nearer of the loops on one rank's batches
    twice). Had both ranks drawn the same batches, a 2-rank run would equal the second; the second
    distance is asserted large, so the first one's bound means something."""
    both_ranks = max_diff(weights, reference_weights(base, [0, 1], optim))
    wrong = min(
        max_diff(weights, reference_weights(base, [0, 0], optim)),
        max_diff(weights, reference_weights(base, [1, 1], optim)),
    )
    assert wrong > 1e-2
    return both_ranks, wrong


# train.py on 2 gloo ranks on the CPU, in fp32 (so the runs compare with one process closely).
FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]

TWO_RANKS = {"fsdp": FSDP_CPU, "ddp": DDP_CPU}


def train_two_ranks(base: Path, run_dir: Path, strategy: str, optim: str = "muon", *extra: str) -> str:
    """train.py on 2 gloo ranks under trainer=fsdp or ddp, with the model export and a schedule that ends
    at step STEPS whatever max_steps is (so a run stopped halfway resumes onto it); returns its output."""
    args = [a for a in run_args(base, run_dir, optim) if not a.startswith("callbacks=")]
    done = run_train_py(
        *args,
        *TWO_RANKS[strategy],
        "callbacks=[model_checkpoint,pretrained_export,rng_state,preemption]",
        f"optim.decay_steps={STEPS}",
        *extra,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def straight_runs(base) -> dict[tuple[str, str], Path]:
    """Uninterrupted runs of STEPS steps (full checkpoints) by (strategy, optimizer), each run once
    (by :func:`straight`) for the tests that compare against it."""
    return {}


def straight(base: Path, runs: dict[tuple[str, str], Path], strategy: str, optim: str = "muon") -> Path:
    if (strategy, optim) not in runs:
        run_dir = base / f"straight-{strategy}-{optim}"
        out = train_two_ranks(base, run_dir, strategy, optim)
        assert f"global batch: {MICRO} (micro-batch) x 1 (accumulation) x 2 (world size) = {2 * MICRO} sequences" in out
        assert out.count("final metrics:") == 1  # the report (and its sample) come from rank 0 only
        runs[strategy, optim] = run_dir
    return runs[strategy, optim]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_ddp_two_gloo_processes_equal_one_process_on_the_same_global_batch(base, straight_runs, optim):
    both_ranks, wrong = distances_to_reference(base, last_weights(straight(base, straight_runs, "ddp", optim)), optim)
    if optim == "adamw":
        assert both_ranks < 1e-5
    else:
        # Muon orthogonalises each update in bfloat16, where the all-reduce's float32 rounding flips
        # some roundings: 12 steps of the reference with every gradient perturbed by 1e-7 (relative)
        # moved the weights by 2.4e-3 as well (measured; here 2.7e-3 against 4.0e-2 for the wrong batches).
        assert both_ranks < wrong / 5


def test_local_multirun_with_subprocess_ddp_is_refused(base, tmp_path):
    done = run_train_py(
        "-m",
        *run_args(base, tmp_path / "unused"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        timeout=120,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        "a local -m sweep cannot use trainer.strategy=lightning.pytorch.strategies.DDPStrategy on 2 devices"
        in done.stderr
    )
    assert "Use trainer=ddp_spawn for local sweeps" in done.stderr
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))


def test_slurm_launcher_config_renders_a_valid_sbatch_job(tmp_path, monkeypatch):
    import submitit

    cfg = compose_cfg(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=lm",
            "hydra.launcher.constraint=h100",
            "hydra.launcher.timeout_min=120",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.job.name=train",
        ],
        return_hydra_config=True,
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)

    # What hydra-submitit-launcher does with these params, up to the sbatch text (srun faked: none here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base_keys = {
        "timeout_min",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "mem_gb",
        "nodes",
        "name",
        "stderr_to_stdout",
    }
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lm",
        "#SBATCH --constraint=h100",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --time=120",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --job-name=train",
    ):
        assert line in text, f"{line!r} not in:\n{text}"


def test_slurm_launcher_needs_a_device_count(base, tmp_path):
    done = run_train_py(
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=auto",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        timeout=120,
    )
    assert done.returncode != 0
    assert "trainer.devices" in done.stdout + done.stderr


def test_a_run_launched_through_submitit_local_executor_trains(base, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in run_args(base, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    done = run_train_py(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.gpus_per_node=0",
        "trainer=cpu",
        f"hydra.sweep.dir={sweep}",
        *args,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == STEPS


# ---- trainer=fsdp: FSDP2 under Lightning's ModelParallelStrategy ---------------------------------


@pytest.mark.parametrize("reshard,checkpointing,state_dict_type", [(True, False, "full"), (False, True, "sharded")])
def test_fsdp_config_builds_the_fsdp2_strategy(tmp_path, reshard, checkpointing, state_dict_type):
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    from mqa_lm.training.config import validate_config
    from mqa_lm.training.distributed import FSDP2Strategy, shard_options

    cfg = compose_cfg(
        [
            "trainer=fsdp",
            f"paths.output_dir={tmp_path}",
            f"trainer.strategy.reshard_after_forward={reshard}",
            f"trainer.strategy.activation_checkpointing={checkpointing}",
            f"trainer.strategy.state_dict_type={state_dict_type}",
        ],
    )
    assert cfg.trainer.precision == "bf16-mixed"
    assert validate_config(cfg).optim.name == "muon"  # the default optimizer runs under trainer=fsdp
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.shard_kwargs() == {
        "reshard_after_forward": reshard,
        "activation_checkpointing": checkpointing,
        "cpu_offload": False,
    }
    assert strategy._save_distributed_checkpoint is (state_dict_type == "sharded")
    # bf16-mixed: the blocks' weights gathered in bf16 (Lightning's autocast stays on); 32-true: as stored.
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("32-true", None)):
        trainer = L.Trainer(
            accelerator="cpu", devices=1, strategy=instantiate(cfg.trainer.strategy), precision=precision, logger=False
        )
        assert shard_options(trainer) == {**strategy.shard_kwargs(), "param_dtype": dtype}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["+trainer.strategy.sharding_strategy=SHARD_GRAD_OP"],
            "trainer.strategy.sharding_strategy=SHARD_GRAD_OP is an option of FSDP1 (Lightning's FSDPStrategy), but "
            "trainer=fsdp runs FSDP2: use trainer.strategy.reshard_after_forward=true for FULL_SHARD",
        ),
        (["trainer.strategy.state_dict_type=both"], "trainer.strategy.state_dict_type must be 'full' or 'sharded'"),
        (["trainer.strategy.reshard_after_forward=2"], "trainer.strategy.reshard_after_forward must be true or false"),
        (
            ["trainer.strategy.cpu_offload=true", "trainer.accelerator=cpu"],
            "trainer.accelerator=cpu has no GPU; set trainer.strategy.cpu_offload=false",
        ),
        # Lightning's own FSDPStrategy (FSDP1) flattens the matrices Muon needs.
        (["trainer.strategy._target_=lightning.pytorch.strategies.FSDPStrategy"], "use trainer=fsdp (FSDP2"),
        (
            ["trainer.strategy._target_=lightning.pytorch.strategies.ModelParallelStrategy"],
            "mqa-lm's model has no tensor parallelism, so Lightning's ModelParallelStrategy needs "
            "tensor_parallel_size=1",
        ),
    ],
)
def test_fsdp_refuses_fsdp1_options_and_bad_values_before_any_work(tmp_path, overrides, message):
    from mqa_lm.training.config import ConfigError, validate_config
    from mqa_lm.training.distributed import FSDP2Strategy

    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg(["trainer=fsdp", f"paths.output_dir={tmp_path}", *overrides]))
    assert message in str(err.value)
    with pytest.raises(ValueError, match="trainer.strategy.state_dict_type must be 'full' or 'sharded', got 'both'"):
        FSDP2Strategy(state_dict_type="both")  # built in Python, the same check


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # train() silences it (mqa_lm.training.console)
def test_fsdp_shard_model_shards_each_block_once_and_keeps_the_plain_names(monkeypatch, tmp_path):
    """One gloo rank: every block and the root become FSDP2 units (activation checkpointing on), the
    forward and backward equal the unsharded model's, the gathered state has the unsharded keys, and a
    second shard_model is refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from mqa_lm.training.distributed import full_model_state, is_fully_sharded, shard_model

    config = MQAConfig(vocab_size=40, **MODEL)
    idx = torch.randint(0, 40, (2, BLOCK), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    whole = MQATransformer(config)
    loss_whole = whole(idx, idx)[1]
    loss_whole.backward()
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = MQATransformer(config)
        # Lightning's mesh: data parallel x tensor parallel (1).
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        shard_model(model, mesh, activation_checkpointing=True)
        assert is_fully_sharded(model) and all(isinstance(b, FSDPModule) for b in model.blocks)
        loss = model(idx, idx)[1]
        loss.backward()
        torch.testing.assert_close(loss, loss_whole, rtol=0, atol=0)
        for (name, p), q in zip(model.named_parameters(), whole.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=0, atol=1e-7, msg=name)
        state = full_model_state(model)
        assert state is not None and list(state) == list(whole.state_dict())
        for name, tensor in whole.state_dict().items():
            assert torch.equal(state[name], tensor), name
        with pytest.raises(RuntimeError, match="sharded already"):
            shard_model(model, mesh)
    finally:
        dist.destroy_process_group()


def sharded_weights(directory: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (torch.distributed.checkpoint) checkpoint directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(directory, scratch)
    return torch.load(scratch, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_compiled_two_gloo_processes_train_as_the_eager_one_process_reference(base, tmp_path, strategy):
    """The compile order each strategy takes (trainer=fsdp: each block compiled after fully_shard
    wrapped it, compile_scope auto = blocks; trainer=ddp: the whole model, inside Lightning's DDP)
    trains on 2 ranks as the eager one-process loop on both ranks' batches does; compiled under FSDP2,
    a run stopped halfway and resumed ends on the uninterrupted run's weights."""
    run_dir = base / f"compiled-{strategy}"
    out = train_two_ranks(base, run_dir, strategy, "adamw", "module.compile=true")
    assert "compile + first step" in out
    compiled = last_weights(run_dir)
    both_ranks, wrong = distances_to_reference(base, compiled, "adamw")
    # The eager runs' bound: Inductor's float32 kernels changed nothing measurable (measured on this
    # CPU: fsdp 2.3e-6, ddp 1.8e-6, against 1.0e-2 for the wrong batches).
    assert both_ranks < 1e-5, (both_ranks, wrong)
    if strategy == "fsdp":
        resumed_dir = tmp_path / "resumed"
        train_two_ranks(base, resumed_dir, strategy, "adamw", "module.compile=true", f"trainer.max_steps={STEPS // 2}")
        out = train_two_ranks(base, resumed_dir, strategy, "adamw", "module.compile=true")
        assert f"resuming from {resumed_dir / 'checkpoints' / 'last.ckpt'}" in out
        resumed = last_weights(resumed_dir)
        for name in compiled:
            torch.testing.assert_close(resumed[name], compiled[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_two_gloo_processes_equal_one_process_on_the_same_global_batch(base, straight_runs, optim):
    both_ranks, wrong = distances_to_reference(base, last_weights(straight(base, straight_runs, "fsdp", optim)), optim)
    # The DDP test's bounds: FSDP2 reduce-scatters where DDP all-reduces, in float32 both (measured:
    # adamw 2.7e-6; muon 3.5e-3 against 4.0e-2 for the wrong batches, from Muon's bfloat16 iteration).
    if optim == "adamw":
        assert both_ranks < 1e-5
    else:
        assert both_ranks < wrong / 5


def test_fsdp_export_and_full_checkpoint_hold_the_whole_plain_weights(base, straight_runs):
    from mqa_lm.pretrained.directory import load_pretrained

    run_dir = straight(base, straight_runs, "fsdp")
    best = list((run_dir / "checkpoints").glob("step*.ckpt"))
    assert len(best) == 1 and best[0].is_file()
    exported, tokenizer = load_pretrained(run_dir / "model")
    from_best, _ = load_pretrained(best[0])
    assert tokenizer is not None
    for name, tensor in from_best.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    # The full checkpoint holds the plain model's names, so generate.py loads it, and its optimizer state
    # is keyed as the unsharded optimizer's own state_dict() (positions in its groups), as trainer=ddp's is.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    plain_model = MQATransformer(exported.config)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in plain_model.state_dict()}
    optim_cfg = OptimConfig.from_dict(ckpt["hyper_parameters"]["optim"])
    plain_groups = build_optimizer(plain_model, optim_cfg).state_dict()["param_groups"]
    saved = ckpt["optimizer_states"][0]
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in plain_groups]
    params = [p for g in build_optimizer(plain_model, optim_cfg).param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for value in saved["state"][i].values():
            assert value.dim() == 0 or value.shape == p.shape, i
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            "prompt=Fi",
            "max_new_tokens=4",
        ],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Fi")


@pytest.mark.parametrize(
    "first,state_dict_type",
    [("fsdp", "sharded"), ("fsdp", "full"), ("ddp", "full")],
    ids=["sharded", "full", "from-ddp"],
)
def test_fsdp_resumed_run_reaches_the_weights_of_an_uninterrupted_run(
    base, straight_runs, tmp_path, first, state_dict_type
):
    """Stop at STEPS / 2, then the same command under trainer=fsdp (resume=auto) to STEPS: the weights
    of the uninterrupted run of the first half's strategy (activation checkpointing on in the FSDP halves,
    off in the uninterrupted run: it recomputes the same). A full checkpoint of trainer=ddp resumes under
    trainer=fsdp: the optimizer state is keyed as the unsharded optimizer's, in both."""
    reference = last_weights(straight(base, straight_runs, first))
    run_dir = tmp_path / "run"
    extra = [f"trainer.strategy.state_dict_type={state_dict_type}", "trainer.strategy.activation_checkpointing=true"]
    train_two_ranks(
        base, run_dir, first, "muon", *(extra if first == "fsdp" else []), f"trainer.max_steps={STEPS // 2}"
    )
    out = train_two_ranks(base, run_dir, "fsdp", "muon", *extra)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"resuming from {last}" in out
    if state_dict_type == "sharded":
        assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
        assert not list(last.parent.glob(".*")), "a temporary directory of the sharded save was left behind"
        resumed = sharded_weights(last, tmp_path / "last.pt")
    else:
        resumed = last_weights(run_dir)
    assert resumed.keys() == reference.keys()  # plain names, with activation checkpointing's wrapper too
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)
