"""GPU checks of the self-contained run: the FSDP2 export (trainer=fsdp, optim=muon) gathers the full
weights, and a bf16 model exported to transformers agrees with ours on the GPU. Skipped without CUDA
(2 GPUs for FSDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.pretrained.directory import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 40

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP export needs 2 GPUs")
def test_fsdp_run_exports_the_best_weights(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "trainer.enable_progress_bar=false",
        "data=text",
        f"data.paths=[{tmp_path / 'corpus.txt'}]",
        "data.tokenizer=char",
        "data.block_size=16",
        "data.batch_size=4",
        "data.val_batches=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.max_seq_len=16",
        "model.n_layers=2",
        "model.d_model=64",
        "model.heads=4",
        "callbacks=[model_checkpoint,pretrained_export]",
        f"hydra.run.dir={run}",
        "sample.max_new_tokens=0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    best = [p for p in (run / "checkpoints").glob("step*.ckpt")]
    assert len(best) == 1
    exported, tok = load_pretrained(run / "model")
    reference, _ = load_pretrained(best[0])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert tok is not None and (run / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_bf16_transformers_export_agrees_on_the_gpu(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from mqa_lm.pretrained.hf import export_hf

    fields = {"vocab_size": 512, "max_seq_len": 128, "n_layers": 2, "d_model": 256, "heads": 8, "attn_impl": "torch"}
    if family == "llama":
        fields.update(pos_emb="rope", mlp_type="swiglu", norm_type="rmsnorm", kv_heads=2, bias=False)
    torch.manual_seed(0)
    model = MQATransformer(MQAConfig(**fields)).eval()
    out = export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda().eval()
    ours = model.to("cuda", torch.bfloat16)
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    with torch.no_grad():
        a, b = ours(idx)[0].float(), hf(idx).logits.float()
    # bf16 kernels and rounding orders differ (RMSNorm rounds before its gain in transformers).
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.95


def test_loading_onto_the_gpu_is_exact_and_leaves_the_cuda_rng_alone(tmp_path):
    # The model is built on the GPU (its random init there, then overwritten): the weights must be the
    # saved ones bit for bit and the caller's CUDA random stream must not move.
    from mqa_lm import save_pretrained

    config = MQAConfig(vocab_size=96, max_seq_len=32, n_layers=2, d_model=64, heads=4, kv_heads=1)
    model = MQATransformer(config)
    save_pretrained(model, tmp_path / "m")
    torch.cuda.manual_seed(7)
    before = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(7)
    loaded = load_pretrained(tmp_path / "m", device="cuda")[0]
    assert torch.equal(torch.rand(4, device="cuda"), before)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got.cpu(), want), name
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied
