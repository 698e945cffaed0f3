"""eval.held_out_images: the trainer never sees the held-out images (every task's stream)."""

from __future__ import annotations

from trainer.data import TrainData
from trainer.evaluation.heldout import held_out_ids
from trainer.run_folder import train_fingerprint


def test_held_out_ids_are_a_stable_pure_choice():
    ids = [f"{i:064x}" for i in range(20)]
    first = held_out_ids(ids, 3)
    assert len(first) == 3 and set(first) <= set(ids)
    assert held_out_ids(list(reversed(ids)), 3) == first  # order of the input does not matter
    assert held_out_ids(ids, 0) == [] and len(held_out_ids(ids[:2], 5)) == 2


def _seen_ids(data: TrainData) -> dict[str, set[str]]:
    ids = data.index.image_ids
    seen = {}
    for task, items in data.streams.items():
        rows = data.understanding.image_rows[items] if task == "understanding" else items
        seen[task] = {ids[int(g)] for g in rows}
    return seen


def test_trainer_excludes_held_out_images(train_manifest):
    plain = train_manifest(n_images=6)
    everything = _seen_ids(TrainData.build(plain))
    m = train_manifest(n_images=6, extra={"eval": {"held_out_images": 2}})
    data = TrainData.build(m)
    held = set(held_out_ids(data.index.image_ids, 2))
    assert len(held) == 2
    seen = _seen_ids(data)
    assert set(seen) == {"understanding", "reconstruction", "depth", "segmentation"}
    for task, ids in seen.items():
        assert not ids & held, task
        # only the held-out images went missing
        assert everything[task] - ids <= held
    assert any(everything[t] & held for t in everything)  # they were trained on before
    assert data.report["held_out_images"] == 2
    assert train_fingerprint(m) != train_fingerprint(plain)
