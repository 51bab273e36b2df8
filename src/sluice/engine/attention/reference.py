"""Paged attention in plain PyTorch: the CPU path and the reference every GPU kernel is tested against.

The pages of each sequence are gathered into a padded ``[S, max_kv, heads, dim]`` tensor and one batched
``scaled_dot_product_attention`` call runs with a mask that is causal (end-aligned) and hides the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sluice.engine.attention import AttentionMetadata


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """query [T, Hq, D] -> output [T, Hq, D] (same dtype as query)."""
    num_seqs = meta.num_seqs
    page_size = k_cache.shape[1]
    heads_kv, dim = k_cache.shape[2], k_cache.shape[3]
    heads_q = query.shape[1]
    pages = -(-meta.max_seqlen_k // page_size)
    tables = meta.block_tables[:, :pages].long()
    keys = k_cache[tables].reshape(num_seqs, pages * page_size, heads_kv, dim)[:, : meta.max_seqlen_k]
    values = v_cache[tables].reshape(num_seqs, pages * page_size, heads_kv, dim)[:, : meta.max_seqlen_k]
    seq_lens = meta.seq_lens.long()
    kv_pos = torch.arange(meta.max_seqlen_k, device=query.device)
    if meta.is_decode:
        q = query.view(num_seqs, 1, heads_q, dim)
        allowed = (kv_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [S, 1, 1, K]
        out = _sdpa(q, keys, values, allowed, scale)
        return out.reshape(num_seqs, heads_q, dim)
    starts = meta.cu_seqlens_q[:-1].long()
    q_lens = meta.cu_seqlens_q[1:].long() - starts
    rows = torch.arange(meta.max_seqlen_q, device=query.device)
    valid_q = rows[None, :] < q_lens[:, None]  # [S, Qmax]
    token_index = (starts[:, None] + rows[None, :]).clamp(max=query.shape[0] - 1)
    q = query[token_index]  # [S, Qmax, Hq, D]; padded rows are masked out below
    q_pos = seq_lens[:, None] - q_lens[:, None] + rows[None, :]  # [S, Qmax]
    allowed = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < seq_lens[:, None, None])
    allowed &= valid_q[:, :, None]
    allowed |= ~valid_q[:, :, None] & (kv_pos[None, None, :] == 0)  # padded rows attend somewhere: no NaN
    out = _sdpa(q, keys, values, allowed[:, None], scale)  # [S, Qmax, Hq, D]
    return out[valid_q]


def _sdpa(q, keys, values, allowed, scale):
    """q [S, Q, Hq, D], keys/values [S, K, Hkv, D], allowed [S, 1, Q, K] -> [S, Q, Hq, D]."""
    group = q.shape[2] // keys.shape[2]
    k = keys.transpose(1, 2)
    v = values.transpose(1, 2)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=allowed, scale=scale)
    return out.transpose(1, 2)
