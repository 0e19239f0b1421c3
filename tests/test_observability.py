"""Seeing inside a run: attention maps and statistics, W&B (offline), TensorBoard images, samples,
throughput and the gradient norm, checked in the files a real ``python train.py`` run leaves."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CORPUS, ROOT
from model_helpers import attention_weights
from PIL import Image

from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.training.callbacks import (
    AttentionMapLogger,
    TokenThroughputMonitor,
    attention_stats,
    render_heatmap,
    scrub_secrets,
    to_uint8,
)
from mqa_lm.training.callbacks.heatmap import BACKGROUND
from mqa_lm.training.callbacks.throughput import PEAK_FLOPS, chip_key, compute_dtype
from mqa_lm.training.callbacks.tracking import RUN_ID_FILE, RunWandbLogger, resolve_mode

FAKE_KEY = "fake0wandb0key0" + "d3adbeef" * 4  # 40 characters, like a real W&B key
LAYERS, HEADS = 2, 4


# ---- statistics vs independent float64 math ------------------------------------------------------


def test_attention_stats_match_float64_math():
    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, 3, 7
    logits = torch.randn(b, h, t, t, generator=gen, dtype=torch.float64) * 3
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    weights = logits.masked_fill(~causal, float("-inf")).softmax(-1).float()
    max_logit = torch.randn(b, h, generator=gen)
    stats = attention_stats(weights, max_logit)

    p = weights.double().numpy()
    for head in range(h):
        entropies, sinks = [], []
        for batch in range(b):
            for q in range(1, t):  # the first query has no choice and is left out
                row = p[batch, head, q, : q + 1]
                entropies.append(-sum(x * math.log(x) for x in row if x > 0))
                sinks.append(row[0])
        assert stats["entropy"][head].item() == pytest.approx(np.mean(entropies), rel=1e-6)
        assert stats["sink"][head].item() == pytest.approx(np.mean(sinks), rel=1e-6)
        assert stats["max_logit"][head].item() == pytest.approx(max_logit[:, head].max().item())
    # Uniform attention over i + 1 keys has entropy log(i + 1) and sink share 1 / (i + 1).
    uniform = causal.double() / causal.double().sum(-1, keepdim=True)
    u = attention_stats(uniform[None, None].float(), torch.zeros(1, 1))
    assert u["entropy"].item() == pytest.approx(np.mean([math.log(i + 1) for i in range(1, t)]), rel=1e-6)
    assert u["sink"].item() == pytest.approx(np.mean([1 / (i + 1) for i in range(1, t)]), rel=1e-6)


@pytest.mark.parametrize("kv_heads,clip_qkv,pos_emb", [(1, None, "learned"), (2, 0.3, "alibi")])
def test_probe_max_logit_matches_scores_recomputed_from_the_qkv_projection(kv_heads, clip_qkv, pos_emb):
    config = MQAConfig(
        vocab_size=50,
        max_seq_len=12,
        n_layers=2,
        d_model=32,
        heads=4,
        kv_heads=kv_heads,
        clip_qkv=clip_qkv,
        pos_emb=pos_emb,
        init_std=0.3,
        attn_impl="torch",
    )
    torch.manual_seed(0)
    model = MQATransformer(config).eval()
    captured = []
    hooks = [
        blk.attn.Wqkv.register_forward_hook(lambda m, i, o: captured.append(o.detach().double()))
        for blk in model.blocks
    ]
    idx = torch.randint(0, 50, (2, 10))
    logits_before, _ = model(idx)
    weights, max_logits = model.attention_probe(idx)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(torch.stack(weights), torch.stack(attention_weights(model, idx)))
    hd, t = config.head_dim, idx.shape[1]
    for qkv, got in zip(captured, max_logits):
        if clip_qkv is not None:
            qkv = qkv.clamp(-clip_qkv, clip_qkv)
        q = qkv[..., : config.d_model].reshape(2, t, config.heads, hd)
        k = qkv[..., config.d_model : config.d_model + kv_heads * hd].reshape(2, t, kv_heads, hd)
        want = torch.empty(2, config.heads, dtype=torch.float64)
        for head in range(config.heads):
            kh = head // (config.heads // kv_heads)
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kh]) / math.sqrt(hd)
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
            want[:, head] = scores.flatten(1).max(dim=1).values
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
    # The probe leaves nothing behind that changes later forwards.
    assert torch.equal(model(idx)[0], logits_before)


# ---- pictures -----------------------------------------------------------------------------------


def _cells(image: Image.Image, left: int, top: int, cell: int, rows: int, cols: int) -> np.ndarray:
    """The colour at the centre of every cell, [rows, cols, 3]."""
    pixels = np.asarray(image.convert("RGB"))
    ys = top + np.arange(rows) * cell + cell // 2
    xs = left + np.arange(cols) * cell + cell // 2
    return pixels[ys][:, xs]


def test_heatmap_has_contrast_and_an_empty_causal_triangle():
    t = 48
    causal = np.tril(np.ones((t, t), dtype=bool))
    uniform = torch.from_numpy(causal / causal.sum(-1, keepdims=True)).float()  # rows sum to 1
    levels = to_uint8(uniform, gamma=0.5)
    want = np.rint(255 * np.sqrt(uniform.numpy() / uniform.numpy().max()))
    assert np.abs(levels.astype(int) - want).max() <= 1
    assert levels[-1, :t].min() >= 30  # the longest row (p = 1/48) is still visibly lit

    tokens = [chr(ord("a") + i % 26) for i in range(t)]
    image, layout = render_heatmap(uniform, causal, tokens, title="layer 0 head 0")
    cells = _cells(image, layout.left, layout.top, layout.cell, t, t)
    is_background = (cells == np.array(BACKGROUND)).all(-1)
    assert is_background[~causal].all()
    assert not is_background[causal].any()
    # Brighter cells for larger weights: row 1 (p = 1/2) differs from row 40 (p = 1/41).
    assert not np.array_equal(cells[1, 0], cells[40, 0])
    with pytest.raises(ValueError, match="token labels"):
        render_heatmap(uniform, causal, tokens[:-1])


# ---- small pieces -------------------------------------------------------------------------------


def test_peak_flops_table_and_dtypes():
    assert PEAK_FLOPS[chip_key("NVIDIA H100 80GB HBM3")]["bf16"] == 989e12
    assert PEAK_FLOPS[chip_key("NVIDIA H200")]["bf16"] == 989e12
    assert chip_key("NVIDIA H100 PCIe") == "h100 pcie" and chip_key("NVIDIA L40S") == "l40s"
    assert chip_key("NVIDIA L4") == "l4" and chip_key("Some CPU") is None
    assert compute_dtype("bf16-mixed") == "bf16" and compute_dtype("16-mixed") == "fp16"


def test_secrets_are_scrubbed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    config = {"a": {"url": f"https://x/?k={FAKE_KEY}", "list": [FAKE_KEY, 3]}, "api_key": "abc", "lr": 0.1}
    clean = scrub_secrets(config)
    assert FAKE_KEY not in json.dumps(clean)
    assert clean["api_key"] == "<redacted>" and clean["lr"] == 0.1 and clean["a"]["list"][1] == 3


def test_wandb_mode_is_offline_without_credentials_or_network(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None)[0] is None  # W&B reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password secret\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # credentials, but nothing listens
    mode, why = resolve_mode(None)
    assert mode == "offline" and "not reachable" in why
    assert resolve_mode("online")[0] == "online"
    with pytest.raises(ValueError, match="logger.wandb.mode must be online, offline, disabled"):
        resolve_mode("cloud")


def test_bad_callback_arguments_name_the_key():
    with pytest.raises(ValueError, match="callbacks.attention_maps.every_n_steps must be an integer >= 1, got 0"):
        AttentionMapLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="callbacks.attention_maps.gamma"):
        AttentionMapLogger(gamma=2.0)
    with pytest.raises(ValueError, match="callbacks.throughput.window_size must be an integer >= 2"):
        TokenThroughputMonitor(window_size=1)
    with pytest.raises(ValueError, match="callbacks.throughput.peak_flops"):
        TokenThroughputMonitor(peak_flops=-1.0)
    with pytest.raises(ValueError, match="logger.wandb.log_model must be true, false or all, got 'best'"):
        RunWandbLogger(save_dir=".", mode="disabled", log_model="best")


# ---- one real run ---------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    (crc32, length, type) carry protobuf ``Record`` messages, split FIRST/MIDDLE/LAST when long."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_train(tmp: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    args = [
        "data=text",
        f"data.paths=[{tmp / 'corpus.txt'}]",
        "data.tokenizer=char",
        "data.block_size=16",
        "data.batch_size=4",
        "data.val_batches=2",
        f"data.cache_dir={tmp / 'cache'}",
        "model.max_seq_len=16",
        f"model.n_layers={LAYERS}",
        "model.d_model=32",
        f"model.heads={HEADS}",
        "trainer=cpu",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "trainer.enable_model_summary=false",
        "callbacks.attention_maps.every_n_steps=6",
        "callbacks.throughput.window_size=2",
        "logger=many",
        "task_name=obs_test",
        "sample.max_new_tokens=8",
        f"paths.output_dir={tmp / 'run'}",
        f"hydra.run.dir={tmp / 'run'}",
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    (tmp / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_API_KEY=FAKE_KEY,
        WANDB_DIR=str(tmp / "wandb_dir"),
        WANDB_CONFIG_DIR=str(tmp / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp / "wandb_data"),
        PROJECT_ROOT=str(ROOT),
        NETRC=str(tmp / "no_netrc"),
    )
    first = run_train(tmp, env, "trainer.max_steps=12", "logger.wandb.log_model=true")
    run_dir = tmp / "run"
    (wandb_run,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    second = run_train(tmp, env, "trainer.max_steps=16", f"ckpt_path={ckpt}", "logger.wandb.log_model=true")
    return {"tmp": tmp, "run": run_dir, "wandb": wandb_run, "out": [first, second]}


def test_wandb_offline_run_holds_images_stats_samples_and_config(offline_run):
    wandb_run = offline_run["wandb"]
    pngs = sorted((wandb_run / "files" / "media" / "images").rglob("*.png"))
    assert {p.name.split("_")[1] for p in pngs} == {f"{layer:02d}" for layer in range(LAYERS)}
    for png in pngs:
        assert np.asarray(Image.open(png).convert("RGB")).astype(float).var() > 0

    (wandb_file,) = wandb_run.glob("run-*.wandb")
    records = read_wandb_records(wandb_file)
    history: dict[str, list] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    for name in ("entropy", "max_logit", "sink"):
        for layer in range(LAYERS):
            for head in range(HEADS):
                values = history[f"attention/{name}/l{layer:02d}h{head:02d}"]
                assert len(values) == 2 and all(math.isfinite(v) for v in values)  # steps 6 and 12
    assert all(0 < v <= math.log(16) for v in history["attention/entropy/l00h00"])
    assert all(0 < v < 1 for v in history["attention/sink/l01h03"])
    assert history["throughput/tokens_per_sec"] and min(history["throughput/tokens_per_sec"]) > 0
    assert "table-file" in history["samples/_type"]
    assert history["attention/log_seconds"]

    config: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
    assert config["config"]["model"]["n_layers"] == LAYERS and config["config"]["task_name"] == "obs_test"
    assert config["num_params"] > 0 and len(config["git_commit"]) >= 40

    tables = sorted((wandb_run / "files" / "media" / "table").glob("samples_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "continuation"]
    assert len(table["data"]) == 2 and all(row[1] and row[2] for row in table["data"])


def test_offline_run_keeps_the_best_checkpoint_and_the_export_as_artifacts(offline_run):
    from mqa_lm.pretrained.directory import load_pretrained

    wandb_run, run_id = offline_run["wandb"], (offline_run["run"] / RUN_ID_FILE).read_text().strip()
    (wandb_file,) = wandb_run.glob("run-*.wandb")
    records = read_wandb_records(wandb_file)
    artifacts = {
        r.artifact.name: r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    }
    assert set(artifacts) == {f"model-{run_id}", f"pretrained-{run_id}"}
    staged: dict[str, dict[str, Path]] = {}
    for name, artifact in artifacts.items():
        assert "best" in artifact.aliases
        staged[name] = {}
        for entry in artifact.manifest.contents:
            local = Path(entry.local_path)
            # Kept in the offline run directory itself, byte for byte what the manifest promises.
            assert local.is_relative_to(wandb_run / "artifacts" / name)
            assert base64.b64encode(hashlib.md5(local.read_bytes()).digest()).decode() == entry.digest
            assert entry.size == local.stat().st_size
            staged[name][entry.path] = local
    assert set(staged[f"pretrained-{run_id}"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    assert set(staged[f"model-{run_id}"]) == {"model.ckpt"}

    # The export is the best checkpoint's model: same weights, and it loads on its own.
    model, tokenizer = load_pretrained(staged[f"pretrained-{run_id}"]["model.safetensors"].parent)
    checkpoint = torch.load(staged[f"model-{run_id}"]["model.ckpt"], map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    exported = model.state_dict()
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert tokenizer is not None and tokenizer.get_vocab_size() > 0

    val_losses = [
        json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if (item.key or "/".join(item.nested_key)) == "val/loss"
    ]
    metadata = json.loads(artifacts[f"model-{run_id}"].metadata)
    assert len(val_losses) == 2 and metadata["score"] == pytest.approx(min(val_losses))
    assert json.loads(artifacts[f"pretrained-{run_id}"].metadata)["config"]["n_layers"] == LAYERS
    assert f"W&B artifacts: model-{run_id}, pretrained-{run_id}" in offline_run["out"][0].stdout


def test_no_secret_in_any_file_or_output(offline_run):
    tmp = offline_run["tmp"]
    secret = FAKE_KEY.encode()
    checked = 0
    for path in tmp.rglob("*"):
        if path.is_file() and path.name != "corpus.txt":
            assert secret not in path.read_bytes(), f"the API key leaked into {path}"
            checked += 1
    assert (offline_run["run"] / ".hydra" / "config.yaml").is_file() and checked > 20
    for proc in offline_run["out"]:
        assert FAKE_KEY not in proc.stdout + proc.stderr


def test_continued_run_appends_to_the_same_wandb_run(offline_run):
    run_id = (offline_run["run"] / RUN_ID_FILE).read_text().strip()
    runs = sorted((offline_run["run"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    first, second = offline_run["out"]
    assert f"wandb sync {offline_run['wandb']}" in first.stdout


def test_png_heatmaps_show_the_causal_triangle(offline_run):
    for step in (6, 12, 16):  # every 6 optimizer steps, and the end of each run
        folder = offline_run["run"] / "attention" / f"step_{step:06d}"
        names = {p.name for p in folder.glob("*.png")}
        want = {
            f"layer{layer:02d}_{h}.png"
            for layer in range(LAYERS)
            for h in ["mean", *(f"head{i:02d}" for i in range(HEADS))]
        }
        assert names == want
    image = Image.open(offline_run["run"] / "attention" / "step_000012" / "layer01_head02.png")
    left, top, cell, rows, cols = map(int, image.text["grid"].split(","))
    assert rows == cols == 16
    cells = _cells(image, left, top, cell, rows, cols)
    is_background = (cells == np.array(BACKGROUND)).all(-1)
    causal = np.tril(np.ones((rows, cols), dtype=bool))
    assert is_background[~causal].all() and not is_background[causal].any()
    assert np.asarray(image.convert("RGB")).astype(float).var() > 0


def test_tensorboard_events_hold_the_images(offline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(offline_run["run"] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "attention/layer_00/mean_of_heads" in tags and "attention/layer_01/head_3" in tags
    shown = events.Images("attention/layer_01/head_3")
    assert [e.step for e in shown][:2] == [6, 12]
    picture = np.asarray(Image.open(io.BytesIO(shown[0].encoded_image_string)).convert("RGB")).astype(float)
    assert picture.var() > 0


def test_csv_log_has_throughput_grad_norm_and_attention_cost(offline_run):
    with (offline_run["run"] / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))

    def values(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key)]

    for key in ("throughput/tokens_per_sec", "throughput/samples_per_sec", "throughput/tflops_per_sec_per_device"):
        assert values(key) and min(values(key)) > 0, key
    # tokens/s = samples/s * 16 tokens per window, measured over the same interval.
    assert values("throughput/tokens_per_sec")[0] == pytest.approx(16 * values("throughput/samples_per_sec")[0])
    assert "throughput/mfu" not in rows[0]  # no peak FLOPs known on CPU
    assert values("train/grad_norm") and min(values("train/grad_norm")) > 0
    assert values("attention/log_seconds") and values("attention/max_logit/l00h00")
    samples = (offline_run["run"] / "samples.txt").read_text()
    assert "sample 0 (step 6)" in samples and "sample 1 (step 12)" in samples
