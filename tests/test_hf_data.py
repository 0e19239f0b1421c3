"""Arrow-backed data: ``.parquet`` files in ``data=text`` and Hugging Face ``datasets`` (``data=hf``).

The reference for every prepared split is the test's own list of documents, joined with
``<|endoftext|>`` and cut at the character split point: the token files must decode back to it.
Only local datasets are used (no network).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, compose_cfg, tiny_run

pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from datasets import Dataset, DatasetDict

from mqa_lm.data import EOT, DataConfig, hf_data
from mqa_lm.data.store import read_json, split_paths
from mqa_lm.training import TextDataModule
from mqa_lm.training.config import ConfigError, validate_config
from mqa_lm.training.run import train

os.environ.setdefault("PROJECT_ROOT", str(ROOT))
WORDS = "the quick brown fox jumps over a lazy dog while query key value heads attend".split()


def documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 30)))) + ".\n" for _ in range(count)]


def make_dm(tmp_path: Path, **fields) -> TextDataModule:
    base = dict(cache_dir=str(tmp_path / "cache"), tokenizer="char", block_size=16, batch_size=4, val_fraction=0.1)
    return TextDataModule(**{**base, **fields})


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decoded(dm: TextDataModule) -> str:
    """Both splits' tokens, read from disk and decoded, concatenated."""
    out = []
    for split in ("train", "val"):
        meta = read_json(split_paths(dm._dir, split)[1])
        out.append(dm.decode(np.fromfile(dm._dir / f"{split}.bin", dtype=meta["dtype"]).tolist()))
    return "".join(out)


def train_reference(docs: list[str], val_fraction: float = 0.1) -> str:
    """The train split: the first ``1 - val_fraction`` of the documents' characters, separators between."""
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    pieces = []
    for doc in docs:
        if cut <= 0:
            break
        pieces.append(doc[:cut])
        cut -= len(doc)
    return EOT.join(pieces)


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A DatasetDict saved with save_to_disk: two splits, a text column, a body column and a number."""
    splits = {"train": documents(120, 0), "validation": documents(60, 1)}
    DatasetDict(
        {
            name: Dataset.from_dict({"text": docs, "body": [d.upper() for d in docs], "n": list(range(len(docs)))})
            for name, docs in splits.items()
        }
    ).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", splits


# ---- what is read -------------------------------------------------------------------------------


def test_parquet_in_data_paths_reads_the_jsonl_field_column(tmp_path):
    docs = documents(80, 2)
    table = {"content": docs[:40] + [None, ""] + docs[40:], "id": list(range(82))}  # nulls and "" add nothing
    Dataset.from_dict(table).to_parquet(str(tmp_path / "docs.parquet"))
    dm = ready(make_dm(tmp_path, paths=[str(tmp_path / "docs.parquet")], jsonl_field="content"))
    assert decoded(dm) == EOT.join(docs)
    with pytest.raises(ValueError, match=r"has no 'text' column \(it has: \['content', 'id'\]\); set data.jsonl_field"):
        make_dm(tmp_path, paths=[str(tmp_path / "docs.parquet")]).prepare_data()
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet is not a readable Parquet file"):
        make_dm(tmp_path, paths=[str(tmp_path / "fake.parquet")]).prepare_data()


@pytest.mark.parametrize("split, field", [("train", "text"), ("validation", "text"), ("train", "body")])
def test_saved_dataset_split_and_field_are_what_is_tokenized(tmp_path, saved, split, field):
    path, splits = saved
    dm = ready(make_dm(tmp_path, name=str(path), split=split, text_field=field))
    want = EOT.join(d.upper() if field == "body" else d for d in splits[split])
    text = decoded(dm)
    assert text == want
    docs = [d.upper() if field == "body" else d for d in splits[split]]
    assert dm.decode(dm._splits["train"].array[:].tolist()) == train_reference(docs)


@pytest.mark.parametrize("streaming", [False, True])
def test_local_data_files_through_load_dataset(tmp_path, streaming):
    docs = documents(50, 3)
    Dataset.from_dict({"text": docs}).to_json(str(tmp_path / "docs.jsonl"))
    dm = ready(make_dm(tmp_path, name=str(tmp_path / "docs.jsonl"), streaming=streaming))
    assert decoded(dm) == EOT.join(docs)
    if not streaming:  # the Arrow conversion stays inside data.cache_dir
        assert list((tmp_path / "cache" / "hf-datasets").rglob("*.arrow"))


# ---- cache --------------------------------------------------------------------------------------


def test_cache_is_reused_and_follows_data_split_and_field(tmp_path, saved):
    path, splits = saved
    dm = ready(make_dm(tmp_path, name=str(path)))
    directory = dm._dir
    before = mtimes(directory)
    again = ready(make_dm(tmp_path, name=str(path)))
    assert again._dir == directory and mtimes(directory) == before  # nothing rewritten

    other_split = ready(make_dm(tmp_path, name=str(path), split="validation"))
    other_field = ready(make_dm(tmp_path, name=str(path), text_field="body"))
    assert len({directory, other_split._dir, other_field._dir}) == 3
    assert mtimes(directory) == before

    # New data saved over the same directory: a new key, and the new text.
    changed = documents(120, 7)
    DatasetDict({"train": Dataset.from_dict({"text": changed})}).save_to_disk(str(tmp_path / "saved2"))
    import shutil

    shutil.rmtree(path)
    shutil.move(str(tmp_path / "saved2"), str(path))
    rebuilt = ready(make_dm(tmp_path, name=str(path)))
    assert rebuilt._dir != directory and decoded(rebuilt) == EOT.join(changed)


# ---- errors -------------------------------------------------------------------------------------


def test_bad_hf_settings_are_one_clear_error(tmp_path, saved, monkeypatch):
    path, _ = saved
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"unknown data.split 'test': .* has splits \['train', 'validation'\]"):
        DataConfig(name=str(path), split="test", cache_dir=cache)
    columns = r"\(it has: \['text', 'body', 'n'\]\)"
    with pytest.raises(ValueError, match=rf"data.text_field='content' is not a column of .* {columns}"):
        DataConfig(name=str(path), text_field="content", cache_dir=cache)
    with pytest.raises(ValueError, match="data.paths=.* and data.name=.* both name the data"):
        DataConfig(name=str(path), paths=["x.txt"], cache_dir=cache)
    with pytest.raises(ValueError, match=r"data.split='train' is only used with a Hugging Face dataset \(data=hf"):
        DataConfig(paths=["x.txt"], split="train")
    with pytest.raises(ValueError, match="data.text_field='body' is only used .* use data.jsonl_field"):
        DataConfig(paths=["x.txt"], text_field="body")
    with pytest.raises(TypeError, match="data.streaming must be true or false"):
        DataConfig(name=str(path), streaming="yes", cache_dir=cache)
    one = tmp_path / "one"
    Dataset.from_dict({"text": ["a b c"]}).save_to_disk(str(one))
    with pytest.raises(ValueError, match=r"unknown data.split 'validation': .* has splits \['train'\]"):
        DataConfig(name=str(one), split="validation", cache_dir=cache)
    Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(ValueError, match=r"unknown data.split 'test': .*one.parquet.*\['train'\]"):
        DataConfig(name=str(tmp_path / "one.parquet"), split="test", cache_dir=cache)
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"data.name=.*x.bin.* is a .bin file; data=hf reads .parquet"):
        DataConfig(name=str(tmp_path / "x.bin"), cache_dir=cache)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    hf_data._load.cache_clear()
    with pytest.raises(ValueError, match=r'needs the Hugging Face `datasets` package: pip install -e "\.\[hf\]"'):
        DataConfig(name=str(path), cache_dir=cache)


# ---- train.py -----------------------------------------------------------------------------------


def run_overrides(tmp_path: Path, *data: str) -> list[str]:
    return [
        *data,
        *tiny_run(tmp_path / "cache", n_layers=1),
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks=none",
        f"paths.output_dir={tmp_path / 'run'}",
        "sample.max_new_tokens=4",
    ]


def test_train_a_few_steps_from_parquet_and_from_a_saved_dataset(tmp_path, saved):
    path, _ = saved
    Dataset.from_dict({"text": documents(120, 4)}).to_parquet(str(tmp_path / "train.parquet"))
    parquet = train(compose_cfg(run_overrides(tmp_path, "data=text", f"data.paths=[{tmp_path / 'train.parquet'}]")))
    hf = train(
        compose_cfg(
            run_overrides(
                tmp_path / "hf", "data=hf", f"data.name={path}", "data.split=validation", "data.text_field=body"
            )
        )
    )
    for metrics in (parquet, hf):
        assert np.isfinite(float(metrics["val/loss"])) and float(metrics["val/loss"]) > 0
    with pytest.raises(ConfigError, match=r"no data source: set data.paths=.* \(data=text\) or data.name="):
        validate_config(compose_cfg(run_overrides(tmp_path, "data=hf")))
    with pytest.raises(ConfigError, match="data.text_field='content' is not a column"):
        validate_config(compose_cfg(run_overrides(tmp_path, "data=hf", f"data.name={path}", "data.text_field=content")))
