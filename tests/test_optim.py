"""optim=muon and optim=adamw: the updates against float64 references written from the algorithms'
definitions, the parameter split, the shared schedule, the one-optimizer state round trip, and config
errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import compose_cfg

from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.optim import (
    MUON_SHARDED_ERROR,
    Muon,
    MuonAdamW,
    MuonConfig,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_at,
    split_parameters,
)
from mqa_lm.training.config import ConfigError, validate_config

# The quintic Newton-Schulz coefficients of Jordan et al.'s Muon (the values torch.optim.Muon uses).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def tiny_model(**fields) -> MQATransformer:
    torch.manual_seed(0)
    return MQATransformer(
        MQAConfig(**{"vocab_size": 40, "max_seq_len": 8, "n_layers": 2, "d_model": 16, "heads": 4, **fields})
    )


def newton_schulz_reference(update: torch.Tensor, steps: int) -> torch.Tensor:
    """float64: X0 = M / ||M||_F (on the wide orientation), X <- aX + (bXX^T + c(XX^T)^2) X."""
    a, b, c = NS_COEFFICIENTS
    x = update.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_reference(
    param: torch.Tensor, grads: list[torch.Tensor], cfg: MuonConfig, lr: float, nesterov: bool
) -> torch.Tensor:
    """Muon from its definition, in float64: momentum B <- mu B + G, the Nesterov form G + mu B,
    orthogonalised; decoupled weight decay with the rate, then the step scaled by the shape rule.
    (torch keeps B as an average, (1 - mu) times this sum: the same direction, and the orthogonalised
    update does not depend on the scale.)"""
    p = param.detach().double().clone()
    rows, cols = p.shape
    scale = math.sqrt(max(1.0, rows / cols)) if cfg.muon_adjust_lr == "original" else 0.2 * math.sqrt(max(rows, cols))
    buf = torch.zeros_like(p)
    mu = cfg.muon_momentum
    for g in grads:
        g = g.double()
        buf = mu * buf + g
        direction = g + mu * buf if nesterov else buf
        p = p * (1 - lr * cfg.muon_weight_decay) - lr * scale * newton_schulz_reference(direction, cfg.muon_ns_steps)
    return p


def adamw_reference(
    param: torch.Tensor, grads: list[torch.Tensor], cfg: OptimConfig, weight_decay: float
) -> torch.Tensor:
    """AdamW (Loshchilov & Hutter) in float64, bias-corrected moments, at the peak rate cfg.lr."""
    p = param.detach().double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = cfg.betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p * (1 - cfg.lr * weight_decay) - cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps)
    return p


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def step_with_grads(model: MQATransformer, optimizer: torch.optim.Optimizer, n: int) -> dict[str, list[torch.Tensor]]:
    """``n`` optimizer steps with fixed random gradients; returns each parameter's gradients by name."""
    gen = torch.Generator().manual_seed(1)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in model.named_parameters()}
    for _ in range(n):
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            seen[name].append(p.grad.clone())
        optimizer.step()
    return seen


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_matches_a_float64_newton_schulz_reference(adjust, nesterov):
    cfg = MuonConfig(
        muon_lr=0.05, muon_weight_decay=0.3, muon_momentum=0.9, muon_nesterov=nesterov, muon_adjust_lr=adjust
    )
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg)
    grads = step_with_grads(model, optimizer, 3)
    params = dict(model.named_parameters())
    # Wqkv is tall (16 + 2*4 rows, 16 columns), up_proj taller (64 x 16), down_proj wide (16 x 64).
    for name in ("blocks.0.attn.Wqkv.weight", "blocks.1.mlp.up_proj.weight", "blocks.0.mlp.down_proj.weight"):
        expected = muon_reference(before[name], grads[name], cfg, cfg.muon_lr, nesterov)
        moved = params[name].detach().double() - before[name].double()
        # torch runs the iteration in bfloat16 (~3 significant digits): compare the updates, not the weights.
        assert relative_error(moved, expected - before[name].double()) < 0.03, name
        # ... which is tight enough to tell the update from a near miss: one Newton-Schulz step less.
        near_miss = muon_reference(
            before[name], grads[name], dataclass_replace(cfg, muon_ns_steps=4), cfg.muon_lr, nesterov
        )
        assert relative_error(moved, near_miss - before[name].double()) > 0.1, name


def dataclass_replace(cfg: MuonConfig, **changes) -> MuonConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_adamw_part_of_muon_matches_a_float64_adamw_reference():
    """Under optim=muon the embedding (tied LM head) and the norm gains and biases follow AdamW with
    optim.lr and optim.weight_decay (none on gains and biases)."""
    cfg = MuonConfig(lr=3e-3, weight_decay=0.2, betas=[0.8, 0.9])
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = step_with_grads(model, build_optimizer(model, cfg), 3)
    params = dict(model.named_parameters())
    for name, decay in (
        ("wte.weight", 0.2),
        ("wpe.weight", 0.2),
        ("blocks.1.norm_2.weight", 0.0),
        ("norm_f.bias", 0.0),
    ):
        expected = adamw_reference(before[name], grads[name], cfg, decay)
        torch.testing.assert_close(params[name].detach().double(), expected, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "fields",
    [{}, {"tie_embeddings": False}, {"qk_ln": True, "bias": False}, {"mlp_type": "swiglu", "pos_emb": "rope"}],
    ids=["tied", "untied", "qk_ln-no-bias", "swiglu-rope"],
)
def test_every_parameter_is_in_exactly_one_group_and_muon_takes_the_block_matrices(fields):
    model = tiny_model(**fields)
    optimizer = build_optimizer(model, MuonConfig())
    assert isinstance(optimizer, MuonAdamW)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}  # a tied weight is one parameter
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    linears = sorted(
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")
    )
    assert by_group["muon"] == linears
    expected_decay = ["wte.weight"] + (["lm_head.weight"] if fields.get("tie_embeddings") is False else [])
    expected_decay += ["wpe.weight"] if fields.get("pos_emb") != "rope" else []
    assert by_group["adamw_decay"] == sorted(expected_decay)
    assert all(dict(model.named_parameters())[n].dim() == 1 for n in by_group["adamw_no_decay"])
    assert optimizer.muon.param_groups[0]["params"] == optimizer.param_groups[0]["params"]
    # optim=adamw: the same split without Muon.
    adamw = build_optimizer(model, OptimConfig())
    assert [g["name"] for g in adamw.param_groups] == ["decay", "no_decay"]
    plain = split_parameters(model)
    assert not plain["muon"] and len(plain["decay"]) == len(by_group["muon"]) + len(expected_decay)


def test_one_schedule_scales_every_group():
    cfg = MuonConfig(lr=2e-3, min_lr=2e-4, muon_lr=0.04, warmup_steps=3)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, decay_steps=10)
    for step in range(12):
        factor = lr_at(step, cfg, 10) / cfg.lr
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["muon"] == pytest.approx(0.04 * factor)
        assert lrs["adamw_decay"] == pytest.approx(2e-3 * factor) and lrs["adamw_no_decay"] == lrs["adamw_decay"]
        # The inner optimizers step with those same rates.
        assert optimizer.muon.param_groups[0]["lr"] == lrs["muon"]
        assert optimizer.adamw.param_groups[0]["lr"] == lrs["adamw_decay"]
        step_with_grads(model, optimizer, 1)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04 * 0.1)  # min_lr / lr of muon_lr


def test_state_dict_round_trips_exactly_through_a_weights_only_checkpoint():
    """Saved after 3 steps and loaded into a fresh model and optimizer, 2 more steps land on the same
    bits as 5 uninterrupted ones."""
    cfg = MuonConfig(muon_weight_decay=0.1)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))

    def train_steps(model, optimizer, scheduler, n):
        for _ in range(n):
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()
            scheduler.step()

    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, decay_steps=20)
    train_steps(model, optimizer, scheduler, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}, buffer)
    saved_momentum = copy.deepcopy(optimizer.muon.state[model.blocks[0].attn.Wqkv.weight]["momentum_buffer"])
    train_steps(model, optimizer, scheduler, 2)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = tiny_model()
    resumed.load_state_dict(ckpt["model"])
    optimizer2 = build_optimizer(resumed, cfg)
    scheduler2 = build_scheduler(optimizer2, cfg, decay_steps=20)
    optimizer2.load_state_dict(ckpt["optim"])
    scheduler2.load_state_dict(ckpt["sched"])
    # The inner optimizers step on the loaded groups and state, not on the ones they were built with.
    assert optimizer2.muon.param_groups[0] is optimizer2.param_groups[0]
    assert optimizer2.adamw.param_groups[-1] is optimizer2.param_groups[-1]
    assert optimizer2.muon.state is optimizer2.state and optimizer2.adamw.state is optimizer2.state
    assert torch.equal(optimizer2.state[resumed.blocks[0].attn.Wqkv.weight]["momentum_buffer"], saved_momentum)
    train_steps(resumed, optimizer2, scheduler2, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_optim_name_picks_the_config_class_and_bad_values_name_the_key():
    assert type(OptimConfig.from_dict({})) is OptimConfig  # checkpoints from before optim.name existed
    assert type(OptimConfig.from_dict({"name": "muon", "muon_lr": 0.1})) is MuonConfig
    with pytest.raises(ValueError, match="unknown optim.name 'sgd'; valid choices are: adamw, muon"):
        OptimConfig.from_dict({"name": "sgd"})
    with pytest.raises(ValueError, match=r"unknown optim keys \['muon_lr'\]"):
        OptimConfig.from_dict({"muon_lr": 0.1})  # a Muon setting under optim=adamw
    with pytest.raises(ValueError, match="optim.name='adamw' does not match MuonConfig"):
        MuonConfig(name="adamw")


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.muon_lr=0", "optim.muon_lr must be > 0, got 0"),
        ("optim.muon_weight_decay=-1", "optim.muon_weight_decay must be >= 0, got -1"),
        ("optim.muon_momentum=1.0", "optim.muon_momentum must be in [0, 1), got 1.0"),
        ("optim.muon_ns_steps=0", "optim.muon_ns_steps must be an integer in [1, 99], got 0"),
        ("optim.muon_adjust_lr=spectral", "unknown optim.muon_adjust_lr 'spectral'; valid choices are: original,"),
        ("optim.muon_nesterov=maybe", "optim.muon_nesterov must be true or false, got 'maybe'"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("optim.fused=2", "optim.fused must be true, false or null, got 2"),
        ("+trainer.strategy=fsdp", MUON_SHARDED_ERROR),  # Lightning's FSDPStrategy (FSDP1); trainer=fsdp is FSDP2
    ],
)
def test_bad_muon_values_are_one_config_error_naming_the_key(tmp_path, override, message):
    cfg = compose_cfg([f"paths.output_dir={tmp_path}", "optim=muon", override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_muon_takes_an_fsdp2_sharded_model_and_steps_it_like_the_whole_one(monkeypatch, tmp_path):
    """Blocks sharded by FSDP2 (DTensor parameters; one gloo rank on the CPU): build_optimizer accepts
    them, and two steps land where the unsharded model's do. (trainer=fsdp shards this way; Lightning's
    own FSDPStrategy is FSDP1, flat shards: refused by the config check above, and by split_parameters
    for wrapped modules.)"""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))

    def two_steps(model):
        optimizer = build_optimizer(model, MuonConfig(muon_weight_decay=0.1))
        for _ in range(2):
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()

    whole = tiny_model()
    two_steps(whole)
    # A file rendezvous, and no MASTER_* left in the environment for later tests' DDP children.
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        mesh = init_device_mesh("cpu", (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        two_steps(model)
        for (name, a), b in zip(model.named_parameters(), whole.parameters()):
            a = a.full_tensor() if hasattr(a, "full_tensor") else a
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_muon_run_logs_every_group_rate_and_steps_once_per_accumulated_batch(tmp_path):
    """train() with optim=muon, two micro-batches per step: the learning-rate monitor logs the three
    named groups on the one schedule, and each optimizer step ran once per accumulated pair."""
    import csv

    from helpers import CORPUS, tiny_run

    from mqa_lm.training.run import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    run = tmp_path / "run"
    train(
        compose_cfg(
            [
                "optim=muon",
                "optim.lr=2e-3",
                "optim.min_lr=2e-4",
                "optim.muon_lr=0.03",
                "optim.warmup_steps=2",
                "data=text",
                f"data.paths=[{corpus}]",
                *tiny_run(tmp_path / "cache"),
                "trainer.max_steps=6",
                "trainer.accumulate_grad_batches=2",
                "trainer.val_check_interval=12",
                "trainer.log_every_n_steps=1",
                "callbacks=[lr_monitor,model_checkpoint]",
                "logger=csv",
                f"paths.output_dir={run}",
                "sample.max_new_tokens=0",
            ]
        )
    )
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-MuonAdamW/muon")]
    cfg = MuonConfig(lr=2e-3, min_lr=2e-4, muon_lr=0.03, warmup_steps=2)
    # Lightning's monitor logs at every micro-batch: each step twice here, with that step's rates.
    assert [int(r["step"]) for r in rows] == [step for step in range(6) for _ in range(2)]
    for r in rows:
        factor = lr_at(int(r["step"]), cfg, 6) / cfg.lr
        assert float(r["lr-MuonAdamW/muon"]) == pytest.approx(0.03 * factor)
        assert float(r["lr-MuonAdamW/adamw_decay"]) == pytest.approx(2e-3 * factor)
        assert float(r["lr-MuonAdamW/adamw_no_decay"]) == pytest.approx(2e-3 * factor)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["optim"]["name"] == "muon"
    state = ckpt["optimizer_states"][0]
    assert [g["name"] for g in state["param_groups"]] == ["muon", "adamw_decay", "adamw_no_decay"]
    adamw_ids = [i for g in state["param_groups"][1:] for i in g["params"]]
    assert all(float(state["state"][i]["step"]) == 6 for i in adamw_ids)  # AdamW stepped 6 times, not 12
    assert all("momentum_buffer" in state["state"][i] for i in state["param_groups"][0]["params"])


def test_train_py_bad_muon_value_is_one_config_error_line(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, repo_env

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "optim=muon",
        "optim.muon_momentum=1.5",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["config error: optim.muon_momentum must be in [0, 1), got 1.5"]


def muon_problem(seed: int = 0, steps: int = 3) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    """Tall, wide and square matrices, several of one shape (so they batch), and a tall shape whose
    transpose is one of the wide ones (each with its own rate and layout); ``steps`` gradients for each."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 16)] * 5 + [(16, 40)] * 3 + [(40, 16)] * 2 + [(8, 8)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(steps)]
    return params, grads


def run_muon(optimizer: torch.optim.Optimizer, params, grads) -> list[torch.Tensor]:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


MUON_ARGS = dict(lr=0.05, weight_decay=0.1, momentum=0.9)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_matches_torch_optim_muon_matrix_by_matrix(adjust, nesterov):
    params, grads = muon_problem()
    start = [p.detach().clone() for p in params]
    ours = run_muon(Muon(params, nesterov=nesterov, adjust_lr_fn=adjust, **MUON_ARGS), params, grads)
    theirs_params = [torch.nn.Parameter(s.clone()) for s in start]
    theirs = run_muon(
        torch.optim.Muon(theirs_params, nesterov=nesterov, adjust_lr_fn=adjust, **MUON_ARGS), theirs_params, grads
    )
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # On the CPU the batched products (a tall batch's read transposed) are torch's own sums.
        assert torch.equal(a, b), (i, tuple(a.shape))


def test_symmetric_row_blocks_compute_the_same_products_on_the_cpu():
    """The row-block form is the same sums as the whole products: on the CPU, equal bit for bit."""
    from mqa_lm.optim.muon import newton_schulz

    updates = torch.randn(3, 64, 160, generator=torch.Generator().manual_seed(1))
    plain = newton_schulz(updates, 5, splits=1)
    for splits in (2, 4):
        assert torch.equal(newton_schulz(updates, 5, splits=splits), plain), splits
        assert torch.equal(newton_schulz(updates.mT, 5, splits=splits), plain.mT), splits


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_symmetric_row_blocks_on_the_gpu_are_as_close_to_float64_as_the_whole_products():
    from mqa_lm.optim.muon import newton_schulz, symmetric_splits

    gen = torch.Generator(device="cuda").manual_seed(0)
    for count, m, n in [(3, 1024, 4096), (2, 2048, 8192)]:
        updates = torch.randn(count, m, n, device="cuda", generator=gen)
        assert symmetric_splits(m, n, updates.device) > 1, (m, n)
        plain, blocked = newton_schulz(updates, 5, splits=1), newton_schulz(updates, 5)
        for i in range(count):
            exact = newton_schulz_reference(updates[i], 5)
            err_plain, err_blocked = relative_error(plain[i], exact), relative_error(blocked[i], exact)
            assert err_blocked <= 1.25 * err_plain + 1e-4, (m, n, i, err_blocked, err_plain)


@requires_cuda
def test_muon_on_the_gpu_matches_torch_optim_muon_with_row_blocks():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1024, 4096)] * 2 + [(4096, 1024)] + [(2048, 2048)] * 2 + [(256, 2048)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(3)]
    start = [p.detach().clone() for p in params]
    ours = run_muon(Muon(params, **MUON_ARGS), params, grads)
    theirs_params = [torch.nn.Parameter(s.clone()) for s in start]
    theirs = run_muon(torch.optim.Muon(theirs_params, **MUON_ARGS), theirs_params, grads)
    for i, (a, b, s) in enumerate(zip(ours, theirs, start)):
        assert relative_error(a - s, (b - s).double()) < 1e-2, (i, tuple(s.shape))


def test_a_muon_state_saved_by_torch_optim_muon_resumes_in_ours():
    """Checkpoints written while optim=muon ran torch.optim.Muon inside MuonAdamW: the same group keys
    and state, so they load, and the continued run follows torch's own continuation."""
    cfg = MuonConfig(muon_weight_decay=0.1)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))

    def steps(model, optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()

    def torch_muon_adamw(model):
        ours = build_optimizer(model, cfg)
        group = {k: v for k, v in ours.muon.param_groups[0].items() if k != "params"}
        lr, wd = group.pop("lr"), group.pop("weight_decay")
        old = torch.optim.Muon(
            ours.muon.param_groups[0]["params"],
            lr=lr,
            weight_decay=wd,
            **{k: v for k, v in group.items() if k != "name"},
        )
        old.param_groups[0]["name"] = "muon"
        return MuonAdamW(old, ours.adamw)

    model = tiny_model()
    old = torch_muon_adamw(model)
    steps(model, old, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": old.state_dict()}, buffer)
    steps(model, old, 2)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = tiny_model()
    resumed.load_state_dict(ckpt["model"])
    new = build_optimizer(resumed, cfg)
    assert isinstance(new.muon, Muon)
    assert set(new.state_dict()["param_groups"][0]) == set(ckpt["optim"]["param_groups"][0])
    new.load_state_dict(ckpt["optim"])
    steps(resumed, new, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        # Two steps from the same state; only the bf16 rounding of the orthogonalisation differs.
        assert torch.allclose(a, b, atol=1e-4, rtol=0), name


def _shared_muon_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    import mqa_lm.optim.muon as muon_module

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sizes: list[int] = []
    orthogonalise = muon_module.newton_schulz

    def counted(updates, *args, **kwargs):
        sizes.append(updates.shape[0])
        return orthogonalise(updates, *args, **kwargs)

    muon_module.newton_schulz = counted  # our function, counted to show who did which matrix
    params, grads = muon_problem()
    final = run_muon(Muon(params, **MUON_ARGS), params, grads)
    torch.save({"params": final, "sizes": sizes}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_muon_across_two_gloo_ranks_shares_the_work_and_equals_one_process(tmp_path):
    params, grads = muon_problem()
    alone = run_muon(Muon(params, **MUON_ARGS), params, grads)
    torch.multiprocessing.spawn(_shared_muon_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        for a, b in zip(rank["params"], alone):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # 11 matrices a step in three batches (5 of 16 x 24, 3 + 2 of 16 x 40 with the tall ones
    # transposed, 1 of 8 x 8), dealt round robin across the batches: 6 to rank 0, 5 to rank 1.
    per_step = [sum(r["sizes"]) / len(grads) for r in ranks]
    assert per_step == [6, 5]


def _fsdp2_muon_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # gloo ranks on CPU, also where a GPU is visible
    model = fsdp2_problem_model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = Muon(model.parameters(), **MUON_ARGS)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # the same batch on both ranks: the averaged gradient is the one-process one
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    whole = [p.full_tensor() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save({"params": whole, "momentum": momentum}, f"{out}/fsdp2.pt")
    dist.destroy_process_group()


def fsdp2_problem_model() -> torch.nn.Sequential:
    """Linear layers whose rows split unevenly over 2 ranks (5, 40 and 3 rows), tall and wide."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 5, bias=False),
        torch.nn.Linear(5, 40, bias=False),
        torch.nn.Linear(40, 16, bias=False),
        torch.nn.Linear(16, 3, bias=False),
    )


def test_muon_on_fsdp2_shards_across_two_gloo_ranks_equals_one_process(tmp_path):
    model = fsdp2_problem_model()
    optimizer = Muon(model.parameters(), **MUON_ARGS)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    torch.multiprocessing.spawn(_fsdp2_muon_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp2.pt", weights_only=True)
    for a, p in zip(sharded["params"], model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-6)
    for a, p in zip(sharded["momentum"], model.parameters()):
        torch.testing.assert_close(a, optimizer.state[p]["momentum_buffer"], rtol=0, atol=1e-7)
