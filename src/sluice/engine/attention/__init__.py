"""Attention over the paged KV cache.

Layout, shared by every backend:

- one K and one V tensor per layer, ``[num_pages, page_size, num_kv_heads, head_dim]``;
- a step's query tokens of all its sequences packed flat, ``q [T, num_q_heads, head_dim]``;
- ``AttentionMetadata`` says which tokens belong to which sequence and where each sequence's pages are.

A sequence with ``q_len`` new tokens and ``kv_len`` tokens in the cache after this step (its new tokens
included) has its query token ``i`` at position ``kv_len - q_len + i``; that token attends to the cached
positions ``0 .. kv_len - q_len + i`` (causal, aligned to the end). A decode step is the case ``q_len == 1``.

The new tokens' K/V are written to the cache (``store_kv``) before attention runs, so a token sees itself and
the tokens before it in the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset, where each new token's K/V is written
    block_tables: torch.Tensor  # [S, max_pages] int32: each sequence's pages in order (padding entries: 0)
    seq_lens: torch.Tensor  # [S] int32: KV length of each sequence after this step (cached + new)
    cu_seqlens_q: torch.Tensor  # [S + 1] int32: offsets of each sequence's query tokens in the packed batch
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool  # every sequence has exactly one query token

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' K/V ``[T, num_kv_heads, head_dim]`` into their slots of the paged cache."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
