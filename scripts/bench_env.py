"""What a GPU benchmark's JSON records about its run (shared by the scripts in this folder)."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch


def chosen_triton_configs() -> dict[str, str]:
    """What the Triton autotuner picked for every key it has tuned so far in this process."""
    from mqa_lm.kernels.triton import attention_launch

    found = {}
    for (kind, family, _tuned), tuner in attention_launch._KERNELS.items():
        for key, config in tuner.cache.items():
            found[f"{kind} d<={family} {'/'.join(map(str, key))}"] = str(config)
    return found


def benchmark_environment() -> dict[str, object]:
    """Card, UTC time, command, versions, and the Triton configurations chosen (call it after
    the timings, so the autotuner has run)."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "configs": chosen_triton_configs(),
    }
