"""lm-evaluation-harness model over :class:`~mqa_lm.model.MQATransformer` and its tokenizer.

    from lm_eval import simple_evaluate
    from mqa_lm.evaluation.harness import MQALM

    results = simple_evaluate(model=MQALM.from_pretrained("outputs/<date>/<time>"), tasks=["hellaswag"])

Importing this module registers the class with the harness as ``mqa_lm`` (and ``mqa-lm``), so
``simple_evaluate(model="mqa_lm", model_args="pretrained=<run | .ckpt | export dir>,dtype=bf16")``
works in a process that imported it.

What each request type computes:

* ``loglikelihood``: the harness's own tokenisation (:class:`lm_eval.api.model.TemplateLM`: context
  and continuation encoded together and split, trailing context spaces moved to the continuation,
  the document separator as the context of an empty one), context + continuation truncated from
  the left to ``max_seq_len`` as its HF backend does, continuation tokens scored by
  :func:`~mqa_lm.evaluation.scoring.score_tails`.
* ``loglikelihood_rolling``: the windows of :func:`mqa_lm.evaluation.perplexity.perplexity`, after
  the document separator; by default (``rolling_stride`` = the window) the harness's own windows.
* ``generate_until``: batched on the inference engine (:func:`mqa_lm.inference.text.generate_ids`),
  contexts truncated from the left to leave room for ``max_gen_toks``, greedy unless the task
  samples, cut at the first stop sequence; a batch stops early once every row has met one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from mqa_lm.data.tokenizer import EOT
from mqa_lm.evaluation.perplexity import check_stride, check_window, sequence_logprobs
from mqa_lm.evaluation.scoring import BATCH_SIZE, score_tails, truncate_left
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.text import generate_ids, start_ids
from mqa_lm.pretrained.placement import check_device, resolve_device, resolve_dtype
from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from tokenizers import Tokenizer

    from mqa_lm.model import MQATransformer

# Generation settings a task may give (lm-eval's generation_kwargs, after normalize_gen_kwargs).
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


class _AllStopped(Exception):
    """Raised from generate_ids' token callback to end a batch whose rows have all met a stop sequence."""


@register_model("mqa_lm", "mqa-lm")
class MQALM(TemplateLM):
    """An :class:`MQATransformer` with its ``tokenizers.Tokenizer``, as a harness model.

    Args:
        model, tokenizer: the model (used where it is, in its dtype; put it in eval mode: dropout
            would make every score random) and the tokenizer it was trained with. Or leave them
            out and give ``pretrained``.
        pretrained: a run directory, Lightning ``.ckpt`` or export directory, read by
            :func:`mqa_lm.pretrained.directory.load_pretrained` (``tokenizer_path`` for one without a tokenizer)
            onto ``device`` (``auto`` | ``cpu`` | ``cuda[:i]``) in ``dtype`` (``auto``: bf16 on CUDA);
            ``device`` and ``dtype`` apply to ``pretrained`` only.
        batch_size: rows per forward (an integer; the harness's ``auto`` is not supported).
        max_gen_toks: new tokens per ``generate_until`` request unless its task says otherwise.
        rolling_window, rolling_stride: the windows of ``loglikelihood_rolling``; default a window
            of ``max_seq_len`` and a stride of a whole window (the harness's rule, so word
            perplexities compare with other models'); a smaller stride gives more context per token.
        seed: seeds the sampling of tasks that sample (``do_sample``); each call starts from it.
        progress: show progress bars (on stderr).
        max_batch_size: accepted for the harness's command line, which always passes it; unused.
    """

    def __init__(
        self,
        model: MQATransformer | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        pretrained: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = BATCH_SIZE,
        max_gen_toks: int = 256,
        rolling_window: int | None = None,
        rolling_stride: int | None = None,
        seed: int = 1234,
        progress: bool = True,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("give either model (with its tokenizer) or pretrained=<run | .ckpt | export dir>")
        if model is None:
            from mqa_lm.pretrained.directory import load_pretrained

            where = resolve_device(check_device("auto" if device is None else str(device)))
            model, tokenizer = load_pretrained(
                str(pretrained),
                device=where,
                dtype=resolve_dtype("auto" if dtype is None else dtype, where),
                tokenizer_path=tokenizer_path,
                require_tokenizer=True,
            )
        if tokenizer is None:
            raise ValueError("the tokenizer is required: pass the tokenizers.Tokenizer the model was trained with")
        if model.training:
            warnings.warn(
                "MQALM got a model in train mode: its dropout makes the scores random; call model.eval() first",
                stacklevel=2,
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size_per_forward = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.rolling_window = check_window(model.config.max_seq_len, rolling_window)
        self.rolling_stride = check_stride(
            self.rolling_window, self.rolling_window if rolling_stride is None else rolling_stride
        )
        self.seed = int(seed)
        self.progress = progress
        self._start = start_ids(tokenizer)
        self._eot = tokenizer.token_to_id(EOT)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> MQALM:
        """``MQALM(pretrained=path, **kwargs)``."""
        return cls(pretrained=path, **kwargs)

    # ---- what the harness asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The document separator: the context of an empty context (a tokenizer without
        ``<|endoftext|>`` separates documents by a blank line, whose last token stands in)."""
        return self._eot if self._eot is not None else self._start[-1]

    @property
    def max_length(self) -> int:
        """Positions of the model: contexts are cut from the left to fit."""
        return self.model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.model.wte.weight.device

    @property
    def batch_size(self) -> int:
        """Rows per forward."""
        return self.batch_size_per_forward

    @property
    def tokenizer_name(self) -> str:
        """The name the harness files cached requests under (one tokenizer family: ours)."""
        return "mqa_lm"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; the tokenizer's own special tokens (its post-processor) unless
        ``add_special_tokens=False``, as the HF backend encodes."""
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded under ``config`` in the results."""
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": str(self.model.wte.weight.dtype),
            "max_seq_len": self.max_length,
            "rolling_window": self.rolling_window,
            "rolling_stride": self.rolling_stride,
        }

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = [truncate_left(context, continuation, self.max_length) for _, context, continuation in requests]
        with tqdm(total=len(rows), disable=disable_tqdm or not self.progress, desc="mqa_lm loglikelihood") as bar:
            scores = score_tails(self.model, rows, batch_size=self.batch_size, progress=bar.update)
        answers = [(score.logprob, score.greedy) for score in scores]
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        sequences = [self._start + self.tok_encode(s) for s in strings]
        totals = sequence_logprobs(
            self.model,
            sequences,
            len(self._start),
            window=self.rolling_window,
            stride=self.rolling_stride,
            batch_size=self.batch_size,
        )
        for string, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="mqa_lm generate_until") as bar:
            for members in groups.values():
                gen_kwargs = requests[members[0]].args[1]
                contexts = [requests[i].args[0] for i in members]
                for i, text in zip(members, self._generate(contexts, gen_kwargs)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), text)
                    bar.update(1)
        return [r if r is not None else "" for r in results]

    # ---- generation -------------------------------------------------------------------------

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """Continuations of ``contexts`` under one task's generation settings, longest contexts first
        in batches of ``batch_size``."""
        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(
                f"generation_kwargs {', '.join(unknown)} are not supported by mqa_lm (it takes: "
                f"{', '.join(GENERATION_KEYS)}); remove them from the task"
            )
        # The end of text is a stop sequence too (as for the HF backend); a tokenizer without one has none.
        eos = self.tok_decode([self._eot], False) if self._eot is not None else None
        until = handle_stop_sequences(kwargs.get("until"), eos=eos)
        max_new = int(kwargs["max_gen_toks"])
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(
                f"max_gen_toks={max_new} leaves no room for a context in max_seq_len={self.max_length}; "
                "lower the task's max_gen_toks"
            )
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
        settings = GenerationConfig(
            max_new_tokens=max_new,
            temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_k=kwargs.get("top_k") if sample else None,
            top_p=kwargs.get("top_p") if sample else None,
            prefix="generation_kwargs.",
        )
        encoded = [(self.tok_encode(c) or list(self._start))[-room:] for c in contexts]
        order = sorted(range(len(contexts)), key=lambda i: -len(encoded[i]))
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        texts = [""] * len(contexts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            new = self._generate_batch([encoded[i] for i in batch], until, settings, generator)
            for i, ids in zip(batch, new):
                texts[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
        return texts

    def _generate_batch(
        self,
        rows: list[list[int]],
        until: list[str],
        settings: GenerationConfig,
        generator: torch.Generator,
    ) -> list[list[int]]:
        """New ids of each row. Rows go on after meeting a stop sequence (the text is cut there
        afterwards), but the batch ends once all of them have met one or the end of text."""
        stops = [s for s in until if s]
        produced: list[list[int]] = [[] for _ in rows]

        def watch(fresh: list[list[int]]) -> None:
            for ids, more in zip(produced, fresh):
                ids.extend(more)
            if stops and all(self._finished(ids, stops) for ids in produced):
                raise _AllStopped

        try:
            return generate_ids(
                self.model, rows, settings, eos_token_id=self._eot, generator=generator, on_tokens=watch
            )
        except _AllStopped:
            return produced

    def _finished(self, ids: list[int], stops: list[str]) -> bool:
        if self._eot is not None and ids and ids[-1] == self._eot:
            return True
        text = self.tok_decode(ids, skip_special_tokens=False)
        return any(stop in text for stop in stops)


def _positive_int(value: object, key: str) -> int:
    """``value`` as an int >= 1 (digit strings too: the harness's command line passes text)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    hint = "the harness's automatic batch size is not supported" if str(value).startswith("auto") else ""
    return check_int(value, key, hint=hint)
