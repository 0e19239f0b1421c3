"""How fast a run goes: tokens/s, samples/s, TFLOP/s and MFU, and the gradient norm.

FLOPs come from the model's PaLM formula (:meth:`MQATransformer.flops_per_token`), MFU divides them by
the device's dense peak for the compute dtype (:data:`PEAK_FLOPS`, or ``peak_flops`` in the config).
Only on the steps that write logs does anything wait for the GPU: the training step itself gains no
host-device synchronisation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mqa_lm.training.module import trained_model
from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from lightning.pytorch.trainer.states import RunningStage

# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, by compute dtype. TF32 is what
# fp32 matmuls run at when torch.set_float32_matmul_precision is "high" or "medium".
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "b200": {"bf16": 2250e12, "fp16": 2250e12},
    "gh200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h100 sxm": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h100 nvl": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
}


def chip_key(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key of a CUDA device name (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    if "gh200" in name:
        return "gh200"
    for key in ("b200", "h200", "a100", "l40s", "v100"):
        if key in name:
            return key
    if "h100" in name:
        if "nvl" in name:
            return "h100 nvl"
        # "NVIDIA H100 80GB HBM3" is the SXM part; the PCIe card says PCIe (or HBM2e).
        return "h100 pcie" if ("pcie" in name or "hbm2e" in name) else "h100 sxm"
    if "l4" in name and "l40" not in name:
        return "l4"
    return None


def compute_dtype(precision: str) -> str | None:
    """The matmul dtype of a Lightning precision string (``bf16-mixed``, ``16-mixed``, ``32-true``...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if precision.startswith("32"):
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` at ``precision``; None on CPU and on GPUs not in the table."""
    if device.type != "cuda":
        return None
    key = chip_key(torch.cuda.get_device_name(device))
    dtype = compute_dtype(precision)
    return PEAK_FLOPS.get(key, {}).get(dtype) if key and dtype else None


def batch_samples(batch: Any) -> int:
    """Sequences in an (x, y) batch of token windows."""
    return int(batch[0].shape[0])


def batch_tokens(batch: Any) -> int:
    """Input tokens in an (x, y) batch of token windows."""
    return int(batch[0].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token windows, measured only on logging steps.

    Logs ``throughput/tokens_per_sec``, ``samples_per_sec``, ``tflops_per_sec`` (per device),
    ``mfu`` (when the peak is known) and ``train_seconds`` (training time without validation) every
    ``trainer.log_every_n_steps`` steps, as rolling averages over the last ``window_size`` logging
    steps. The stock monitor synchronises the GPU after every batch; this one counts batches on the
    host and synchronises only when it writes a log line.

    Args:
        window_size: logging steps in the rolling average (>= 2; metrics appear once it is full).
        peak_flops: per-device peak FLOP/s for MFU; ``None`` looks the device up in
            :data:`PEAK_FLOPS` (no MFU on CPU or unknown GPUs).
    """

    def __init__(self, window_size: int = 5, peak_flops: float | None = None) -> None:
        check_int(window_size, "callbacks.throughput.window_size", minimum=2)
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(
                f"callbacks.throughput.peak_flops must be > 0 FLOP/s (or null to look it up), got {peak_flops!r}"
            )
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_tokens, window_size=window_size)
        self.peak_override = peak_flops
        self.last_metrics: dict[str, float] = {}
        self._pending_flops = 0.0
        self._val_start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_override or peak_flops(trainer.strategy.root_device, trainer.precision)
        # Lightning annotates available_flops as int; it only divides by it, and peaks are floats.
        self.available_flops = peak  # type: ignore[assignment]
        for throughput in self._throughputs.values():
            throughput.available_flops = peak

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stage = cast("RunningStage", trainer.state.stage)  # TRAINING inside this hook
        self._batches[stage] += 1
        self._samples[stage] += batch_samples(batch)
        self._lengths[stage] += batch_tokens(batch)
        seq_len = int(batch[0].shape[-1])
        self._pending_flops += trained_model(pl_module).flops_per_token(seq_len) * batch_tokens(batch)
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        throughput = self._throughputs[stage]
        # Lightning annotates flops as int; it only sums and divides them, and ours are a float sum.
        throughput.update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=self._pending_flops,  # type: ignore[arg-type]
        )
        self._pending_flops = 0.0
        self._log(trainer, throughput.compute(), throughput.world_size)

    def _log(self, trainer: L.Trainer, raw: dict[str, float], world_size: int) -> None:
        metrics = {"throughput/train_seconds": raw["time"], "throughput/tokens": raw.get("lengths", 0)}
        if "device/items_per_sec" in raw:
            metrics["throughput/tokens_per_sec"] = raw["device/items_per_sec"] * world_size
            metrics["throughput/tokens_per_sec_per_device"] = raw["device/items_per_sec"]
            metrics["throughput/samples_per_sec"] = raw["device/samples_per_sec"] * world_size
        if "device/flops_per_sec" in raw:
            metrics["throughput/tflops_per_sec_per_device"] = raw["device/flops_per_sec"] / 1e12
        if "device/mfu" in raw:
            metrics["throughput/mfu"] = raw["device/mfu"]
        self.last_metrics = metrics
        # step=None: the step Lightning gives its own metrics of this batch (train/loss...).
        # Lightning annotates the values as tensors; its loggers take plain floats as well.
        trainer._logger_connector.log_metrics(metrics, step=None)  # type: ignore[arg-type]

    # Validation is not training: its time is taken out of the training clock, and it is not timed.

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.sanity_checking:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._val_start = time.perf_counter()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.sanity_checking or not self._val_start:
            return
        from lightning.pytorch.trainer.states import RunningStage

        if RunningStage.TRAINING in self._t0s:
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._val_start
        self._val_start = 0.0


class GradNormMonitor(L.Callback):
    """Logs ``train/grad_norm``, the total gradient norm before clipping, on logging steps only.

    Computed on the device with one fused norm and handed to ``self.log`` as a tensor, so it costs no
    synchronisation beyond the one Lightning makes when it writes the log line.
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        if not float(norm_type) > 0:
            raise ValueError(f"callbacks.grad_norm.norm_type must be > 0 (2.0 or inf), got {norm_type!r}")
        super().__init__()
        self.norm_type = float(norm_type)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=self.norm_type)
            if hasattr(norm, "full_tensor"):  # FSDP2's gradient shards (DTensor): a partial norm per rank
                norm = norm.full_tensor()
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
