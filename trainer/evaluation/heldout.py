"""Which ingested images are held out of training for the evaluation probes.

The manifest's `eval.held_out_images: N` picks the N image ids whose sha256('held-out:' + id)
sorts first: a pure function of the ids, the same in the trainer (which drops them from every
task's stream) and in the probes (which ask about them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["held_out_count", "held_out_ids"]


def _key(image_id: str) -> str:
    return hashlib.sha256(f"held-out:{image_id}".encode()).hexdigest()


def held_out_ids(image_ids: Iterable[str], count: int) -> list[str]:
    """The `count` held-out ids among `image_ids` (distinct), in their held-out order."""
    if count <= 0:
        return []
    return sorted(set(image_ids), key=_key)[:count]


def held_out_count(manifest) -> int:
    """`eval.held_out_images` of a manifest (0 without an eval section)."""
    return int(manifest.eval.held_out_images) if getattr(manifest, "eval", None) else 0
