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
    the next one. With settings None, or a transformer of one block (nothing after the first to
    skip), nothing changes and at_step does nothing."""
    if not settings or _block_count(transformer) < 2:
        yield lambda done, total: None
        return
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import HookRegistry, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    threshold, start, end = settings
    _name_z_image_hidden_states()
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
    # Context changes reach hooks through a cache of child registries built before these existed.
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    context_hooks = []
    if not hasattr(transformer, "cache_context"):
        # Pipelines name the cache's context only around transformers with caching built in
        # (Z-Image's and SD3's have none); theirs is called once a step, so one context serves.
        context_hooks = [
            transformer.register_forward_pre_hook(lambda module, _: _set_cache_context(module, CacheContext("step"))),
            transformer.register_forward_hook(lambda module, _, __: _set_cache_context(module, None)),
        ]
    try:
        heads = [module._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) for module in transformer.modules()
                 if hasattr(module, "_diffusers_hook")]
        head = next(hook for hook in heads if hook is not None)

        def at_step(done: int, total: int) -> None:
            head.threshold = threshold if start <= done / max(total, 1) < end else _ALWAYS_COMPUTE

        at_step(0, 1)
        yield at_step
    finally:
        for hook in context_hooks:
            hook.remove()
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()


def _name_z_image_hidden_states() -> None:
    """diffusers registers Z-Image's block for its cache hooks, but the first-block hook looks
    its input up by the name hidden_states, which that block calls x (its first argument)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    metadata = TransformerBlockRegistry.get(ZImageTransformerBlock)
    metadata._cached_parameter_indices = {"hidden_states": 0}


def _block_count(transformer) -> int:
    """The transformer blocks diffusers' cache hooks find (its named block lists)."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return sum(len(child) for name, child in transformer.named_children()
               if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList))
