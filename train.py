"""Train an MQA language model: ``python train.py [group=option ...] [key=value ...]``.

Configs live in configs/ (see README.md); the work is done by :func:`mqa_lm.training.run.train`.
"""

import os

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Config paths like ${paths.root_dir} resolve against this checkout wherever the command runs from.
os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

# Only what Hydra needs to compose train.yaml (the base nodes, ${run_id:}) is imported here. Lightning
# and the training stack load inside main, after Hydra's checks and the config's own: `--help`,
# `--cfg job`, a bad option or value, a YAML error or an unusable run directory answer in a second or
# two, not after their ~5 s import.
from mqa_lm.cli.main import fail, hydra_main  # noqa: E402
from mqa_lm.pretrained.checkpoint import CheckpointWriteError  # noqa: E402
from mqa_lm.training import config_store  # noqa: E402, F401  (registers model/, optim/ and data/ _base)
from mqa_lm.training.run_dir import RunDirInUseError, register_resolvers, remove_if_unused  # noqa: E402

register_resolvers()


# hydra_main: hydra.main, with a config file that does not parse or a hydra.run.dir that cannot be
# created stopped as one `config error:` line (exit 2) before Hydra makes anything.
@hydra_main(config_path="configs", config_name="train", free_text=("sample.prompt",))
def main(cfg: DictConfig) -> float | None:
    from mqa_lm.training.config import ConfigError, DataError, prepare_config

    try:
        # Every group checked before Lightning's import (~5 s): a bad value is one line at once.
        prepared = prepare_config(cfg)
        from mqa_lm.training.run import train

        metrics = train(cfg, prepared)
    except (ConfigError, DataError, RunDirInUseError) as err:
        # Nothing ran: leave no run directory that looks like a run (Hydra made it before main).
        remove_if_unused(HydraConfig.get().runtime.output_dir)
        fail({ConfigError: "config error", DataError: "data error"}.get(type(err), "error"), err)
    except CheckpointWriteError as err:  # disk full: the message says what is intact and what to do
        fail("error", err, status=1)
    except KeyboardInterrupt:  # Ctrl-C before training started (once it runs, preemption handles it)
        fail("", "interrupted before training started: nothing was saved", status=130)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
