"""mqa_lm.data: sources, tokenizers, prepared token files, batches and exact resume.

References are independent of the code under test: token files must decode back to the corpus text
sliced in the test, tokenizations are compared with a whole-text ``encode``, windows are checked
against the raw token file, and resume is compared with an uninterrupted Lightning run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sysconfig
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg
from hydra.utils import instantiate
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from mqa_lm.data import EOT, UNK, DataConfig, TrainBatches, ValWindows, resolve_sources, stdlib_files
from mqa_lm.data import prepare as prepare_mod
from mqa_lm.data import sources as sources_mod
from mqa_lm.data.store import read_json, split_paths
from mqa_lm.training import TextDataModule

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WORDS = "the quick brown fox jumps over a lazy dog while query key value heads attend".split()


def sample_text(lines: int = 400, seed: int = 0) -> str:
    """Prose-like lines with the awkward bits: indentation, trailing spaces, blank lines, non-ASCII."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        roll = rng.random()
        if roll < 0.1:
            line = "    " + line
        elif roll < 0.15:
            line += "  "
        elif roll < 0.2:
            line = ""
        elif roll < 0.25:
            line += " café 😀 λόγος\t中文"
        out.append(line)
    return "\n".join(out) + "\n"


def make_dm(paths, tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = dict(cache_dir=str(tmp_path / "cache"), vocab_size=300, block_size=16, batch_size=4, val_fraction=0.1)
    defaults.update(kwargs)
    return TextDataModule(paths, **defaults)


def data_info(dm: TextDataModule) -> dict:
    """Where a prepared datamodule's data is, its size and batch shape, read from its files."""
    splits = dm._require_setup()
    meta = read_json(split_paths(dm._dir, "train")[1]) or {}
    return {
        "dir": str(dm._dir),
        "files": len(meta.get("sources", [])),
        "skipped_files": len(meta.get("skipped", [])),
        "tokenizer_file": str(dm._dir / "tokenizer.json"),
        "dtype": splits["train"].dtype.name,
        "train_tokens": len(splits["train"]),
        "train_chars": meta.get("chars"),
    }


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def read_split(dm: TextDataModule, split: str) -> np.ndarray:
    """A split's tokens read straight from disk with the dtype its sidecar states."""
    directory = Path(data_info(dm)["dir"])
    meta = json.loads((directory / f"{split}.json").read_text())
    return np.fromfile(directory / f"{split}.bin", dtype=meta["dtype"])


def decoded_splits(dm: TextDataModule) -> tuple[str, str]:
    return dm.decode(read_split(dm, "train").tolist()), dm.decode(read_split(dm, "val").tolist())


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


# -- sources ----------------------------------------------------------------------------------------


def test_file_source_splits_by_character_and_round_trips(tmp_path):
    text = sample_text()
    dm = ready(make_dm(str(write(tmp_path / "corpus.txt", text)), tmp_path))
    cut = int(len(text) * 0.9)
    train, val = decoded_splits(dm)
    assert train == text[:cut]
    assert val == text[cut:]
    assert data_info(dm)["train_tokens"] < cut / 1.5  # BPE really merged something


def test_piece_boundaries_do_not_change_the_tokens(tmp_path, monkeypatch):
    # Streaming cuts the text into pieces; a tiny piece size forces hundreds of cuts, which must
    # give exactly the ids of encoding the whole split at once.
    monkeypatch.setattr(sources_mod, "PIECE_CHARS", 64)
    monkeypatch.setattr(prepare_mod, "ENCODE_BATCH_CHARS", 500)
    text = sample_text(lines=300, seed=3)
    dm = ready(make_dm(str(write(tmp_path / "c.txt", text)), tmp_path))
    cut = int(len(text) * 0.9)
    expected = dm.tokenizer.encode(text[:cut], add_special_tokens=False).ids
    assert read_split(dm, "train").tolist() == expected


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    docs = {"b.txt": sample_text(60, 1), "a/z.md": sample_text(60, 2), "a/deep/m.py": sample_text(60, 3)}
    for name, text in docs.items():
        write(root / name, text)
    write(root / ".hidden.txt", "never read")
    write(root / "__pycache__" / "x.txt", "never read")
    dm = ready(make_dm(str(root), tmp_path, cache_dir=str(root / "cache")))
    train, val = decoded_splits(dm)
    order = ["a/deep/m.py", "a/z.md", "b.txt"]
    assert train + val == EOT.join(docs[name] for name in order)
    assert data_info(dm)["files"] == 3
    # The cache dir sits inside the walked directory: its files must not become sources, so a
    # second datamodule finds the same inputs and reuses the prepared data untouched.
    before = mtimes(Path(data_info(dm)["dir"]))
    dm2 = ready(make_dm(str(root), tmp_path, cache_dir=str(root / "cache")))
    assert data_info(dm2)["dir"] == data_info(dm)["dir"]
    assert mtimes(Path(data_info(dm2)["dir"])) == before


def test_glob_selects_matching_files_only(tmp_path):
    root = tmp_path / "corpus"
    write(root / "one.txt", sample_text(80, 1))
    write(root / "sub" / "two.txt", sample_text(80, 2))
    write(root / "sub" / "skip.md", "not matched")
    dm = ready(make_dm(str(root / "**" / "*.txt"), tmp_path))
    train, val = decoded_splits(dm)
    assert train + val == sample_text(80, 1) + EOT + sample_text(80, 2)


def test_jsonl_records_are_documents_with_configurable_field(tmp_path):
    texts = [sample_text(30, i) for i in range(6)]
    lines = [json.dumps({"id": i, "content": t}) for i, t in enumerate(texts)]
    lines.insert(2, "")  # blank lines are allowed
    lines.append(json.dumps({"id": 99, "content": ""}))  # empty records add nothing
    path = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    dm = ready(make_dm(str(path), tmp_path, jsonl_field="content"))
    train, val = decoded_splits(dm)
    assert train + val == EOT.join(texts)


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on localhost serving tmp_path/www, counting GET requests."""
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()
    server.server_close()


def test_url_is_downloaded_once_and_checked(tmp_path, http_server):
    root, base, hits = http_server
    text = sample_text()
    write(root / "input.txt", text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    url = f"{base}/input.txt"
    dm = ready(make_dm(url, tmp_path, sha256=digest))
    train, val = decoded_splits(dm)
    assert train + val == text
    assert hits == ["/input.txt"]
    ready(make_dm(url, tmp_path, sha256=digest))
    assert hits == ["/input.txt"]  # the second run reuses the download and the prepared files


def test_url_jsonl_source(tmp_path, http_server):
    root, base, _ = http_server
    texts = [sample_text(40, i) for i in range(4)]
    write(root / "d.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    dm = ready(make_dm(f"{base}/d.jsonl?version=2", tmp_path))
    assert "".join(decoded_splits(dm)) == EOT.join(texts)


def test_url_sha256_mismatch_fails_and_keeps_nothing(tmp_path, http_server):
    root, base, _ = http_server
    write(root / "input.txt", sample_text())
    wrong = "0" * 64
    dm = make_dm(f"{base}/input.txt", tmp_path, sha256=wrong)
    with pytest.raises(ValueError, match=f"sha256 mismatch for {base}/input.txt: data.sha256 expects {wrong}"):
        dm.prepare_data()
    assert not (tmp_path / "cache").exists()  # neither the download nor a directory made for it


def test_url_not_found_is_a_clear_error(tmp_path, http_server):
    _, base, _ = http_server
    with pytest.raises(ValueError, match=r"could not download .*/missing\.txt: HTTP Error 404"):
        make_dm(f"{base}/missing.txt", tmp_path).prepare_data()


def test_entries_keep_their_order_and_duplicates_are_dropped(tmp_path):
    a = write(tmp_path / "d" / "a.txt", "a")
    b = write(tmp_path / "d" / "b.txt", "b")
    c = write(tmp_path / "c.txt", "c")
    files = resolve_sources([str(c), str(tmp_path / "d"), str(a), str(tmp_path / "*.txt")], tmp_path / "cache")
    assert [f.path for f in files] == [c.resolve(), a.resolve(), b.resolve()]
    assert [f.explicit for f in files] == [True, False, False]  # found by the walk first, so not explicit


def test_stdlib_discovery():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    banned = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    assert not any(banned & set(Path(r).parts[:-1]) for r in rel)


def test_stdlib_corpus_with_max_chars(tmp_path):
    max_chars = 6000
    dm = ready(make_dm("stdlib", tmp_path, max_chars=max_chars))
    docs, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
        if text:
            docs.append(text[: max_chars - total])
            total += len(docs[-1])
        if total == max_chars:
            break
    train, val = decoded_splits(dm)
    assert train + val == EOT.join(docs)
    assert data_info(dm)["train_chars"] == int(max_chars * 0.9)


# -- tokenizers -------------------------------------------------------------------------------------


def random_text(rng: random.Random, length: int) -> str:
    pools = ["abc xyz\n\t\r  ", "äöü€λ中文😀\u0301\x00", EOT, "<unk>", " "]
    chars = []
    for _ in range(length):
        pool = rng.choice(pools)
        chars.append(pool if pool in (EOT, "<unk>") else rng.choice(pool))
        if rng.random() < 0.05:
            low, high = (0x20, 0x2FFFF) if rng.random() < 0.5 else (0xE000, 0xF8FF)  # any plane, private use
            chars.append(chr(rng.randrange(low, high)))
    return "".join(c for c in chars if not 0xD800 <= ord(c[0]) <= 0xDFFF)


def test_bpe_round_trips_arbitrary_text(tmp_path):
    dm = ready(make_dm(str(write(tmp_path / "c.txt", sample_text())), tmp_path))
    rng = random.Random(0)
    for _ in range(200):
        s = random_text(rng, rng.randint(0, 80))
        assert dm.decode(dm.encode(s)) == s
    assert dm.encode(EOT) == [dm.tokenizer.token_to_id(EOT)]


def test_char_tokenizer_matches_nanogpt_numbering(tmp_path):
    text = sample_text()
    dm = ready(make_dm(str(write(tmp_path / "c.txt", text)), tmp_path, tokenizer="char"))
    cut = int(len(text) * 0.9)
    chars = sorted(set(text[:cut]))
    assert dm.vocab_size == len(chars) + 2
    assert read_split(dm, "train").tolist() == [chars.index(c) for c in text[:cut]]
    alphabet_text = "".join(random.Random(1).choice(chars) for _ in range(500))
    assert dm.decode(dm.encode(alphabet_text)) == alphabet_text
    unk = dm.tokenizer.token_to_id(UNK)
    assert dm.encode("Ω") == [unk]


def test_file_tokenizer_reuses_an_existing_tokenizer_json(tmp_path):
    text = sample_text()
    corpus = write(tmp_path / "c.txt", text)
    bpe = ready(make_dm(str(corpus), tmp_path))
    mine = tmp_path / "mine" / "tokenizer.json"
    mine.parent.mkdir()
    shutil.copyfile(data_info(bpe)["tokenizer_file"], mine)
    before = (mine.read_bytes(), mine.stat().st_mtime_ns)
    dm = ready(make_dm(str(corpus), tmp_path, tokenizer="file", tokenizer_path=str(mine)))
    assert data_info(dm)["dir"] != data_info(bpe)["dir"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(dm, split), read_split(bpe, split))
    assert (mine.read_bytes(), mine.stat().st_mtime_ns) == before


def big_vocab_tokenizer(path: Path, size: int = 70_000) -> Path:
    vocab = {f"w{i}": i for i in range(size - 1)}
    vocab["[UNK]"] = size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_token_dtype_follows_vocab_size(tmp_path):
    small = ready(make_dm(str(write(tmp_path / "c.txt", sample_text())), tmp_path))
    assert data_info(small)["dtype"] == "uint16"
    assert (Path(data_info(small)["dir"]) / "train.bin").stat().st_size == 2 * data_info(small)["train_tokens"]

    rng = random.Random(0)
    text = " ".join(f"w{rng.choice([3, 65535, 65536, 69998, rng.randrange(70_000)])}" for _ in range(3000))
    tok_path = big_vocab_tokenizer(tmp_path / "big.json")
    big = write(tmp_path / "big.txt", text)
    dm = ready(make_dm(str(big), tmp_path, tokenizer="file", tokenizer_path=str(tok_path)))
    assert dm.vocab_size == 70_000 and data_info(dm)["dtype"] == "uint32"
    cut = int(len(text) * 0.9)
    expected = Tokenizer.from_file(str(tok_path)).encode(text[:cut]).ids
    train = read_split(dm, "train")
    assert train.dtype == np.uint32 and train.tolist() == expected and train.max() > 65535


# -- caching ----------------------------------------------------------------------------------------


def test_second_prepare_does_no_work(tmp_path):
    corpus = write(tmp_path / "c.txt", sample_text())
    dm = ready(make_dm(str(corpus), tmp_path))
    directory = Path(data_info(dm)["dir"])
    before = mtimes(directory)
    assert {"tokenizer.json", "train.bin", "train.json", "val.bin", "val.json"} <= set(before)
    ready(make_dm(str(corpus), tmp_path))
    assert mtimes(directory) == before  # nothing rewritten, no temp files left behind
    # Settings that only shape batches share the prepared data.
    assert data_info(ready(make_dm(str(corpus), tmp_path, block_size=8, batch_size=2, seed=5)))["dir"] == str(directory)


def test_changed_source_is_rebuilt(tmp_path):
    corpus = write(tmp_path / "c.txt", sample_text())
    dm = ready(make_dm(str(corpus), tmp_path))
    old_dir = data_info(dm)["dir"]
    new_text = sample_text() + "an appended paragraph about attention\n" * 20
    write(corpus, new_text)
    ready(dm)  # the same datamodule, prepared and set up again, moves to the new data
    assert data_info(dm)["dir"] != old_dir
    assert "".join(decoded_splits(dm)) == new_text
    assert data_info(dm)["train_tokens"] == len(dm.train_dataset.tokens) == len(read_split(dm, "train"))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (
            lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-3]),
            "token file .* has .* bytes, sidecar says",
        ),
        (lambda d: (d / "train.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "train.bin").unlink(), "token file .* is missing"),
    ],
)
def test_damaged_split_is_detected_and_rebuilt(tmp_path, damage, reason):
    corpus = write(tmp_path / "c.txt", sample_text())
    dm = ready(make_dm(str(corpus), tmp_path))
    directory = Path(data_info(dm)["dir"])
    good = read_split(dm, "train")
    before = mtimes(directory)
    damage(directory)
    with pytest.raises(ValueError, match="^data: .*call prepare_data"):
        make_dm(str(corpus), tmp_path).setup("fit")  # never silently used
    with pytest.warns(UserWarning, match=f"rebuilding the train split in .*{reason}"):
        rebuilt = ready(make_dm(str(corpus), tmp_path))
    np.testing.assert_array_equal(read_split(rebuilt, "train"), good)
    after = mtimes(directory)
    assert after["val.bin"] == before["val.bin"] and after["tokenizer.json"] == before["tokenizer.json"]


def test_unloadable_tokenizer_is_rebuilt_with_everything_after_it(tmp_path):
    corpus = write(tmp_path / "c.txt", sample_text())
    dm = ready(make_dm(str(corpus), tmp_path))
    directory = Path(data_info(dm)["dir"])
    good = {split: read_split(dm, split) for split in ("train", "val")}
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:100])
    with pytest.warns(UserWarning, match="does not load as a tokenizer"):
        rebuilt = ready(make_dm(str(corpus), tmp_path))
    for split in ("train", "val"):  # BPE training is deterministic, so the rebuild is identical
        np.testing.assert_array_equal(read_split(rebuilt, split), good[split])


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(paths=None), ValueError, "no data source: set data.paths="),
        (dict(paths=[]), ValueError, "data.paths is empty"),
        (dict(paths=[3]), TypeError, "data.paths entries must be strings"),
        (dict(paths="nope/missing.txt"), ValueError, "'nope/missing.txt' does not exist"),
        (dict(paths="nope/*.txt"), ValueError, "the glob 'nope/\\*.txt' matches no file"),
        (
            dict(tokenizer="wordpiece"),
            ValueError,
            "unknown data.tokenizer 'wordpiece'; valid choices are: bpe, char, file",
        ),
        (dict(tokenizer="file"), ValueError, "data.tokenizer=file needs data.tokenizer_path"),
        (
            dict(tokenizer="file", tokenizer_path="no/tok.json"),
            ValueError,
            "tokenizer_path 'no/tok.json' does not exist",
        ),
        (dict(tokenizer_path="tok.json"), ValueError, "only used with data.tokenizer=file"),
        (dict(vocab_size=100), ValueError, "data.vocab_size=100 does not fit byte-level BPE: it needs at least 257"),
        (dict(block_size=0), ValueError, "data.block_size must be an integer >= 1, got 0"),
        (dict(batch_size="8"), TypeError, "data.batch_size must be an integer >= 1, got '8'"),
        (dict(val_fraction=0.0), ValueError, "data.val_fraction must be a number in \\(0, 1\\), got 0.0"),
        (dict(val_fraction=1.5), ValueError, "data.val_fraction must be a number in \\(0, 1\\), got 1.5"),
        (dict(max_chars=0), ValueError, "data.max_chars must be an integer >= 1, got 0"),
        (dict(jsonl_field=""), ValueError, "data.jsonl_field must be a non-empty string"),
        (dict(sha256="abc"), ValueError, "data.sha256 is a single hash but data.paths has 0 URLs"),
        (
            dict(paths=["http://h/a", "http://h/b"], sha256="f" * 64),
            ValueError,
            "single hash but data.paths has 2 URLs",
        ),
        (dict(paths="http://h/a", sha256="xyz"), ValueError, "data.sha256 for http://h/a must be 64 hex characters"),
        (
            dict(paths="http://h/a", sha256={"http://h/b": "f" * 64}),
            ValueError,
            "not in data.paths: \\['http://h/b'\\]",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "c.txt", sample_text())
    args = dict(paths=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache"))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        TextDataModule(**args)


def test_malformed_tokenizer_file(tmp_path):
    bad = write(tmp_path / "tok.json", "{}")
    with pytest.raises(ValueError, match=f"data.tokenizer_path '{bad}' is not a valid tokenizers tokenizer.json"):
        make_dm(str(write(tmp_path / "c.txt", "x")), tmp_path, tokenizer="file", tokenizer_path=str(bad))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "empty.txt is empty; remove it from data.paths"),
        (
            "latin1.txt",
            "caf\u00e9 au lait".encode("latin-1"),
            "latin1.txt: not UTF-8 at byte 3 \\(invalid continuation byte\\); convert it",
        ),
        (
            "bytes.jsonl",
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            "bytes.jsonl: not UTF-8 at byte 28 \\(invalid continuation byte, line 2\\); convert it",
        ),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2 is not valid JSON"),
        (
            "field.jsonl",
            b'{"body": "hello"}\n',
            "field.jsonl:1 has no 'text' field \\(it has: \\['body'\\]\\); set data.jsonl_field",
        ),
        ("number.jsonl", b'{"text": 5}\n', "number.jsonl:1: field 'text' is a int, not a string"),
        ("blank.jsonl", b"\n\n", "blank.jsonl holds no non-empty text records"),
        ("tiny.txt", b"a", "only 1 characters, too few to split with data.val_fraction=0.1"),
    ],
)
def test_bad_explicit_files_fail_in_prepare(tmp_path, name, content, message):
    dm = make_dm(str(write(tmp_path / name, content)), tmp_path)
    with pytest.raises(ValueError, match=message):
        dm.prepare_data()


def test_corpus_too_short_for_a_window(tmp_path):
    dm = make_dm(str(write(tmp_path / "c.txt", sample_text(40))), tmp_path, block_size=200)
    message = (
        r"the val split has \d+ tokens but one window needs data.block_size \+ 1 = 201; "
        r"add text to data.paths or lower data.block_size, or raise data.val_fraction"
    )
    with pytest.raises(ValueError, match=message):
        dm.prepare_data()


def test_unusable_discovered_files_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "corpus"
    write(root / "good.txt", sample_text())
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    write(root / "empty.txt", b"")
    with pytest.warns(UserWarning, match="skipped 2 unusable source file"):
        dm = ready(make_dm(str(root), tmp_path))
    assert "".join(decoded_splits(dm)) == sample_text()
    assert data_info(dm)["skipped_files"] == 2
    only_bad = tmp_path / "bad"
    write(only_bad / "image.png", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable text in 1 file"):
        make_dm(str(only_bad), tmp_path).prepare_data()


def test_use_before_prepare_is_a_clear_error(tmp_path):
    dm = make_dm(str(write(tmp_path / "c.txt", sample_text())), tmp_path)
    with pytest.raises(RuntimeError, match="call prepare_data"):
        _ = dm.vocab_size
    with pytest.raises(ValueError, match="^data: .*call prepare_data"):  # a data error in train.py
        dm.setup("fit")
    with pytest.raises(RuntimeError, match="call prepare_data\\(\\) and setup\\(\\)"):
        dm.train_dataloader()
    dm.prepare_data()
    assert dm.vocab_size > 257  # known after prepare_data alone, so a model can be built before fit


# -- batches ----------------------------------------------------------------------------------------


@pytest.fixture
def corpus_file(tmp_path):
    return str(write(tmp_path / "c.txt", sample_text(lines=800)))


def test_batches_are_windows_of_the_token_file(tmp_path, corpus_file):
    dm = ready(make_dm(corpus_file, tmp_path))
    tokens = read_split(dm, "train").astype(np.int64)
    data = dm.train_dataset
    for index in (0, 1, 57):
        x, y = data[index]
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        for row, start in enumerate(data.offsets(index).tolist()):
            assert 0 <= start <= len(tokens) - 17
            assert x[row].tolist() == tokens[start : start + 16].tolist()
            assert y[row].tolist() == tokens[start + 1 : start + 17].tolist()
    x, y = next(iter(dm.train_dataloader()))
    assert torch.equal(x, data[0][0]) and torch.equal(y, data[0][1])


def test_batches_depend_only_on_seed_step_and_rank(tmp_path, corpus_file):
    a = ready(make_dm(corpus_file, tmp_path))
    b = ready(make_dm(corpus_file, tmp_path))
    for index in (0, 3, 1000):
        assert all(torch.equal(p, q) for p, q in zip(a.train_dataset[index], b.train_dataset[index]))
    tokens = a.train_dataset.tokens
    rank0 = TrainBatches(tokens, 16, 4, seed=1337, rank=0)
    rank1 = TrainBatches(tokens, 16, 4, seed=1337, rank=1)
    other_seed = TrainBatches(tokens, 16, 4, seed=7, rank=0)
    assert torch.equal(rank0[5][0], a.train_dataset[5][0])
    assert not torch.equal(rank0[5][0], rank1[5][0])
    assert not torch.equal(rank0[5][0], other_seed[5][0])
    assert not torch.equal(rank0[5][0], rank0[6][0])
    # Random access equals sequential iteration: no hidden state between batches.
    loader = iter(b.train_dataloader())
    sequential = [next(loader)[0] for _ in range(8)]
    assert torch.equal(sequential[7], a.train_dataset[7][0])
    workers = ready(make_dm(corpus_file, tmp_path, num_workers=2))
    assert all(torch.equal(p[0], q) for p, q in zip(workers.train_dataloader(), sequential))


def test_validation_windows_are_fixed_even_and_sharded(tmp_path, corpus_file):
    dm = ready(make_dm(corpus_file, tmp_path, val_batches=3))
    val = read_split(dm, "val").astype(np.int64)
    full = dm.val_dataset
    starts = full.starts.tolist()
    assert len(starts) == 12 and starts[0] == 0 and starts[-1] == len(val) - 17
    gaps = np.diff(starts)
    assert gaps.min() >= 0 and gaps.max() - gaps.min() <= 1
    x, y = full[4]
    assert x.tolist() == val[starts[4] : starts[4] + 16].tolist()
    assert y.tolist() == val[starts[4] + 1 : starts[4] + 17].tolist()
    shards = [ValWindows(full.tokens, 16, 12, rank=r, world_size=5) for r in range(5)]
    assert {len(s) for s in shards} == {3}  # 12 windows padded to 15 so every rank runs 3 steps
    assert sorted(set(sum((s.starts.tolist() for s in shards), []))) == sorted(set(starts))
    batches = list(dm.val_dataloader())
    assert len(batches) == 3 and all(b[0].shape == (4, 16) for b in batches)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches, list(dm.val_dataloader())))


def test_epoch_length_without_max_steps(tmp_path, corpus_file):
    dm = ready(make_dm(corpus_file, tmp_path))
    assert dm.epoch_length() == math.ceil(data_info(dm)["train_tokens"] / (4 * 16))
    assert dm.resume_index() == 0


# -- resume through Lightning -------------------------------------------------------------------------


class Recorder(pl.LightningModule):
    """A bigram model that remembers every training batch it saw."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.logits = nn.Embedding(vocab_size, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        return F.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.logits(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(dm: TextDataModule, root: Path, ckpt_path: str | None = None, callbacks=()) -> Recorder:
    model = Recorder(dm.vocab_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=4,
        limit_val_batches=2,
        default_root_dir=str(root),
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_resumed_run_sees_exactly_the_uninterrupted_batches(tmp_path, corpus_file):
    dm = ready(make_dm(corpus_file, tmp_path))
    ckpts = tmp_path / "ckpts"
    every3 = pl.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = fit(dm, tmp_path / "full", callbacks=[every3])
    assert len(full.seen) == 12  # 6 optimizer steps x 2 accumulated micro-batches
    for i, x in enumerate(full.seen):
        assert torch.equal(x, dm.train_dataset[i][0])

    ckpt = ckpts / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["TextDataModule"]["seed"] == 1337
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit(ready(make_dm(corpus_file, tmp_path)), tmp_path / "resumed", ckpt_path=str(ckpt))
    assert not [w for w in caught if "not resumable" in str(w.message) or "micro-batch" in str(w.message)]
    assert len(resumed.seen) == 6
    for x, y in zip(resumed.seen, full.seen[6:]):
        assert torch.equal(x, y)
    assert torch.equal(resumed.logits.weight, full.logits.weight)


def test_resume_with_another_tokenizer_is_refused(tmp_path, corpus_file):
    dm = ready(make_dm(corpus_file, tmp_path))
    state = dm.state_dict()
    other = ready(make_dm(corpus_file, tmp_path, vocab_size=280))
    with pytest.raises(ValueError, match="the checkpoint was trained with tokenizer sha256"):
        other.load_state_dict(state)
    same = ready(make_dm(corpus_file, tmp_path))
    with pytest.warns(UserWarning, match="seed 1337 -> 9"):
        ready(make_dm(corpus_file, tmp_path, seed=9)).load_state_dict(state)
    same.load_state_dict(state)  # identical settings: silent


# -- configs and the reference corpus ------------------------------------------------------------------


def test_data_configs_instantiate(tmp_path):
    corpus = write(tmp_path / "c.txt", sample_text())
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    for name in ("stdlib", "text", "shakespeare_char"):
        cfg = compose_cfg([f"data={name}"]).data
        assert cfg._target_ == "mqa_lm.training.datamodule.TextDataModule"
        assert set(cfg) - {"_target_"} == fields  # every DataConfig field, from text.yaml at least
        assert cfg._get_node("cache_dir")._value() == "${paths.data_dir}"  # the root config's paths group
        assert cfg._get_node("seed")._value() == "${seed}"
        cfg.cache_dir = str(tmp_path / "cache")
        if cfg.paths is None:
            with pytest.raises(Exception, match="no data source: set data.paths="):
                instantiate(cfg)
            cfg.paths = [str(corpus)]
        dm = instantiate(cfg)
        assert isinstance(dm, TextDataModule)
    shakespeare = compose_cfg(["data=shakespeare_char", "seed=42"]).data
    assert (shakespeare.tokenizer, shakespeare.batch_size, shakespeare.block_size, shakespeare.seed) == (
        "char",
        64,
        256,
        42,
    )
    stdlib = compose_cfg(["data=stdlib"]).data
    assert (stdlib.paths, stdlib.vocab_size, stdlib.block_size, stdlib.batch_size) == ("stdlib", 2048, 128, 16)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides(["data.paths=[corpus/*.txt,/abs/dir]"])
    assert override.value() == ["corpus/*.txt", "/abs/dir"]


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tiny shakespeare is not in ../shared/data")
def test_shakespeare_char_matches_nanogpt_preparation(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    dm = ready(TextDataModule(str(SHAKESPEARE), tokenizer="char", val_fraction=0.1, cache_dir=str(tmp_path)))
    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9) :]
    chars = sorted(set(train_text))
    stoi = {c: i for i, c in enumerate(chars)}
    unk = len(chars)
    np.testing.assert_array_equal(read_split(dm, "train"), np.array([stoi[c] for c in train_text], dtype=np.uint16))
    expected_val = np.array([stoi.get(c, unk) for c in val_text], dtype=np.uint16)
    np.testing.assert_array_equal(read_split(dm, "val"), expected_val)


# -- what survives a failure, and what a moved cache does ----------------------------------------


def test_read_text_utf8_names_the_file_and_the_byte(tmp_path):
    from mqa_lm.utils.files import NotUTF8Error, read_text_utf8

    good = write(tmp_path / "good.txt", "\ufeffcaf\u00e9\n".encode())
    assert read_text_utf8(good) == "caf\u00e9\n"  # the BOM is encoding metadata, not text
    bad = write(tmp_path / "bad.txt", b"ok\n" * 1000 + b"caf\xe9 au lait")
    with pytest.raises(NotUTF8Error) as err:
        read_text_utf8(bad)
    assert isinstance(err.value, ValueError)
    assert (err.value.path, err.value.offset) == (bad, 3003)
    assert str(err.value).startswith(f"{bad}: not UTF-8 at byte 3003 (invalid continuation byte); convert it")
    with pytest.raises(NotUTF8Error, match="; or pass another file$"):
        read_text_utf8(bad, fix="or pass another file")


@pytest.mark.parametrize(
    "name, content, block_size",
    [
        ("empty.txt", b"", 16),
        ("one-char.txt", b"a", 16),
        ("binary.bin", bytes(range(256)) * 8, 16),
        ("short.txt", b"0123456789" * 3, 64),  # prepared completely, then too short for one window
    ],
)
def test_a_failed_preparation_leaves_no_cache_directory(tmp_path, name, content, block_size):
    # An earlier run's prepared data in the same cache is kept as it was.
    earlier = ready(make_dm(str(write(tmp_path / "good.txt", sample_text(40))), tmp_path, tokenizer="char"))
    before = {p: p.stat().st_mtime_ns for p in earlier._dir.iterdir()}
    dm = make_dm(str(write(tmp_path / name, content)), tmp_path, tokenizer="char", block_size=block_size)
    with pytest.raises(ValueError):
        dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [earlier._dir.name]
    assert {p: p.stat().st_mtime_ns for p in earlier._dir.iterdir()} == before

    # A cache directory made by this attempt alone goes too.
    alone = make_dm(str(tmp_path / name), tmp_path / "other", tokenizer="char", block_size=block_size)
    with pytest.raises(ValueError):
        alone.prepare_data()
    assert not (tmp_path / "other").exists()


def test_a_prepared_directory_that_existed_is_not_removed_on_failure(tmp_path):
    """A directory this attempt did not create (an interrupted earlier attempt, a user's files) stays."""
    dm = make_dm(str(write(tmp_path / "one-char.txt", "a")), tmp_path, tokenizer="char")
    target = dm._locate()[0]
    write(target / "notes.txt", "mine\n")
    with pytest.raises(ValueError, match="too few to split"):
        dm.prepare_data()
    assert (target / "notes.txt").read_text() == "mine\n"


def test_token_files_are_read_after_the_prepared_directory_moves(tmp_path):
    """Both splits are opened by setup(): a run keeps reading them when the cache is moved or deleted."""
    dm = ready(make_dm(str(write(tmp_path / "c.txt", sample_text(60))), tmp_path, tokenizer="char"))
    train_tokens, val_tokens = read_split(dm, "train"), read_split(dm, "val")
    moved = tmp_path / "moved"
    shutil.move(str(dm._dir), moved)
    x, y = dm.train_dataset[3]
    offsets = dm.train_dataset.offsets(3).numpy()
    assert np.array_equal(x.numpy(), np.stack([train_tokens[o : o + 16] for o in offsets]))
    xv, yv = next(iter(dm.val_dataloader()))
    assert np.array_equal(xv[0].numpy(), val_tokens[:16]) and np.array_equal(yv[0].numpy(), val_tokens[1:17])
    shutil.rmtree(moved)
    assert dm.val_dataset[1][0].shape == (16,)


def test_setup_without_the_prepared_directory_is_a_data_error(tmp_path):
    dm = ready(make_dm(str(write(tmp_path / "c.txt", sample_text(40))), tmp_path, tokenizer="char"))
    shutil.rmtree(dm._dir)
    again = make_dm(str(tmp_path / "c.txt"), tmp_path, tokenizer="char")
    with pytest.raises(ValueError) as err:
        again.setup("fit")
    message = str(err.value)
    assert message.startswith(f"data: the prepared data directory {dm._dir} is missing") and "\n" not in message
    assert "prepare_data()" in message
