"""agx's data against megatron-core itself (its Python readers and writers and its compiled helpers):
the files are interchangeable both ways and a split's samples are the very ones Megatron draws.

Stack-independent, so CI runs this file on the newest stack only: torch and megatron-core are the
same releases on both stacks, and the agx modules compared with them import none of the packages
the `xpu` pins change (the first test checks it); numpy is pinned below 2 there."""

import types
import warnings

import numpy as np
import pytest
from conftest import STACK_PACKAGES, agx_imports

from agx.data.gpt_samples import GPTSamples, split_ranges
from agx.data.indexed import IndexedDataset, IndexedDatasetBuilder

pytestmark = pytest.mark.stack_independent


@pytest.fixture(scope="module")
def mt():
    """torch and megatron-core, imported when a test here runs: at module level every pytest-xdist
    worker spent 8 s importing them while collecting, and the xpu run, which leaves this file out,
    did so too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns that Apex and Transformer Engine are absent
        import torch
        from megatron.core.datasets import indexed_dataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    return types.SimpleNamespace(torch=torch, indexed=indexed_dataset, Builder=BlendedMegatronDatasetBuilder,
                                 GPTDataset=GPTDataset, GPTDatasetConfig=GPTDatasetConfig)


def test_the_modules_under_test_import_nothing_that_differs_between_the_stacks():
    assert not STACK_PACKAGES & (agx_imports("agx.data.gpt_samples") | agx_imports("agx.data.indexed"))


def documents(seed, count=60, vocab=50000):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, vocab, rng.integers(1, 70)), 0) for _ in range(count)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_files_written_by_agx_load_in_megatron(mt, tmp_path, dtype):
    docs = documents(0)
    with IndexedDatasetBuilder(tmp_path / "agx", dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
    theirs = mt.indexed.IndexedDataset(str(tmp_path / "agx"))
    assert len(theirs) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], doc)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))


def test_files_written_by_megatron_load_in_agx(mt, tmp_path):
    docs = documents(1)
    builder = mt.indexed.IndexedDatasetBuilder(str(tmp_path / "mt.bin"), dtype=np.uint16)
    for doc in docs[:30]:
        builder.add_item(mt.torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.add_document(mt.torch.from_numpy(np.concatenate(docs[30:32]).astype(np.int64)), [len(docs[30]), len(docs[31])])
    builder.finalize(str(tmp_path / "mt.idx"))
    ours = IndexedDataset(tmp_path / "mt")
    assert len(ours) == 32 and ours.document_indices.tolist() == list(range(31)) + [32]
    for i in range(32):
        np.testing.assert_array_equal(ours[i], docs[i])


class Tokenizer:  # what GPTDatasetConfig reads of a tokenizer
    vocab_size, eod, pad = 50000, 0, 0
    unique_identifiers = {"class": "Tokenizer"}


@pytest.mark.parametrize("seed,seq_len,split,num_samples", [(1234, 16, "90,5,5", 150), (7, 37, "969,30,1", 900),
                                                            (0, 64, "100,0,0", 40)])
def test_samples_are_megatrons(mt, tmp_path, seed, seq_len, split, num_samples):
    docs = documents(seed, count=80)
    with IndexedDatasetBuilder(tmp_path / "d") as builder:
        for doc in docs:
            builder.add_document(doc)
    config = mt.GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=([str(tmp_path / "d")], None),
                              split=split, path_to_cache=None, tokenizer=Tokenizer(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, mid_level_dataset_surplus=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mt.Builder(mt.GPTDataset, [num_samples, None, None], lambda: True, config).build()[0]
    ours = GPTSamples(IndexedDataset(tmp_path / "d"), split_ranges(split, len(docs))[0], seq_len, num_samples, seed,
                      str(tmp_path / "cache"))
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == len(theirs)
    for i in range(len(theirs)):
        sample = theirs[i]
        np.testing.assert_array_equal(ours[i][:-1], sample["tokens"].numpy())
        np.testing.assert_array_equal(ours[i][1:], sample["labels"].numpy())
