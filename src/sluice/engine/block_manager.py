"""Pages of the KV pool: reference counts, a free list in LRU order, and the hashed prefix cache.

A full page is identified by a hash chain over its tokens and every token before it, so two sequences with the
same first ``k * page_size`` tokens share their first ``k`` pages (the n samples of a GRPO group share their
prompt). Only pages whose K/V have been computed enter the cache. A page whose last user is gone goes to the
end of the free list but keeps its cache entry, so a later request with the same prefix can revive it; pages
are taken for reuse from the front, the least recently freed, and lose their entry then.

Pages are only ever shared when full, and a sequence writes only past its shared prefix, so shared pages are
never written and need no copy-on-write.
"""

from __future__ import annotations

from collections import OrderedDict

from sluice.engine.sequence import Sequence


class OutOfPages(RuntimeError):
    pass


class BlockManager:
    SCRATCH_PAGE = 0  # see kv_pool: never handed out

    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True):
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self.refcount = [0] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((page, None) for page in range(1, num_pages))
        self.cached: dict[int, int] = {}  # prefix hash -> page holding those tokens' K/V
        self.page_entry: dict[int, tuple[int, tuple[int, ...]]] = {}  # page -> (hash, its tokens)
        self.pending: dict[int, str] = {}  # hash -> rid of the sequence computing that page right now

    @property
    def num_free(self) -> int:
        return len(self.free)

    # ---- prefix cache ------------------------------------------------------------------------------
    def hash_pages(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq.page_hashes`` over the full pages among its first ``num_tokens`` tokens."""
        size = self.page_size
        while (len(seq.page_hashes) + 1) * size <= num_tokens:
            index = len(seq.page_hashes)
            parent = seq.page_hashes[-1] if seq.page_hashes else 0
            seq.page_hashes.append(hash((parent, tuple(seq.token_ids[index * size : (index + 1) * size]))))

    def match_prefix(self, seq: Sequence) -> tuple[list[int], bool]:
        """Cached pages for the longest prefix of ``seq`` that it lets the cache serve
        (``Sequence.cacheable_prefix_len``), and whether the next page is being computed by another sequence now."""
        if not self.enable_prefix_cache:
            return [], False
        limit = seq.cacheable_prefix_len
        self.hash_pages(seq, limit)
        pages: list[int] = []
        for index, page_hash in enumerate(seq.page_hashes[: limit // self.page_size]):
            page = self.cached.get(page_hash)
            tokens = tuple(seq.token_ids[index * self.page_size : (index + 1) * self.page_size])
            if page is None or self.page_entry[page][1] != tokens:  # a hash collision is a miss, never a hit
                owner = self.pending.get(page_hash)
                return pages, owner is not None and owner != seq.rid
            pages.append(page)
        return pages, False

    def register_computed(self, seq: Sequence) -> None:
        """Enter the newly computed full pages of ``seq`` into the prefix cache."""
        if not self.enable_prefix_cache:
            return
        self.hash_pages(seq, seq.num_computed)
        full = min(seq.num_computed // self.page_size, len(seq.page_hashes))
        for index in range(seq.num_registered, full):
            page_hash, page = seq.page_hashes[index], seq.pages[index]
            if self.pending.get(page_hash) == seq.rid:
                del self.pending[page_hash]
            if page_hash not in self.cached and page not in self.page_entry:
                tokens = tuple(seq.token_ids[index * self.page_size : (index + 1) * self.page_size])
                self.cached[page_hash] = page
                self.page_entry[page] = (page_hash, tokens)
        seq.num_registered = max(seq.num_registered, full)

    def flush(self) -> None:
        """Forget every cached prefix (after a weight update the cached K/V are stale)."""
        self.cached.clear()
        self.page_entry.clear()
        self.pending.clear()

    # ---- allocation -----------------------------------------------------------------------------
    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed + num_new_tokens
        return max(0, -(-total // self.page_size) - len(seq.pages))

    def admit(self, seq: Sequence, prefix_pages: list[int]) -> None:
        """Give ``seq`` the cached pages of its prefix; their tokens count as computed."""
        for page in prefix_pages:
            if self.refcount[page] == 0:
                self.free.pop(page, None)
            self.refcount[page] += 1
        seq.pages = list(prefix_pages)
        seq.num_computed = len(prefix_pages) * self.page_size
        seq.num_registered = len(prefix_pages)

    def reserve(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add pages so that ``num_new_tokens`` more tokens of ``seq`` fit; raises OutOfPages."""
        needed = self.pages_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise OutOfPages(f"{needed} pages needed, {self.num_free} free")
        for _ in range(needed):
            page, _ = self.free.popitem(last=False)
            entry = self.page_entry.pop(page, None)
            if entry is not None and self.cached.get(entry[0]) == page:
                del self.cached[entry[0]]
            self.refcount[page] = 1
            index = len(seq.pages)
            seq.pages.append(page)
            if self.enable_prefix_cache and index < len(seq.page_hashes) and seq.page_hashes[index] not in self.cached:
                self.pending.setdefault(seq.page_hashes[index], seq.rid)

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its pages (finished or preempted)."""
        for page_hash in seq.page_hashes[seq.num_registered :]:
            if self.pending.get(page_hash) == seq.rid:
                del self.pending[page_hash]
        for page in reversed(seq.pages):  # the tail first, so a prefix outlives its continuations in the LRU
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self.free[page] = None
        seq.pages = []
        seq.num_computed = 0
        seq.num_registered = 0
