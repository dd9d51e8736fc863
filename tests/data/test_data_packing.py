"""Packing: exact rows for hand-made documents, transition coverage, and checkpointed resume."""
import grain
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsv3_jax.data import FIELDS, PackIterDataset, build_row, pack_documents, stack_rows

PAD = 99
A, B, C, D = [10, 11, 12], [20, 21], list(range(30, 40)), [40, 41, 42, 43, 44]


def _rows(docs, seq_len=6, mask=True):
    return stack_rows(list(pack_documents([np.array(d) for d in docs], seq_len, pad_id=PAD, mask_documents=mask)))


def test_pack_exact_rows_with_masking():
    # seq_len 6 → rows of 7 tokens. A and B fit; C (10 > 7) is split: its first piece fills row 1, each
    # continuation repeats the previous piece's last token; D does not fit row 3's free space but fits an
    # empty row, so row 3 is padded and D starts row 4 (the last row, padded).
    r = _rows([A, B, C, D])
    np.testing.assert_array_equal(r["inputs"], [[10, 11, 12, 20, 21, 30],
                                                [31, 32, 33, 34, 35, 36],
                                                [37, 38, 39, PAD, PAD, PAD],
                                                [40, 41, 42, 43, 44, PAD]])
    np.testing.assert_array_equal(r["targets"], [[11, 12, 20, 21, 30, 31],
                                                 [32, 33, 34, 35, 36, 37],
                                                 [38, 39, PAD, PAD, PAD, PAD],
                                                 [41, 42, 43, 44, PAD, PAD]])
    np.testing.assert_array_equal(r["segment_ids"], [[1, 1, 1, 2, 2, 3],
                                                     [1, 1, 1, 1, 1, 1],
                                                     [1, 1, 1, 0, 0, 0],
                                                     [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(r["positions"], [[0, 1, 2, 0, 1, 0],
                                                   [0, 1, 2, 3, 4, 5],
                                                   [0, 1, 2, 0, 0, 0],
                                                   [0, 1, 2, 3, 4, 0]])
    # The last token of a document never predicts the next document's first token; padding never a target.
    np.testing.assert_array_equal(r["loss_mask"], [[1, 1, 0, 1, 0, 1],
                                                   [1, 1, 1, 1, 1, 1],
                                                   [1, 1, 0, 0, 0, 0],
                                                   [1, 1, 1, 1, 0, 0]])
    for k in FIELDS:
        assert r[k].dtype == np.int32 and r[k].shape == (4, 6)


def test_pack_exact_rows_without_masking():
    r = _rows([A, B, C, D], mask=False)
    np.testing.assert_array_equal(r["inputs"], _rows([A, B, C, D])["inputs"])   # same layout
    np.testing.assert_array_equal(r["segment_ids"], [[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(r["positions"], np.tile(np.arange(6), (4, 1)))
    np.testing.assert_array_equal(r["loss_mask"], [[1] * 6, [1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])


def test_pack_edge_cases():
    # A document of exactly seq_len + 1 tokens fills one row; empty documents are skipped.
    r = _rows([[], list(range(1, 8)), [5]], seq_len=6)
    np.testing.assert_array_equal(r["inputs"], [[1, 2, 3, 4, 5, 6], [5, PAD, PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(r["loss_mask"], [[1] * 6, [0] * 6])
    # One free slot left: the long document's first token goes there (as a target only, masked) and is
    # repeated at the start of the next row.
    r = _rows([[1, 2, 3, 4, 5, 6], list(range(10, 20))], seq_len=6)
    np.testing.assert_array_equal(r["inputs"][:2], [[1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15]])
    np.testing.assert_array_equal(r["loss_mask"][0], [1, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_documents([np.arange(3)], 0))
    with pytest.raises(AssertionError):
        build_row([np.arange(9)], 6, PAD)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12), seq_len=st.integers(1, 12),
       mask=st.booleans())
def test_every_transition_trained_exactly_once(lengths, seq_len, mask):
    docs = [1000 * (k + 1) + np.arange(n) for k, n in enumerate(lengths)]   # globally unique tokens
    r = _rows(docs, seq_len, mask)
    on = r["loss_mask"].astype(bool)
    trained = sorted(zip(r["inputs"][on].tolist(), r["targets"][on].tolist()))
    expected = [(int(d[i]), int(d[i + 1])) for d in docs for i in range(len(d) - 1)]
    within = [(a, b) for a, b in trained if a // 1000 == b // 1000]
    across = [(a, b) for a, b in trained if a // 1000 != b // 1000]
    assert within == sorted(expected)
    if mask:
        assert not across
    else:   # without masking, a document's last token predicts the next document's first token
        assert all(b // 1000 == a // 1000 + 1 and b % 1000 == 0 for a, b in across)
    assert (r["positions"] < seq_len).all()
    # Padding only at row ends; segment ids are nondecreasing 1, 2, … within a row.
    for seg in r["segment_ids"]:
        nz = seg[seg > 0]
        assert (seg[len(nz):] == 0).all() and (np.diff(nz) >= 0).all() and nz[0] == 1


def _pack_ds(docs, seq_len, mask=True):
    ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return PackIterDataset(ds, seq_len, pad_id=PAD, mask_documents=mask)


def test_pack_iter_dataset_matches_and_resumes_at_every_row():
    rng = np.random.default_rng(0)
    docs = [rng.integers(100, 200, size=n) for n in rng.integers(1, 25, size=20)]
    expected = list(pack_documents(docs, 7, pad_id=PAD))
    got = list(_pack_ds(docs, 7))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for k in FIELDS:
            np.testing.assert_array_equal(a[k], b[k])
    it = iter(_pack_ds(docs, 7))
    for k in range(len(expected) + 1):
        state = it.get_state()
        fresh = iter(_pack_ds(docs, 7))
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(expected) - k
        for a, b in zip(rest, expected[k:]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
            np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        if k < len(expected):
            next(it)
    with pytest.raises(StopIteration):
        next(it)
