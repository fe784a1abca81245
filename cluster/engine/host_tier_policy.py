"""WritePolicy: which pages evicted from the device the host tier keeps. Pure Python, no torch.

A write-back costs a gather, a copy over the host link and host memory; it pays only when the page
is loaded back before the host tier evicts it. The tier writes every evicted page (write-back)
while its measured usefulness says reuse exists, and only a few otherwise (selective):

- usefulness, over windows of `window` device pages offered to the tier (evicted with no host
  copy): host pages loaded / host pages written in the window. A page written lives in the host
  tier for about its capacity in further writes, so a reuse the tier can serve shows within a
  window of that many (half of it was too short: a 16-conversation chat on the CPU turned
  selective in its first turn).
- below `min_useful` the tier turns selective: it writes a page a match has reused (`RadixNode.reused`)
  and the pages of one prefix in `sample` (chosen by the prefix's first page, so a sampled
  prefix is written whole and can be loaded back). Loads of those keep measuring usefulness: at
  `min_useful` again it writes every page.

Multi-turn chat (turn k + 1 extends turn k's prompt and answer, never hit before its eviction) is
reuse the window sees: the first window writes everything, and the loads of the next turns keep
the ratio near 1. A workload without reuse turns selective after one window and then writes
1 / `sample` of its evictions. One window is a whole tier of writes: in host_tier_gpu.py's
no-reuse run on the GPU (8 GB tier, 4,096 pages of an 8B model; 96 prompts evict ~5,600) it
covers two thirds of the run, so what makes that run cheap is the write-back's own cost
(host_tier_copy.py: no host wait, one copy per run), not this policy.
"""
from __future__ import annotations

MIN_USEFUL = 1 / 32      # host pages loaded per page written below which writes turn selective
SAMPLE = 8               # selective: one prefix in SAMPLE is written (to keep measuring)
MIN_WINDOW = 64          # pages offered per window, at least


class WritePolicy:
    def __init__(self, host_pages: int, adaptive: bool = True, window: int = 0):
        self.adaptive = adaptive             # False: write every evicted page (write-back)
        self.window = window or max(MIN_WINDOW, host_pages)
        self.min_useful, self.sample = MIN_USEFUL, SAMPLE
        self.selective = False
        self.offered = self.written = self.loaded = 0     # in the current window
        self.num_skipped = 0                              # pages not written, in all
        self._sampled_at: dict = {}                       # node -> its prefix's draw, this window

    def wants(self, node) -> bool:
        """Whether `node`'s page, evicted from the device with no host copy, goes to the host."""
        if self.offered >= self.window:
            self._next_window()
        self.offered += 1
        if self.selective and not node.reused and not self._sampled(node):
            self.num_skipped += 1
            return False
        self.written += 1
        return True

    def on_load(self, num_pages: int) -> None:
        self.loaded += num_pages

    def _next_window(self) -> None:
        self.selective = self.adaptive and self.loaded < self.min_useful * max(self.written, 1)
        self.offered = self.written = self.loaded = 0
        self._sampled_at.clear()

    def _sampled(self, node) -> bool:
        """The prefix's first page decides for all of its pages (remembered along the way: an
        eviction asks for a leaf, then for its parent, ...)."""
        path, known = [], self._sampled_at.get(node)
        while known is None and node.parent is not None and node.parent.parent is not None:
            path.append(node)
            node = node.parent
            known = self._sampled_at.get(node)
        drawn = (hash(node.key) % self.sample == 0) if known is None else known
        self._sampled_at.update(dict.fromkeys(path, drawn))
        return drawn
