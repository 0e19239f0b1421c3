"""mqa_lm.evaluation.harness.MQALM against lm-eval's own HF backend on our transformers export:
the same log-likelihoods (contexts past max_seq_len truncated by the harness's rule), the same
greedy generations, rolling log-likelihoods equal to our perplexity, and use through the harness's
simple_evaluate and registry."""

from __future__ import annotations

import math

import pytest
from eval_helpers import PLAY, TASKS, tiny_lm
from helpers import ROOT

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mqa_lm.evaluation.harness import MQALM  # noqa: E402
from mqa_lm.evaluation.perplexity import perplexity  # noqa: E402

TOLERANCE = 1e-4  # per request, fp32 on both sides


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files from the repository root


def requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def hf_backend(family):
    return HFLM(pretrained=str(tiny_lm(family).hf), dtype="float32", device="cpu", batch_size=3)


LOGLIKELIHOOD = [
    ("First Citizen:\nBefore we proceed any further, hear me", " speak."),
    ("First Citizen:\nBefore we proceed any further, hear me", " sing."),
    ("All:\nSpeak, ", "speak."),  # the trailing space moves to the continuation
    ("", "First Citizen:"),  # empty context: conditioned on the document separator
    (PLAY[:400], " know't."),  # far past max_seq_len=64 tokens: truncated from the left
    (PLAY[:260], " price.\nIs't a verdict?\n\nAll:\nNo more talking on't; let it be done: away, away!"),
    (PLAY, "\n"),
]


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_loglikelihood_matches_the_hf_backend_past_max_seq_len(family):
    tiny = tiny_lm(family)
    ours = MQALM(tiny.model, tiny.tokenizer, batch_size=2)
    theirs = hf_backend(family)
    lengths = [
        len(ours.tok_encode(c + x)) for c, x in LOGLIKELIHOOD if c
    ]  # whole sequences, in tokens: some must not fit
    assert max(lengths) > 3 * ours.max_length and theirs.max_length == ours.max_length == 64
    got = ours.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    want = theirs.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    for (lp, greedy), (hf_lp, hf_greedy), args in zip(got, want, LOGLIKELIHOOD):
        assert abs(lp - hf_lp) < TOLERANCE, (args, lp, hf_lp)
        assert greedy == hf_greedy, args
    # Not vacuous: the model knows the play, and the scores differ between continuations.
    assert got[0][0] > got[1][0] + 5 and got[0][1]


def test_truncation_keeps_the_score_of_the_last_max_seq_len_tokens():
    """A context longer than max_seq_len scores as its last tokens alone: what the harness's rule
    (keep the last max_seq_len + 1 tokens of context + continuation) means."""
    tiny = tiny_lm()
    lm = MQALM(tiny.model, tiny.tokenizer)
    context, continuation = lm.tok_encode(PLAY[:400]), lm.tok_encode(" know't.")
    whole = context + continuation
    keep = whole[-(lm.max_length + 1) :]
    cut = keep[: len(keep) - len(continuation)]
    assert len(context) > len(cut) > 0
    (long_lp, _), (cut_lp, _) = lm._loglikelihood_tokens([(None, context, continuation), (None, cut, continuation)])
    assert math.isclose(long_lp, cut_lp, rel_tol=1e-6)
    (shorter_lp, _) = lm._loglikelihood_tokens([(None, cut[1:], continuation)])[0]
    assert abs(shorter_lp - cut_lp) > 1e-6  # one token less of context does change it


def test_loglikelihood_rolling_is_our_perplexity():
    tiny = tiny_lm()
    texts = [PLAY, PLAY[:150], "x"]
    for window, stride in ((64, 64), (64, 16), (32, 7)):
        lm = MQALM(tiny.model, tiny.tokenizer, rolling_window=window, rolling_stride=stride, batch_size=3)
        rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
        for text, got in zip(texts, rolling):
            want = perplexity(tiny.model, tiny.tokenizer, [text], window=window, stride=stride).nll
            assert math.isclose(-got, want, rel_tol=1e-6), (window, stride, text[:20])


def test_loglikelihood_rolling_matches_the_hf_backend_by_default():
    tiny = tiny_lm()
    texts = [(PLAY,), (PLAY[:150],), ("Second Citizen:\nOne word, good citizens.\n",)]
    got = MQALM(tiny.model, tiny.tokenizer).loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    want = hf_backend("gpt_bigcode").loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert max(abs(a - b) for a, b in zip(got, want)) < TOLERANCE


def test_generate_until_matches_the_hf_backend_and_stops():
    tiny = tiny_lm()
    settings = {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}
    prompts = [
        "First Citizen:\nBefore we proceed any further,",
        "All:\nNo more talking on't;",
        "Second Citizen:\nOne",
        PLAY[:300],  # longer than max_seq_len - max_gen_toks: truncated from the left
        "Third Citizen:\nWhat",
    ]
    reqs = [(p, dict(settings)) for p in prompts]
    ours = MQALM(tiny.model, tiny.tokenizer, batch_size=2).generate_until(requests("generate_until", reqs))
    theirs = hf_backend("gpt_bigcode").generate_until(requests("generate_until", reqs))
    assert ours == theirs
    assert ours[0] == " hear me speak."  # it learned the play
    assert all("\n" not in text for text in ours)
    # Without the stop sequence the same rows run on past the newline.
    free = MQALM(tiny.model, tiny.tokenizer).generate_until(
        requests("generate_until", [(prompts[0], {"until": [], "max_gen_toks": 24, "do_sample": False})])
    )
    assert free[0].startswith(" hear me speak.\n")


def test_simple_evaluate_takes_the_model_and_its_registered_name(tmp_path):
    tiny = tiny_lm()
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    direct = simple_evaluate(
        model=MQALM(tiny.model, tiny.tokenizer), tasks=["tiny_mc"], task_manager=manager, bootstrap_iters=0
    )
    by_name = simple_evaluate(
        model="mqa_lm",
        model_args=f"pretrained={tiny.export},dtype=fp32,device=cpu",
        tasks=["tiny_mc"],
        task_manager=manager,
        bootstrap_iters=0,
    )
    assert direct["results"]["tiny_mc"]["acc,none"] == by_name["results"]["tiny_mc"]["acc,none"] > 0.5


def test_bad_arguments_are_refused():
    tiny = tiny_lm()
    with pytest.raises(ValueError, match="automatic batch size is not supported"):
        MQALM(tiny.model, tiny.tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="give either model"):
        MQALM()
    try:
        with pytest.warns(UserWarning, match="train mode: its dropout makes the scores random"):
            MQALM(tiny.model.train(), tiny.tokenizer)
    finally:
        tiny.model.eval()
    lm = MQALM(tiny.model, tiny.tokenizer)
    with pytest.raises(ValueError, match="max_gen_toks=64 leaves no room for a context in max_seq_len=64"):
        lm.generate_until(requests("generate_until", [("Hi", {"until": ["\n"], "max_gen_toks": 64})]))
    with pytest.raises(ValueError, match="generation_kwargs repetition_penalty are not supported"):
        lm.generate_until(requests("generate_until", [("Hi", {"until": ["\n"], "repetition_penalty": 1.2})]))
