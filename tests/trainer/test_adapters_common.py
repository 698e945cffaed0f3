"""What every adapter in trainer/adapters/ must do, run for each family's tiny-random.

Loss placement is read off the gradient at the language model's final hidden states: a position
carries loss iff the loss depends on it. The loop-level checks (losses fall when overfitting,
exact resume, `unimrg train`) are parametrized the same way in test_loop.py; weight 0 reading
nothing, in test_data.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.conftest import generation_batch, understanding_batch
from trainer.adapters import Adapter, adapter_class, available_adapters

IGNORE = -100


@pytest.fixture(scope="module", params=available_adapters())
def adapter(request):
    return adapter_class(request.param).load("tiny-random")


def _grad_at_final_hidden(adapter, loss_fn, batch) -> torch.Tensor:
    """|d loss / d h| summed over features, (B, L), h the decoder's final hidden states."""
    store = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        store["h"] = out

    handle = adapter.model.get_decoder().norm.register_forward_hook(hook)
    try:
        adapter.model.zero_grad()
        loss_fn(batch).backward()
    finally:
        handle.remove()
        adapter.model.zero_grad(set_to_none=True)
    return store["h"].grad.abs().sum(-1)


def test_meets_the_protocol(adapter):
    assert isinstance(adapter, Adapter)
    assert adapter.random_weights and adapter.probe_cfg_weight >= 1
    assert all(0 <= m <= 1 for m in adapter.image_mean)


def test_prompt_and_image_positions_carry_no_loss(adapter):
    batch = understanding_batch(adapter)
    g = _grad_at_final_hidden(adapter, adapter.understanding_loss, batch)
    # Position p predicts token p+1: it carries loss iff labels[p+1] is not ignored.
    carries = torch.zeros_like(batch["labels"], dtype=torch.bool)
    carries[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert (g[~carries] == 0).all()
    assert (g[carries] > 0).all()
    image_pos = batch["input_ids"] == adapter.model.config.image_token_id
    assert image_pos.any() and not (carries & image_pos).any()
    assert not (batch["labels"][image_pos] != IGNORE).any()


def test_generation_loss_only_after_the_prompt_on_the_targets_codes(adapter):
    batch = generation_batch(adapter)
    g = _grad_at_final_hidden(adapter, adapter.generation_loss, batch)
    lens = batch["attention_mask"].sum(1).tolist()
    assert lens[0] != lens[1]  # rows of different lengths, right-padded
    counts = []
    for row, n in enumerate(lens):
        assert (g[row, : n - 1] == 0).all()  # condition image and prompt positions
        counts.append(int((g[row] > 0).sum()))
    # Each row predicts exactly its target's codes (one position per code), nothing else.
    assert counts == [adapter.num_image_tokens] * 2


def test_a_hub_id_loads_its_cached_snapshot_and_is_pinned_to_the_commit(
    adapter, tmp_path, monkeypatch
):
    """`revision: null` still names the weights: a hub id resolves to the snapshot folder of
    the local Hugging Face cache, and the fingerprint's identity records that commit."""
    from tests.conftest import fake_hub_cache
    from trainer.adapters.common import META_FILE

    cls = type(adapter)
    adapter.save(tmp_path / "saved")
    (tmp_path / "saved" / META_FILE).unlink()  # a real hub model has no project file
    snap = fake_hub_cache(monkeypatch, tmp_path / "hf", "org/model", tmp_path / "saved")
    ident = cls.identity("org/model")
    assert ident["model"] == "org/model" and ident["revision"] == snap.name
    assert ident["weights"] and ident["weights"] == cls.identity(str(snap))["weights"]
    assert ident["random_weights"] is False
    assert cls.identity("org/model", revision="main") == ident
    loaded = cls.load("org/model")
    assert not loaded.random_weights
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        cls.identity("org/absent")


def test_the_families_are_packages_found_by_folder_name(tmp_path, monkeypatch):
    """One family, one folder: the registry lists packages only (common.py, which every family
    shares, is not an adapter), and the manifest check refuses a name that is not a package."""
    import trainer.adapters
    from pipeline.manifest import ManifestError, parse_manifest

    assert available_adapters() == ["emu3", "janus"]
    assert adapter_class("janus").name == "janus" and adapter_class("emu3").name == "emu3"
    base = {"output_dir": "o", "sources": []}
    with pytest.raises(ManifestError, match="trainer.adapter: expected an adapter"):
        parse_manifest({**base, "trainer": {"adapter": "common"}})
    with pytest.raises(ValueError, match="unknown adapter 'common'"):
        adapter_class("common")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "__init__.py").write_text("")
    monkeypatch.setattr(trainer.adapters, "__path__", [*trainer.adapters.__path__, str(tmp_path)])
    assert "bare" in available_adapters()
    with pytest.raises(ValueError, match=r"trainer/adapters/bare/__init__.py: defines no ADAPTER"):
        adapter_class("bare")
