"""The KV pool: one preallocated K and V tensor per layer, cut into fixed-size pages.

Page 0 is reserved as a scratch page: padded rows of a CUDA-graph batch write their K/V there and read it
back, so padding never touches a page that holds a sequence's tokens. The block manager never hands it out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size


class KVPool:
    def __init__(self, shape: KVShape, num_pages: int, device: torch.device):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.shape = shape
        self.num_pages = num_pages
        self.device = device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.allocate()

    @property
    def capacity_tokens(self) -> int:
        """Tokens that fit, the scratch page excluded."""
        return (self.num_pages - 1) * self.shape.page_size

    @property
    def allocated(self) -> bool:
        return self.k is not None

    def allocate(self) -> None:
        s = self.shape
        size = (s.num_layers, self.num_pages, s.page_size, s.num_kv_heads, s.head_dim)
        self.k = torch.zeros(size, dtype=s.dtype, device=self.device)
        self.v = torch.zeros(size, dtype=s.dtype, device=self.device)

    def release(self) -> None:
        """Free the pool's memory (for a colocated trainer); ``allocate`` brings it back, empty."""
        self.k = self.v = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.k is None:
            raise RuntimeError("the KV pool is released; resume memory before generating")
        return [(self.k[layer], self.v[layer]) for layer in range(self.shape.num_layers)]


def pages_for_memory(shape: KVShape, budget_bytes: int) -> int:
    return max(0, budget_bytes // shape.bytes_per_page)
