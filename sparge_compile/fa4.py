"""SpargeBlockMask -> FlashAttention-4's block-sparse format (``flash_attn.cute``, ``flash-attn-4``).

FA4 takes ``block_sparse_tensors=BlockSparseTensorsTorch(mask_block_cnt, mask_block_idx,
full_block_cnt, full_block_idx, ..., block_size)`` in ``flash_attn.cute.flash_attn_func``: per
(batch, query head, query block) the kept key blocks split in two lists, each an int32 count
(B, H, M) and int32 indices (B, H, M, N) packed left: *full* blocks run with no per-element mask
(sequence ends aside), *partial* ("mask") blocks get the per-element masking (the causal mask
when ``causal=True``, or a ``mask_mod``). The blocks are FA4's sparse blocks, on Hopper 128 x 128
(the key block a multiple of the kernel's 128-wide key tile, the query block of its 128 rows).

Our masks are made at block_q x block_k (128 x 64 by default). The conversion is exact or it
raises: an FA4 block is kept when any of our blocks inside it is kept, and that is the same
attention only when every visible part of a kept FA4 block is kept by our mask too. A mask that
keeps one 64-key half of a 128-key block without the other cannot be written as 128 x 128 blocks
with no ``mask_mod``: ``ValueError`` (predict it with ``block_k=128`` for FA4). ``superset=True``
converts it anyway, keeping the whole FA4 block: FA4 then attends to more keys than our kernel
(a different, denser attention; for speed comparisons at a similar kept fraction only).
"""
from __future__ import annotations

from collections import namedtuple

import torch

from .block_mask import _kv_lists
from .reference import cdiv, visible_blocks
from .validate import check_flag

FIELDS = ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx", "block_size")
# the same field names as flash_attn.cute.block_sparsity.BlockSparseTensorsTorch, for machines without it
BlockSparseTensors = namedtuple("BlockSparseTensorsTorch", FIELDS)


def fa4_type():
    """FA4's ``BlockSparseTensorsTorch`` when ``flash_attn.cute`` imports, else our namedtuple."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception:   # not installed, or its CUDA DSL cannot load here
        return BlockSparseTensors
    return BlockSparseTensorsTorch


def _check_block_size(block_size, ours: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise TypeError(f"to_fa4: block_size must be a pair of positive ints (q, kv), got {block_size!r}")
    for name, theirs, mine in (("q", block_size[0], ours[0]), ("kv", block_size[1], ours[1])):
        if theirs % mine and mine % theirs:
            raise ValueError(f"to_fa4: block_size {name}={theirs} and the mask's block_{name[0]}={mine} do "
                             "not divide one another: the blocks do not nest")
    return int(block_size[0]), int(block_size[1])


def _on_grid(x: torch.Tensor, block: tuple[int, int], grid: tuple[int, int], n: tuple[int, int]):
    """A (..., rows, cols) block map at ``block`` sizes, on the finer ``grid`` (n: grid cells)."""
    x = x.repeat_interleave(block[0] // grid[0], dim=-2).repeat_interleave(block[1] // grid[1], dim=-1)
    return x[..., :n[0], :n[1]]


def _pool(x: torch.Tensor, f: tuple[int, int], n: tuple[int, int]) -> torch.Tensor:
    """Any over f[0] x f[1] groups of grid cells: the coarse (..., n[0], n[1]) block map."""
    pad = (0, n[1] * f[1] - x.shape[-1], 0, n[0] * f[0] - x.shape[-2])
    x = torch.nn.functional.pad(x, pad)
    return x.unflatten(-1, (n[1], f[1])).unflatten(-3, (n[0], f[0])).any(-1).any(-2)


def fa4_tiles(mask, block_size=(128, 128), superset: bool = False) -> torch.Tensor:
    """(B, H, M, N) bool: the FA4 blocks kept (see the module docstring for exactness)."""
    BQ, BK = _check_block_size(block_size, (mask.block_q, mask.block_k))
    if mask.is_causal and mask.q_len != mask.kv_len:
        raise ValueError(f"to_fa4: a causal mask with q_len {mask.q_len} != kv_len {mask.kv_len}: ours "
                         "aligns the causal diagonal top-left (SDPA's is_causal), FA4's bottom-right")
    g = (min(mask.block_q, BQ), min(mask.block_k, BK))
    n = (cdiv(mask.q_len, g[0]), cdiv(mask.kv_len, g[1]))
    keep = _on_grid(mask.to_dense(), (mask.block_q, mask.block_k), g, n)
    f = (BQ // g[0], BK // g[1])
    tiles = _pool(keep, f, (cdiv(mask.q_len, BQ), cdiv(mask.kv_len, BK)))
    if not superset:
        vis = visible_blocks(mask.q_len, mask.kv_len, g[0], g[1], mask.is_causal).to(keep.device)
        lost = vis & _on_grid(tiles, (BQ, BK), g, n) & ~keep
        if bool(lost.any()):
            raise ValueError(
                f"to_fa4: the mask (block_q={mask.block_q}, block_k={mask.block_k}) keeps part of a "
                f"{BQ}x{BK} FA4 block and drops the rest, which FA4 blocks cannot express: predict the mask "
                f"with SpargeConfig(block_q={BQ}, block_k={BK}) to run it in FA4, or pass superset=True to "
                "keep the whole FA4 block (then FA4 attends to more keys than our kernel: not the same "
                "attention)")
    return tiles


def to_fa4(mask, block_size=(128, 128), superset: bool = False, backward: bool = False):
    """The mask as FA4 block-sparse tensors (``BlockSparseTensorsTorch``, or our namedtuple of the
    same fields without ``flash_attn``). Full blocks: every in-range pair of the FA4 block is
    visible (all of them without ``is_causal``); partial: the causal diagonal crosses the block.
    backward=True: the same blocks transposed, per key block its query blocks, the form FA4's
    ``flash_attn_func(block_sparse_tensors_bwd=...)`` takes (counts (B, H, N), indices (B, H, N, M))."""
    check_flag("to_fa4: superset", superset)
    check_flag("to_fa4: backward", backward)
    tiles = fa4_tiles(mask, block_size, superset)
    BQ, BK = int(block_size[0]), int(block_size[1])
    M, N = tiles.shape[-2:]
    if mask.is_causal:
        q_first = torch.arange(M, device=tiles.device)[:, None] * BQ
        k_last = torch.clamp((torch.arange(N, device=tiles.device)[None, :] + 1) * BK, max=mask.kv_len) - 1
        whole = q_first >= k_last
    else:
        whole = torch.ones(M, N, dtype=torch.bool, device=tiles.device)
    part, full = tiles & ~whole, tiles & whole
    if backward:   # contiguous: FA4 (CuTe) wants a unit stride on the indices' last dim
        part, full = part.transpose(-1, -2).contiguous(), full.transpose(-1, -2).contiguous()
    (mc, mi), (fc, fi) = _kv_lists(part), _kv_lists(full)
    values = dict(mask_block_cnt=mc, mask_block_idx=mi, full_block_cnt=fc, full_block_idx=fi,
                  block_size=(BQ, BK))
    cls = fa4_type()
    return cls(**{k: v for k, v in values.items() if k in cls._fields})
