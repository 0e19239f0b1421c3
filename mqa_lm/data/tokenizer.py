"""Tokenizers, all as HF ``tokenizers.Tokenizer`` objects so they save to and load from one
``tokenizer.json``:

* ``bpe``: byte-level BPE (GPT-2 pre-tokenisation, no normaliser) trained on the training split.
  Every byte is in the alphabet, so ``decode(encode(s)) == s`` for any text.
* ``char``: one id per character of the training split, numbered in sorted order as nanoGPT's
  shakespeare_char does, then ``<unk>`` (characters only seen in val) and ``<|endoftext|>``.
* ``file``: any existing ``tokenizer.json``.

Documents are separated by ``<|endoftext|>`` in the token stream. A ``file`` tokenizer without that
token separates them with the encoding of a blank line instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_KINDS = ("bpe", "char", "file")
EOT = "<|endoftext|>"
UNK = "<unk>"
# Byte alphabet plus <|endoftext|>: a BPE vocabulary smaller than this has no room for merges.
MIN_BPE_VOCAB = 257


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Byte-level BPE with ``<|endoftext|>`` (id 0), trained by streaming ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normaliser: either would break the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_char(texts: Iterable[str]) -> Tokenizer:
    """Character-level tokenizer over the characters seen in ``texts`` (streamed)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab.setdefault(UNK, len(vocab))
    vocab.setdefault(EOT, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own pre-token; Fuse joins them back without the spaces WordLevel adds.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([UNK, EOT])
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; a missing or malformed file is a ValueError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.tokenizer_path {str(path)!r} does not exist; give the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(
            f"data.tokenizer_path {str(path)!r} is not a valid tokenizers tokenizer.json ({err}); "
            "save one with Tokenizer.save() or use data.tokenizer=bpe"
        ) from None


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Number of ids, i.e. the largest id + 1 (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def separator_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids put between two documents."""
    eot = tokenizer.token_to_id(EOT)
    if eot is not None:
        return [eot]
    return tokenizer.encode("\n\n", add_special_tokens=False).ids
