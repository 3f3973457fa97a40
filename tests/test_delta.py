from __future__ import annotations

import pytest
import torch

from kedit import delta as D


def test_compact_picks_the_smallest_exact_encoding():
    torch.manual_seed(0)
    u, v = torch.randn(64, 2), torch.randn(2, 48)
    low = D.compact(D.LowRank(u, v))
    assert isinstance(low, D.LowRank) and low.rank == 2
    full_rank = D.compact(D.LowRank(torch.randn(8, 8), torch.randn(8, 8)))
    assert isinstance(full_rank, D.Dense)  # factors bigger than the matrix
    sparse_src = torch.zeros(64, 48)
    sparse_src[3, 7], sparse_src[10, 0] = 1.5, -2.0
    sp = D.compact(sparse_src)
    assert isinstance(sp, D.Sparse) and sp.idx.tolist() == [3 * 48 + 7, 10 * 48]
    assert torch.equal(D.to_dense(sp), sparse_src)
    dense = D.compact(torch.randn(64, 48))
    assert isinstance(dense, D.Dense)


def test_round_trip_through_tensors():
    torch.manual_seed(1)
    for d in [D.Dense(torch.randn(5, 7)), D.LowRank(torch.randn(5, 1), torch.randn(1, 7)),
              D.Sparse(torch.tensor([0, 34]), torch.tensor([1.0, -1.0]), (5, 7))]:
        t = D.to_tensors("w", d)
        back = D.from_tensors("w", D.encoding_name(d), t, (5, 7))
        assert torch.equal(D.to_dense(back), D.to_dense(d))


def test_from_tensors_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError):
        D.from_tensors("w", "dense", {"w::delta": torch.zeros(3, 3)}, (5, 7))
    with pytest.raises(ValueError):
        D.from_tensors("w", "sparse", {"w::idx": torch.tensor([99]), "w::val": torch.tensor([1.0])}, (5, 7))


def test_algebra_keeps_structure_and_values():
    torch.manual_seed(2)
    a, b = D.LowRank(torch.randn(6, 1), torch.randn(1, 4)), D.LowRank(torch.randn(6, 2), torch.randn(2, 4))
    s = D.add(a, b)
    assert isinstance(s, D.LowRank) and s.rank == 3
    torch.testing.assert_close(D.to_dense(s), D.to_dense(a) + D.to_dense(b))
    x = D.Sparse(torch.tensor([1, 5]), torch.tensor([1.0, 2.0]), (2, 4))
    y = D.Sparse(torch.tensor([5, 7]), torch.tensor([3.0, 4.0]), (2, 4))
    z = D.add(x, y)
    assert isinstance(z, D.Sparse) and z.idx.tolist() == [1, 5, 7] and z.val.tolist() == [1.0, 5.0, 4.0]
    mixed = D.add(a, D.Dense(torch.ones(6, 4)))
    torch.testing.assert_close(D.to_dense(mixed), D.to_dense(a) + 1)


def test_masked_lowrank_stores_factors_and_a_bitmap_exactly():
    torch.manual_seed(2)
    u, v = torch.randn(64, 3), torch.randn(3, 45)  # 2,880 elements: not a multiple of 8 per row
    mask = torch.rand(64, 45) < 0.4
    d = D.MaskedLowRank(u, v, mask)
    dense = D.to_dense(d)
    assert torch.equal(dense, torch.where(mask, (u.double() @ v.double()).float(), torch.zeros(())))
    packed = D.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (64 * 45 + 7) // 8
    assert torch.equal(D.unpack_bits(packed, (64, 45)), mask)
    assert D.pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]
    back = D.from_tensors("w", "masked-lowrank", D.to_tensors("w", d), (64, 45))
    assert torch.equal(D.to_dense(back), dense)
    assert D.nbytes(d) == (64 * 3 + 3 * 45) * 4 + 360
    assert isinstance(D.compact(d), D.MaskedLowRank)  # smaller than its 1,152 kept elements as sparse (9 KiB)
    few = D.MaskedLowRank(u, v, torch.zeros(64, 45, dtype=torch.bool).index_put_((torch.tensor([1]), torch.tensor([2])),
                                                                                 torch.tensor(True)))
    assert isinstance(D.compact(few), D.Sparse) and torch.equal(D.to_dense(D.compact(few)), D.to_dense(few))
    with pytest.raises(ValueError):
        D.unpack_bits(packed[:-1], (64, 45))
