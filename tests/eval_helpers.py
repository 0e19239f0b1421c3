"""What the evaluation tests share: a tiny model trained (seconds, plain torch) to know the corpus
that the tasks under tests/tasks/ quote, saved as our export and as a transformers export.

Trained rather than random so that the tasks' scores are far from chance and a scoring mistake (a
position off by one, a context cut wrongly) changes them."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import ROOT

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.data.tokenizer import EOT, train_bpe
from mqa_lm.pretrained.directory import save_pretrained

TASKS = ROOT / "tests" / "tasks"
# Coriolanus, Act 1 Scene 1 (public domain): what tests/tasks/*.jsonl ask about.
PLAY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\n"
    "First Citizen:\nLet us kill him, and we'll have corn at our own price.\nIs't a verdict?\n\n"
    "All:\nNo more talking on't; let it be done: away, away!\n\n"
    "Second Citizen:\nOne word, good citizens.\n\n"
    "First Citizen:\nWe are accounted poor citizens, the patricians good.\n"
)
FAMILIES = {
    "gpt_bigcode": {"pos_emb": "learned", "mlp_type": "gelu", "norm_type": "low_precision_layernorm"},
    "llama": {"pos_emb": "rope", "mlp_type": "swiglu", "norm_type": "rmsnorm", "bias": False},
}


@dataclass(frozen=True)
class TinyLM:
    model: MQATransformer  # fp32, eval mode
    tokenizer: object  # tokenizers.Tokenizer
    export: Path  # save_pretrained directory (ours)
    hf: Path  # export_hf directory (transformers)


def _train(config: MQAConfig, ids: list[int], steps: int) -> MQATransformer:
    torch.manual_seed(0)
    model = MQATransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    width = config.max_seq_len
    starts = torch.arange(0, len(ids) - width - 1)
    for _ in range(steps):
        pick = starts[torch.randint(len(starts), (16,))]
        x = torch.stack([data[s : s + width] for s in pick])
        y = torch.stack([data[s + 1 : s + width + 1] for s in pick])
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def tiny_lm(family: str = "gpt_bigcode") -> TinyLM:
    """The trained model of ``family`` and its two exports (made once per test process)."""
    return _tiny_lm(family)


@functools.cache
def _tiny_lm(family: str) -> TinyLM:
    from mqa_lm.pretrained.hf import export_hf

    tokenizer = train_bpe([PLAY], vocab_size=300)
    eot = tokenizer.token_to_id(EOT)
    # Documents after the separator, as train.py's token stream has them.
    ids = ([eot] + tokenizer.encode(PLAY, add_special_tokens=False).ids) * 12
    config = MQAConfig(
        vocab_size=320,  # padded above the tokenizer's, like real models
        max_seq_len=64,
        n_layers=2,
        d_model=64,
        heads=4,
        kv_heads=1,
        attn_impl="torch",
        **FAMILIES[family],
    )
    model = _train(config, ids, steps=300)
    directory = Path(tempfile.mkdtemp(prefix=f"tiny-lm-{family}-"))
    atexit.register(shutil.rmtree, directory, True)
    export = save_pretrained(model, directory / "export", tokenizer)
    hf = export_hf(model, directory / "hf", tokenizer)
    return TinyLM(model, tokenizer, export, hf)
