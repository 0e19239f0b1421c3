"""Measuring a model: perplexity on text and benchmarks through lm-evaluation-harness.

* :mod:`~mqa_lm.evaluation.scoring`: the one scoring routine (log-probability of each row's last
  tokens, batched by length, the LM head on the scored positions only) and the sliding windows;
* :mod:`~mqa_lm.evaluation.perplexity`: :func:`perplexity` of texts (``eval.py mode=perplexity``);
* :mod:`~mqa_lm.evaluation.harness`: :class:`~mqa_lm.evaluation.harness.MQALM`, the harness model
  (needs the ``[eval]`` extra; importing it registers ``mqa_lm`` with the harness);
* :mod:`~mqa_lm.evaluation.tasks`: options, finding and running tasks, their metrics (``eval.py``
  and the training callback); :mod:`~mqa_lm.evaluation.results`: the results files of ``eval.py``.

No Lightning or Hydra below this package; the training callback lives in :mod:`mqa_lm.callbacks`.
"""

from mqa_lm.evaluation.perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
