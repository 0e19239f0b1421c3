"""Train an MQA language model: ``python train.py [group=option ...] [key=value ...]``.

Configs live in configs/ (see README.md); the work is done by :func:`mqa_lm.training.train`.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

# Config paths like ${paths.root_dir} resolve against this checkout wherever the command runs from.
os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from mqa_lm.training import ConfigError, DataError, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
