"""Our Triton kernels for MQA/GQA (the ``triton`` attention backend and the decode step).

* :mod:`~mqa_lm.kernels.triton.attention`: :func:`~mqa_lm.kernels.triton.attention.triton_attention`,
  flash attention for training with autograd and a ``torch.library`` custom op for ``torch.compile``;
  its kernels are in :mod:`~mqa_lm.kernels.triton.attention_kernels` and their launches (configurations,
  grids, autotuning) in :mod:`~mqa_lm.kernels.triton.attention_launch`;
* :mod:`~mqa_lm.kernels.triton.decode`: the split-KV decode kernel (one query token per row).

Each module imports Triton; the backends import them on first use, so a process that never runs
these kernels never imports Triton through them.
"""
