"""The KV page pool's host side: which pages are free, who holds each, and the prefix cache.

    pages = PageAllocator(num_pages=1024, page_size=16)
    hit = pages.match(prompt)              # cached full pages of the prompt's prefix (now held)
    own = pages.allocate(3)                # fresh pages (held), evicting unheld cached pages if needed
    pages.register(prompt, hit + own)      # the prompt's full pages become findable by later prompts
    pages.release(hit + own)               # the holder is done with them

Every page has a reference count: the sequences (and requests) whose page tables hold it. A page
whose count drops to 0 is free again, unless it is in the prefix cache: then it stays there,
unheld, until a later prompt finds it (`match` holds it again) or a fresh allocation needs the
room (`allocate` evicts the least recently used unheld cached page first).

Prefix cache keys: a full page of tokens is keyed by its own tokens and the key of the page before
it, so a page is found only after the same whole prefix (Python's hash of ints is the same in every
process, so every host of a multi-host engine makes the same decisions). The last page of a prompt
that is not full is never cached: its owner will write into it.

Plain Python, no JAX: the scheduler and its tests use it without a device.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Sequence


class PageAllocator:
    """Reference-counted pages `0 .. num_pages - 1` of `page_size` tokens, with an LRU prefix cache."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"need num_pages >= 1 and page_size a power of two, got {num_pages}, {page_size}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refs = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))   # unheld and not cached
        self._cache: dict[Hashable, int] = {}                # key -> page
        self._key_of: dict[int, Hashable] = {}               # page -> key, for cached pages
        self._unheld: OrderedDict[int, None] = OrderedDict()  # cached pages nobody holds, oldest first
        self.hit_tokens = 0                                  # tokens found in the cache so far

    # ---- counts ----------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Pages `allocate` can hand out now (free ones plus unheld cached ones)."""
        return len(self._free) + len(self._unheld)

    @property
    def used(self) -> int:
        """Pages someone holds."""
        return self.num_pages - self.available

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ---- holding ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` pages, each now held once; raises RuntimeError when fewer are `available`."""
        if n > self.available:
            raise RuntimeError(f"asked for {n} pages, {self.available} available")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently used unheld cached page
                page, _ = self._unheld.popitem(last=False)
                del self._cache[self._key_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        return out

    def hold(self, pages: Sequence[int]) -> None:
        """One more holder for each of `pages` (a shared prompt page, a cache hit)."""
        for page in pages:
            if self.refs[page] == 0:
                self._unheld.pop(page)  # only cached pages can be found unheld
            self.refs[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """One holder fewer for each of `pages`; an unheld page is free again (or stays cached)."""
        for page in pages:
            if self.refs[page] < 1:
                raise RuntimeError(f"page {page} released more often than it was held")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self._key_of:
                    self._unheld[page] = None  # most recently used end
                else:
                    self._free.append(page)

    # ---- prefix cache ----------------------------------------------------------------------
    def _keys(self, tokens: Sequence[int], full_pages: int, salt: int) -> list[Hashable]:
        keys, parent = [], salt  # hashes of tuples of ints: the same in every process (hash(None) is not)
        p = self.page_size
        for i in range(full_pages):
            key = (parent, tuple(tokens[i * p:(i + 1) * p]))
            keys.append(key)
            parent = hash(key)
        return keys

    def match(self, tokens: Sequence[int], salt: int = 0) -> list[int]:
        """The cached pages holding the longest prefix of `tokens` in whole pages, now held by the
        caller. At least one token is always left out (its logits are needed), so at most
        `(len(tokens) - 1) // page_size` pages. `salt`: what else the keys/values depend on (an int;
        the engine's rotary variant): pages registered with another salt are never found."""
        if not self.prefix_caching:
            return []
        found = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.page_size, salt):
            page = self._cache.get(key)
            if page is None:
                break
            found.append(page)
        self.hold(found)
        self.hit_tokens += len(found) * self.page_size
        return found

    def unmatch(self, pages: Sequence[int]) -> None:
        """Give back what `match` found without using it (it no longer counts as a hit)."""
        self.release(pages)
        self.hit_tokens -= len(pages) * self.page_size

    def register(self, tokens: Sequence[int], pages: Sequence[int], salt: int = 0) -> None:
        """Make the full pages of `tokens` (held in `pages`, in order) findable by `match` with the
        same `salt`. A page whose prefix is already cached in another page is left out."""
        if not self.prefix_caching:
            return
        for key, page in zip(self._keys(tokens, len(tokens) // self.page_size, salt), pages):
            if key not in self._cache and page not in self._key_of:
                self._cache[key] = page
                self._key_of[page] = key
