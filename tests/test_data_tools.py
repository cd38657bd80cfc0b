"""The data tools as users run them: train a tokenizer, preprocess jsonl, train on the result."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import TINY, agx_train, env_for, sets

from agx.data.indexed import IndexedDataset
from agx.data.tokenizer import Tokenizer

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name, *args):
    return subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=300)


def write_jsonl(path, texts, key="content"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_tokenizer_preprocessing_and_training_on_user_data(tmp_path):
    source = Path(json.__file__).parent  # the json package's own source: real text, a few files
    texts = [p.read_text() for p in sorted(source.glob("*.py"))] * 3
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    result = tool("train_tokenizer.py", "--input", str(corpus), "--json-key", "content", "--vocab-size", "600",
                  "--output", str(tmp_path / "tok" / "tokenizer.json"))
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer(tmp_path / "tok")
    assert tokenizer.vocab_size == 600 and tokenizer.eod == 0

    result = tool("preprocess_data.py", "--input", str(corpus), "--json-key", "content", "--tokenizer",
                  str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "data" / "json"), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "tokenizing" in result.stderr  # the report and the progress bar
    dataset = IndexedDataset(tmp_path / "data" / "json")
    assert dataset.dtype == np.uint16 and len(dataset) == len(texts)
    for i in (0, len(texts) - 1):  # each document decodes to its text, then the end-of-document token
        assert dataset[i][-1] == tokenizer.eod and tokenizer.decode(dataset[i][:-1]) == texts[i]

    result = agx_train(*TINY, *sets("train.steps=3", "model.vocab_size=640", "data.split=90,10,0",
                                    f"data.paths=1 {tmp_path / 'data' / 'json'}", f"data.tokenizer={tmp_path / 'tok'}"),
                       "--workdir", str(tmp_path / "run"), env=env_for(8))
    assert result.returncode == 0, result.stderr
    assert sum('"event"' not in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_interrupted_preprocessing_leaves_nothing(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", ["fine text"] * 5000, key="text")
    with open(corpus, "a") as f:
        f.write("{not json\n")
    result = tool("preprocess_data.py", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer(tmp_path)),
                  "--output-prefix", str(tmp_path / "out" / "x"), "--workers", "2", "--no-progress")
    assert result.returncode == 2 and f"{corpus}:5001: not valid JSON" in result.stderr
    assert not list((tmp_path / "out").glob("*"))


def tiny_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("some text to learn from " * 50)
    tool("train_tokenizer.py", "--input", str(tmp_path / "t.txt"), "--vocab-size", "300",
         "--output", str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_bad_data_gets_one_line_naming_the_file(tmp_path):
    from agx.data.indexed import IndexedDatasetBuilder

    with IndexedDatasetBuilder(tmp_path / "wide", np.int32) as builder:
        builder.add_document(np.arange(5000))
    (tmp_path / "list.txt").write_text(f"1 {tmp_path / 'wide'} web\n0.5 {tmp_path / 'gone'} web\n")
    for paths, eval_every, message in [
            (str(tmp_path / "wide"), 0, f"{tmp_path / 'wide'}.bin: token id"),
            (str(tmp_path / "list.txt"), 0, f"{tmp_path / 'list.txt'}:2: dataset"),
            (str(tmp_path / "wide"), 50, "data.split=100,0,0 leaves no validation documents")]:
        result = agx_train(*TINY, *sets("train.steps=2", f"data.paths={paths}", "data.split=100,0,0",
                                        f"eval.every={eval_every}"), "--workdir", str(tmp_path / "run"),
                           env=env_for(8))
        errors = [line for line in result.stderr.splitlines() if line.startswith("agx: error: ")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
