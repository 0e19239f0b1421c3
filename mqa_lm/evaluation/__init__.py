"""Measuring a model: perplexity on text and benchmarks through lm-evaluation-harness.

* :mod:`~mqa_lm.evaluation.scoring`: the one scoring routine (log-probability of each row's last
  tokens, batched by length, the LM head on the scored positions only) and the sliding windows;
* :mod:`~mqa_lm.evaluation.perplexity`: :func:`perplexity` of texts (``eval.py mode=perplexity``);
* :mod:`~mqa_lm.evaluation.harness`: :class:`~mqa_lm.evaluation.harness.MQALM`, the harness model
  (needs the ``[eval]`` extra; importing it registers ``mqa_lm`` with the harness);
* :mod:`~mqa_lm.evaluation.tasks`: options, finding and running tasks, their metrics (``eval.py``
  and the training callback); :mod:`~mqa_lm.evaluation.results`: the results files of ``eval.py``.

Imports the model, generation's text helpers, model files and :mod:`mqa_lm.utils`; no Lightning or
Hydra (the training callback lives in :mod:`mqa_lm.training.callbacks`). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqa_lm.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from mqa_lm.evaluation.perplexity import Perplexity, perplexity

_EXPORTS = {"Perplexity": "mqa_lm.evaluation.perplexity", "perplexity": "mqa_lm.evaluation.perplexity"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["Perplexity", "perplexity"]
