"""The lowest layer: helpers that know nothing of models, imported by every other package and
importing none of them (nor Lightning or Hydra).

* :mod:`~mqa_lm.utils.config`: dict round trips of the validated config dataclasses and the value
  checks they share (one :func:`~mqa_lm.utils.config.check_int` for every integer option);
* :mod:`~mqa_lm.utils.registry`: name -> object registries (attention backends, norms, linears);
* :mod:`~mqa_lm.utils.files`: atomic writes, UTF-8 text reads that name the bad byte, directory checks;
* :mod:`~mqa_lm.utils.lazy`: package exports imported on first use;
* :mod:`~mqa_lm.utils.triton_prepare`: Triton's per-process start-up on a thread, before torch's import.
"""
