"""The data pipeline against straightforward references: indexed files, samples, blending, errors.

Stack-independent, so CI runs this file on the newest stack only: the modules it tests build their
indices with numpy alone and import none of the packages the `xpu` pins change (the first test
checks it). numpy itself is pinned below 2 there; on that stack the same modules build the samples
of every `agx.train` run the other tests make."""

import struct

import numpy as np
import pytest
from conftest import STACK_PACKAGES, agx_imports

from agx.data.blend import BlendedSamples, blending_indices, parse_sources
from agx.data.gpt_samples import SEPARATE_FINAL_EPOCH_BELOW, GPTSamples, split_ranges
from agx.data.indexed import IndexedDataset, IndexedDatasetBuilder, token_dtype
from agx.errors import UserError

pytestmark = pytest.mark.stack_independent
UNDER_TEST = ("agx.data.blend", "agx.data.gpt_samples", "agx.data.indexed", "agx.errors")


def test_the_modules_under_test_import_nothing_that_differs_between_the_stacks():
    assert not STACK_PACKAGES & set().union(*map(agx_imports, UNDER_TEST))


def random_documents(rng, count, max_len=40, vocab=1000):
    return [np.append(rng.integers(1, vocab, rng.integers(0, max_len)), 0) for _ in range(count)]


def write_dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_document(doc)
    return IndexedDataset(prefix)


def test_round_trip_in_both_token_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    for vocab in (50257, 128256):
        docs = random_documents(rng, 50, vocab=vocab)
        ds = write_dataset(tmp_path / f"v{vocab}", docs, token_dtype(vocab))
        assert ds.dtype == (np.uint16 if vocab < 65500 else np.int32)
        assert len(ds) == 50 and ds.num_tokens == sum(map(len, docs))
        for got, want in zip(ds, docs):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds.document_indices, np.arange(51))
        assert isinstance(ds[3].base, (np.memmap, memoryview, np.ndarray)) and not ds[3].flags.owndata  # zero copy
    assert token_dtype(65499) == np.uint16 and token_dtype(None) == np.int32


def test_multi_sequence_documents_and_bulk_appends(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.int32) as b:
        b.add_sequences([np.array([1, 2]), np.array([3])])
        b.add_documents(np.array([4, 5, 6, 7]), np.array([3, 1]))
    ds = IndexedDataset(tmp_path / "d")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6], [7]]
    assert ds.document_indices.tolist() == [0, 2, 3, 4]
    np.testing.assert_array_equal(ds.sequence_pointers, [0, 8, 12, 24])


def hand_made(tmp_path, magic=b"MMIDIDX\x00\x00", version=1, code=8, truncate_bin=0):
    """A dataset written from the published layout with struct and numpy, not with agx's builder."""
    lengths = np.array([3, 1, 4], np.int32)
    pointers = np.array([0, 6, 8], np.int64)
    documents = np.array([0, 2, 3], np.int64)
    (tmp_path / "h.idx").write_bytes(magic + struct.pack("<Q", version) + struct.pack("<B", code)
                                     + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                                     + lengths.tobytes() + pointers.tobytes() + documents.tobytes())
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17], np.uint16).tobytes()
    (tmp_path / "h.bin").write_bytes(tokens[:len(tokens) - truncate_bin])
    return str(tmp_path / "h")


def test_hand_made_megatron_files_read_correctly(tmp_path):
    ds = IndexedDataset(hand_made(tmp_path))
    assert [ds[i].tolist() for i in range(3)] == [[10, 11, 12], [13], [14, 15, 16, 17]]
    assert ds.document_indices.tolist() == [0, 2, 3] and ds.dtype == np.uint16
    assert ds.get(2, offset=1, length=2).tolist() == [15, 16]


@pytest.mark.parametrize("kwargs,message", [
    ({"magic": b"NOTMMIDX\x00"}, "not a Megatron indexed dataset"),
    ({"version": 2}, "index version 2"),
    ({"code": 9}, "unknown dtype code 9"),
    ({"truncate_bin": 2}, "h.bin: truncated"),
])
def test_corrupt_files_are_named_in_the_error(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        IndexedDataset(hand_made(tmp_path, **kwargs))
    assert str(tmp_path / "h") in str(error.value)


def test_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "x") as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def reference_samples(docs, documents, seq_len, num_samples, seed):
    """Megatron's sampling written plainly: shuffle the documents of every epoch (the last one apart
    when it is needed for under 80% of its samples), concatenate their tokens, cut windows of
    seq_len + 1 that overlap by one, and shuffle the windows (again keeping the last epoch's apart)."""
    rng = np.random.RandomState(seed)
    per_epoch = sum(len(docs[d]) for d in range(*documents))
    epochs = 1
    while epochs * per_epoch < num_samples * seq_len + 1:
        epochs += 1
    before_last = ((epochs - 1) * per_epoch - 1) // seq_len
    separate = epochs > 1 and num_samples - before_last < int(SEPARATE_FINAL_EPOCH_BELOW * ((per_epoch - 1) // seq_len))
    order = []
    for group in ([epochs - 1, 1] if separate else [epochs]):
        ids = np.array([d for _ in range(group) for d in range(*documents)], np.int32)
        rng.shuffle(ids)
        order += ids.tolist()
    stream = np.concatenate([docs[d] for d in order])
    windows = [stream[k * seq_len:k * seq_len + seq_len + 1] for k in range((len(stream) - 1) // seq_len)]
    first = np.arange(before_last if separate else len(windows))
    rng.shuffle(first)
    last = np.arange(len(first), len(windows))
    rng.shuffle(last)
    return [windows[k] for k in np.concatenate([first, last]).astype(int)]


@pytest.mark.parametrize("seed,seq_len,num_samples", [(0, 8, 10), (1, 16, 200), (2, 5, 450), (3, 64, 30)])
def test_samples_equal_the_reference(tmp_path, seed, seq_len, num_samples):
    rng = np.random.default_rng(seed)
    docs = random_documents(rng, 30)
    ds = write_dataset(tmp_path / "d", docs)
    documents = split_ranges("80,20,0", len(ds))[0]
    samples = GPTSamples(ds, documents, seq_len, num_samples, seed, str(tmp_path / "cache"))
    want = reference_samples(docs, documents, seq_len, num_samples, seed)
    assert len(samples) == len(want) >= num_samples
    for i in range(len(want)):
        np.testing.assert_array_equal(samples[i], want[i])
    # Cached: a second build reads the same arrays from disk.
    again = GPTSamples(ds, documents, seq_len, num_samples, seed, str(tmp_path / "cache"))
    assert isinstance(again.shuffle_index, np.memmap)
    np.testing.assert_array_equal(again.shuffle_index, samples.shuffle_index)


def test_split_ranges_follow_megatron():
    assert split_ranges("990,10,0", 1000) == [(0, 990), (990, 1000), (1000, 1000)]
    assert split_ranges("98,2", 7) == [(0, 7), (7, 7), (7, 7)]
    assert split_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]  # Megatron shifts every bound by the shortfall


SKEWED = np.random.default_rng(7).random(40) ** 4 + 1e-3


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.7, 0.2, 0.05, 0.05], [1 / 3] * 3, [1.0],
                                     SKEWED / SKEWED.sum()])
def test_blend_is_within_one_sample_of_the_weights_at_every_prefix(weights):
    weights = np.asarray(weights)
    dataset_index, sample_index = blending_indices(weights, 3000)
    counts = np.zeros(len(weights), int)
    bound = 1 - 1 / (2 * len(weights) - 2) if len(weights) > 1 else 0
    for n, (d, s) in enumerate(zip(dataset_index, sample_index), 1):
        assert s == counts[d]  # each dataset's samples are taken in order
        counts[d] += 1
        assert np.all(np.abs(counts - n * weights) <= bound + 1e-9), (n, counts)


def write_blend(tmp_path, n=3):
    rng = np.random.default_rng(5)
    prefixes = []
    for k in range(n):
        write_dataset(tmp_path / f"ds{k}", [np.full(rng.integers(5, 30), k + 1) for _ in range(20)])
        prefixes.append(str(tmp_path / f"ds{k}"))
    return prefixes


def test_blended_samples_come_from_the_chosen_dataset(tmp_path):
    prefixes = write_blend(tmp_path)
    (tmp_path / "list.txt").write_text(f"# weight prefix corpus\n2 {prefixes[0]} a\n1 ds1 b\n1 {prefixes[2]} a\n")
    sources = parse_sources(str(tmp_path / "list.txt"))
    assert [s.weight for s in sources] == [2, 1, 1] and sources[1].prefix == prefixes[1]
    blend = BlendedSamples(sources, "100,0,0", 0, 8, 400, 0, str(tmp_path / "cache"))
    # Every document of dataset k is the token k + 1: each sample shows where it came from.
    origin = [set(blend[i].tolist()) for i in range(400)]
    assert all(len(o) == 1 for o in origin)
    counts = np.bincount([o.pop() - 1 for o in origin])
    np.testing.assert_allclose(counts, [200, 100, 100], atol=1)
    assert parse_sources(f"2 {prefixes[0]} 1 {prefixes[1]}")[0].weight == 2


@pytest.mark.parametrize("text,message", [
    ("0 {p}", "weight 0 must be positive"),
    ("-1 {p}", "weight -1 must be positive"),
    ("heavy {p}", "weight 'heavy' is not a number"),
    ("1 {p}\n1 {d}/missing corpus", "list.txt:2: dataset .*missing is missing"),
    ("1 {p} corpus extra", "list.txt:1: expected 'weight prefix \\[corpus\\]'"),
])
def test_bad_data_file_lists_name_the_line(tmp_path, text, message):
    prefix = write_blend(tmp_path, 1)[0]
    (tmp_path / "list.txt").write_text(text.format(p=prefix, d=tmp_path))
    with pytest.raises(UserError, match=message):
        parse_sources(str(tmp_path / "list.txt"))


def test_empty_dataset_and_out_of_vocabulary_tokens_are_named(tmp_path):
    empty = write_dataset(tmp_path / "empty", [])
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'}.*empty dataset"):
        GPTSamples(empty, (0, 0), 8, 10, 0, str(tmp_path / "cache"))
    big = write_dataset(tmp_path / "big", [np.array([1, 2, 3000, 4] * 10)])
    samples = GPTSamples(big, (0, 1), 8, 3, 0, str(tmp_path / "cache"), vocab_size=2048)
    with pytest.raises(UserError, match=f"{tmp_path / 'big'}.bin: token id 3000 is outside"):
        samples[0]
