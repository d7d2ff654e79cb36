"""SpargeBlockMask: the predicted block mask in FlexAttention's BlockMask index format."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import cdiv, visible_blocks


@dataclass
class SpargeBlockMask:
    """Kept key blocks per query block, in FlexAttention's ``kv_num_blocks``/``kv_indices`` form.

    kv_num_blocks: (B, H, nq) int32, how many key blocks query block i keeps.
    kv_indices:    (B, H, nq, nk) int32; the first kv_num_blocks entries of a row are the kept
                   key-block indices in ascending order, the rest are the dropped ones.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    is_causal: bool = False
    _q_index: tuple | None = field(default=None, repr=False)
    _checked: tuple | None = field(default=None, repr=False, compare=False)   # see validate.check_block_mask

    def _stamp(self) -> tuple:
        """Identifies the index tensors' current contents (in-place changes bump the versions)."""
        n, i = self.kv_num_blocks, self.kv_indices
        return (n._version, i._version, n.data_ptr(), i.data_ptr())

    def _trusted(self) -> "SpargeBlockMask":
        """Mark a mask our own prediction made as valid (no check of its values later)."""
        if not torch.compiler.is_compiling():
            self._checked = self._stamp()
        return self

    @property
    def shape(self):
        return (*self.kv_num_blocks.shape, cdiv(self.kv_len, self.block_k))

    def to_dense(self) -> torch.Tensor:
        """(B, H, nq, nk) bool: True where the key block is kept."""
        from .kernels.torch_impl import indices_to_dense

        return indices_to_dense(self.kv_num_blocks, self.kv_indices, self.shape[-1])

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """(B, H, nk) int32: how many query blocks keep each key block (the transposed index)."""
        return self._transposed()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """(B, H, nk, nq) int32: the query blocks that keep each key block, ascending first."""
        return self._transposed()[1]

    def _transposed(self):
        if self._q_index is None:
            from .kernels.torch_impl import transpose_indices

            self._q_index = transpose_indices(self.kv_num_blocks, self.kv_indices, self.shape[-1])
        return self._q_index

    def visible_pairs(self) -> int:
        """Block pairs the rows may see (all of them, or the causal lower part), over B and H."""
        vis = visible_blocks(self.q_len, self.kv_len, self.block_q, self.block_k, self.is_causal)
        B, H = self.kv_num_blocks.shape[:2]
        return int(vis.sum()) * B * H

    def sparsity(self) -> float:
        """1 - kept block pairs / visible block pairs."""
        kept = int(self.kv_num_blocks.sum())
        return 1.0 - kept / max(1, self.visible_pairs())

    def to_fa4(self, block_size=(128, 128), superset: bool = False, backward: bool = False):
        """The same mask in FlashAttention-4's block-sparse format: ``flash_attn.cute.flash_attn_func(
        q, k, v, causal=m.is_causal, block_sparse_tensors=m.to_fa4())`` (FA4's layout: (B, N, H, D),
        i.e. ``q.transpose(1, 2)``) computes what the sparse op does. block_size: FA4's sparse
        blocks (q, kv), 128 x 128 on Hopper. Exact or ValueError: a 128 x 64 mask converts only
        where both 64-key halves of each kept 128-key block are kept; ``superset=True`` keeps the
        whole block instead (more keys than our kernel: not the same attention). Without
        ``flash_attn`` a namedtuple with the same field names. backward=True: the transposed
        lists FA4's ``block_sparse_tensors_bwd`` takes. See :mod:`sparge_compile.fa4`."""
        from .fa4 import to_fa4

        return to_fa4(self, block_size, superset, backward)

    def to_flex(self):
        """The same mask as a ``torch.nn.attention.flex_attention.BlockMask`` (block_q x block_k).

        ``flex_attention(q, k, v, block_mask=m.to_flex())`` computes what the sparse op does,
        compiled or eager. Kept blocks wholly visible are *full* blocks (a compiled FlexAttention
        runs them without a mask_mod); kept blocks the causal diagonal crosses are partial. The
        ``mask_mod`` (the kept-block lookup, and ``q_idx >= kv_idx`` when causal) is the exact
        mask, for the partial blocks and for eager FlexAttention, which ignores the indices.
        """
        from torch.nn.attention.flex_attention import BlockMask

        keep, bq, bk, causal = self.to_dense(), self.block_q, self.block_k, self.is_causal

        def mask_mod(b, h, q_idx, kv_idx):
            kept = keep[b, h, q_idx // bq, kv_idx // bk]
            return kept & (q_idx >= kv_idx) if causal else kept

        qb = torch.arange(keep.shape[-2], device=keep.device)[:, None]
        kb = torch.arange(keep.shape[-1], device=keep.device)[None, :]
        whole = (qb * bq >= (kb + 1) * bk - 1) if causal else torch.ones_like(keep[0, 0])
        part, full = _kv_lists(keep & ~whole), _kv_lists(keep & whole)
        kwargs = dict(BLOCK_SIZE=(bq, bk), mask_mod=mask_mod)
        try:
            return BlockMask.from_kv_blocks(*part, *full, seq_lengths=(self.q_len, self.kv_len), **kwargs)
        except TypeError:  # older torch: no seq_lengths
            return BlockMask.from_kv_blocks(*part, *full, **kwargs)


def _kv_lists(dense: torch.Tensor):
    """(kv_num_blocks, kv_indices) of a dense (B, H, nq, nk) block mask, kept blocks first, ascending."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx
