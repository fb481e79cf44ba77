"""Token + position embedding lookup: out[t] = wte[input_ids[t]] + wpe[position_ids[t]].

One program per (token, block of BLOCK_H hidden features): it reads the two table rows, adds them in fp32 and
stores the sum in the output dtype. The tables may be stored in fp32 while the model computes in fp16/bf16: the
cast happens in the kernel, so no converted copy of the (large) word table is ever made.
Indices are not range-checked on the device (that would need a host sync); the launcher checks shapes and dtypes.
Positions past the position table read its last row instead of memory beyond it: a captured decode step embeds its
tokens at the position after theirs, which for the last position of the table is never fed to the model (and the
capture's warm-up step runs on whatever state is loaded).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_BLOCK_H = 1024


@triton.jit
def _embedding_kernel(
    ids_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr,
    H, P,  # hidden size, rows of the position table
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    # row offsets in int64: V * H exceeds 2**31 for large vocabularies at large hidden sizes
    word_row = tl.load(ids_ptr + token).to(tl.int64) * H
    pos_row = tl.minimum(tl.load(pos_ptr + token).to(tl.int64), P - 1) * H
    word = tl.load(wte_ptr + word_row + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    pos = tl.load(wpe_ptr + pos_row + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    out_row = token.to(tl.int64) * H
    tl.store(out_ptr + out_row + offs_h, (word + pos).to(out_ptr.dtype.element_ty), mask=h_mask)


def _check_index(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D [T], got shape {tuple(ids.shape)}")
    if ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {ids.dtype}")


def _check_table(name: str, table: torch.Tensor) -> None:
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(table.shape)}")
    if table.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {table.dtype}")
    if not table.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(table.shape)}, stride {table.stride()})")


def embedding(input_ids: torch.Tensor, position_ids: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
              out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T,) ids and positions, wte (V, H), wpe (P, H) -> (T, H) in out_dtype (default wte.dtype); with out, a
    contiguous (T, H) tensor (its dtype the output's), written in place and returned."""
    _check_index("input_ids", input_ids)
    _check_index("position_ids", position_ids)
    _check_table("wte", wte)
    _check_table("wpe", wpe)
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wpe hidden size {wpe.shape[1]} != wte hidden size {wte.shape[1]}")
    if wpe.dtype != wte.dtype:
        raise ValueError(f"wpe dtype {wpe.dtype} != wte dtype {wte.dtype}")
    out_dtype = (out.dtype if out is not None else wte.dtype) if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be fp32/fp16/bf16, got {out_dtype}")
    for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("wpe", wpe)):
        if t.device != wte.device:
            raise ValueError(f"{name} is on {t.device}, wte on {wte.device}")

    (T,) = input_ids.shape
    H = wte.shape[1]
    if out is None:
        out = torch.empty((T, H), dtype=out_dtype, device=wte.device)
    elif (tuple(out.shape) != (T, H) or out.dtype != out_dtype or not out.is_contiguous()
          or out.device != wte.device):
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {(T, H)} on {wte.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if T == 0 or H == 0:
        return out
    # ids/positions may be non-contiguous 1-D views (e.g. a column of a [B, S] tensor): the kernel indexes densely
    input_ids = input_ids.contiguous()
    position_ids = position_ids.contiguous()
    block_h = min(triton.next_power_of_2(H), _MAX_BLOCK_H)
    num_warps = max(1, min(4, block_h // 256))
    grid = (T, triton.cdiv(H, block_h))
    _embedding_kernel[grid](input_ids, position_ids, wte, wpe, out, H, wpe.shape[0], BLOCK_H=block_h,
                            num_warps=num_warps)
    return out


def embedding_reference(input_ids: torch.Tensor, position_ids: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor,
                        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    out_dtype = wte.dtype if out_dtype is None else out_dtype
    summed = wte[input_ids.long()].float() + wpe[position_ids.long()].float()
    return summed.to(out_dtype)


def _benchmark() -> None:
    from ._bench import save_rows

    from triton.testing import do_bench

    rows = []
    print(f"{'T':>6} {'H':>6} {'table':>6} {'out':>6} {'triton us':>10} {'torch us':>9} {'GB/s':>8}")
    for H, V, P in ((1024, 50257, 1024), (2048, 50257, 2048), (4096, 50257, 2048)):
        for table_dtype, out_dtype in ((torch.float16, torch.float16), (torch.float32, torch.float16)):
            wte = torch.randn(V, H, device="cuda", dtype=table_dtype)
            wpe = torch.randn(P, H, device="cuda", dtype=table_dtype)
            for T in (1, 64, 4096):
                ids = torch.randint(0, V, (T,), device="cuda")
                pos = torch.randint(0, P, (T,), device="cuda")
                t_tri = do_bench(lambda: embedding(ids, pos, wte, wpe, out_dtype)) * 1e3
                t_ref = do_bench(lambda: embedding_reference(ids, pos, wte, wpe, out_dtype)) * 1e3
                moved = T * H * (2 * wte.element_size() + torch.finfo(out_dtype).bits // 8)
                gbps = moved / (t_tri * 1e-6) / 1e9
                tname, oname = str(table_dtype)[6:], str(out_dtype)[6:]
                print(f"{T:>6} {H:>6} {tname:>6} {oname:>6} {t_tri:>10.2f} {t_ref:>9.2f} {gbps:>8.0f}")
                rows.append(dict(T=T, H=H, table=tname, out=oname, triton_us=t_tri, torch_us=t_ref, gbps=gbps))
    save_rows(rows, "embedding_bench.csv")


if __name__ == "__main__":
    _benchmark()
