"""EasyCache (the generation server's easycache, easycache_threshold, easycache_start,
easycache_end) as diffusers' first-block cache: at each step the transformer's first block
runs, and when its output changed less than `threshold` (mean absolute difference relative to
the last fully computed step) the other blocks are skipped and their last residual reused.

Applied to one image and removed after, so the next job runs every block. diffusers' cache has
no step window of its own; start and end are fractions of the steps that run: outside
[start, end) every block runs (the first block's threshold is set so nothing is reused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# Below any relative change, so the first block always asks for the full pass.
_ALWAYS_COMPUTE = -1.0


@contextlib.contextmanager
def easycache(transformer, settings: list[float] | None) -> Iterator[Callable[[int, int], None]]:
    """Within the block, `transformer` caches as `settings` ([threshold, start, end]) say; the
    yielded `at_step(done, total)` is called after each step to open or close the window for
    the next one. With settings None nothing changes and at_step does nothing."""
    if not settings:
        yield lambda done, total: None
        return
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    threshold, start, end = settings
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        heads = [module._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) for module in transformer.modules()
                 if hasattr(module, "_diffusers_hook")]
        head = next(hook for hook in heads if hook is not None)

        def at_step(done: int, total: int) -> None:
            head.threshold = threshold if start <= done / max(total, 1) < end else _ALWAYS_COMPUTE

        at_step(0, 1)
        yield at_step
    finally:
        transformer.disable_cache()
