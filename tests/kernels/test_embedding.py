import pytest
import torch

from ftlab.kernels.embedding import embedding, embedding_reference
from tests.util import DTYPES

# (table dtype, output dtype): tables may stay fp32 while the model runs in half precision
DTYPE_PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "bf16"),
               ("fp16", "fp32")]


def _tables(V, P, H, dtype, device):
    return torch.randn(V, H).to(dtype=dtype, device=device), torch.randn(P, H).to(dtype=dtype, device=device)


def _ids(T, V, P, index_dtype, device):
    ids = torch.randint(0, V, (T,))
    pos = torch.randint(0, P, (T,))
    ids[0], pos[-1] = V - 1, P - 1  # the last rows of both tables are reachable
    return ids.to(dtype=index_dtype, device=device), pos.to(dtype=index_dtype, device=device)


def _assert_matches(out, ref, device):
    # one fp32 add, then one rounding: bit-exact, except that the interpreter converts fp32 -> bf16 by truncation
    # (the GPU rounds to nearest), so there it may differ by one bf16 ulp
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
@pytest.mark.parametrize("H", [7, 100, 1024, 1500])
@pytest.mark.parametrize("T", [1, 13])
def test_embedding_matches_reference(T, H, pair, device):
    table_dtype, out_dtype = DTYPES[pair[0]], DTYPES[pair[1]]
    V, P = 37, 11
    wte, wpe = _tables(V, P, H, table_dtype, device)
    ids, pos = _ids(T, V, P, torch.int64, device)
    out = embedding(ids, pos, wte, wpe, out_dtype=out_dtype)
    _assert_matches(out, embedding_reference(ids, pos, wte, wpe, out_dtype=out_dtype), device)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_default_out_dtype(index_dtype, device):
    wte, wpe = _tables(50, 20, 64, torch.float16, device)
    ids, pos = _ids(7, 50, 20, index_dtype, device)
    out = embedding(ids, pos, wte, wpe)
    assert out.dtype == torch.float16
    _assert_matches(out, embedding_reference(ids, pos, wte, wpe), device)
    # the reference itself: row t is wte[ids[t]] + wpe[pos[t]]
    t = 3
    expected = (wte[ids[t].long()].float() + wpe[pos[t].long()].float()).half()
    assert torch.equal(out[t], expected)


def test_repeated_and_strided_indices(device):
    # the same token at several positions, and ids given as a non-contiguous column of a (B, S) tensor
    wte, wpe = _tables(30, 16, 40, torch.float32, device)
    grid_ids = torch.randint(0, 30, (5, 4), device=device)
    grid_ids[:, 1] = 7
    grid_pos = torch.arange(20, device=device).reshape(5, 4) % 16
    ids, pos = grid_ids[:, 1], grid_pos[:, 1]
    assert not ids.is_contiguous()
    _assert_matches(embedding(ids, pos, wte, wpe), embedding_reference(ids, pos, wte, wpe), device)


def test_empty_sequence(device):
    wte, wpe = _tables(10, 10, 8, torch.float32, device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    assert embedding(empty, empty, wte, wpe).shape == (0, 8)


def test_argument_errors(device):
    wte, wpe = _tables(10, 6, 8, torch.float32, device)
    ids, pos = _ids(4, 10, 6, torch.int64, device)
    with pytest.raises(ValueError, match="input_ids"):
        embedding(ids.float(), pos, wte, wpe)
    with pytest.raises(ValueError, match="input_ids"):
        embedding(ids.reshape(2, 2), pos, wte, wpe)
    with pytest.raises(ValueError, match="position_ids"):
        embedding(ids, pos[:3], wte, wpe)
    with pytest.raises(ValueError, match="wpe hidden size"):
        embedding(ids, pos, wte, torch.randn(6, 9, device=device))
    with pytest.raises(ValueError, match="wpe dtype"):
        embedding(ids, pos, wte, wpe.half())
    with pytest.raises(ValueError, match="wte must be contiguous"):
        embedding(ids, pos, torch.randn(8, 10, device=device).t(), wpe)
    with pytest.raises(ValueError, match="out_dtype"):
        embedding(ids, pos, wte, wpe, out_dtype=torch.int32)


def test_embedding_writes_into_out(device):
    wte = torch.randn(37, 13, device=device)
    wpe = torch.randn(11, 13, device=device)
    ids = torch.randint(0, 37, (7,), device=device)
    pos = torch.randint(0, 11, (7,), device=device)
    out = torch.full((7, 13), 5.0, dtype=torch.float16, device=device)
    assert embedding(ids, pos, wte, wpe, out=out) is out
    assert torch.equal(out, embedding_reference(ids, pos, wte, wpe, torch.float16))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        embedding(ids, pos, wte, wpe, out=out[:, :12])


def test_positions_past_the_table_read_its_last_row(device):
    # a captured decode step embeds its tokens one position ahead, which at the table's end is never fed
    wte = torch.randn(20, 16, device=device)
    wpe = torch.randn(6, 16, device=device)
    ids = torch.tensor([3, 4], device=device)
    out = embedding(ids, torch.tensor([5, 6], device=device), wte, wpe)
    assert torch.equal(out, embedding_reference(ids, torch.tensor([5, 5], device=device), wte, wpe))
