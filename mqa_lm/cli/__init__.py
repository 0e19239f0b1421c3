"""What the entry points (``train.py``, ``generate.py``, ``eval.py``) share, and nothing else.

* :mod:`~mqa_lm.cli.main`: ``@hydra_main`` (a bad config file, override or run directory is one
  ``config error:`` line and exit status 2 before Hydra creates anything), :func:`~mqa_lm.cli.main.fail`
  and :class:`~mqa_lm.cli.main.UsageError`;
* :mod:`~mqa_lm.cli.options`: :class:`~mqa_lm.cli.options.ModelSource`, the options that name a
  trained model and where it runs (``ckpt_path``, ``tokenizer_path``, ``device``, ``dtype``);
* :mod:`~mqa_lm.cli.config_store`: the Hydra nodes generated from dataclasses that more than one
  command composes (``generation/_base``, ``model_source/_base``).

May import Hydra and the model, generation and model-file layers; never Lightning (an import-linter
contract holds it), so ``generate.py`` and ``eval.py`` start without the training stack.
"""
