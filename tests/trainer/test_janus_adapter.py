"""JanusAdapter on tiny-random Janus: sequences, masks, VQ targets, tiny-random determinism."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.trainer.conftest import (
    CONVS,
    generation_batch,
    random_images,
    understanding_batch,
)
from trainer.adapters import Adapter, adapter_class
from trainer.adapters.common import IGNORE
from trainer.adapters.janus.adapter import JanusAdapter
from trainer.adapters.janus.tiny import tiny_random_dir
from trainer.data import collate


@pytest.fixture(scope="module")
def adapter() -> JanusAdapter:
    return JanusAdapter.load("tiny-random")


def test_registry_and_protocol(adapter):
    assert adapter_class("janus") is JanusAdapter
    assert isinstance(adapter, Adapter)
    with pytest.raises(ValueError, match="unknown adapter"):
        adapter_class("nope")


def test_tiny_random_is_deterministic(tmp_path, monkeypatch):
    first = tiny_random_dir()
    monkeypatch.setenv("UNIMRG_CACHE", str(tmp_path / "other-cache"))
    second = tiny_random_dir()
    assert first != second
    digest = [
        hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (first, second)
    ]
    assert digest[0] == digest[1]
    assert JanusAdapter.identity("tiny-random")["weights"]


def test_the_tiny_builder_takes_sizes_and_its_defaults_are_tiny_random(tmp_path):
    from trainer.adapters.janus.tiny import JanusSizes, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    # Defaults: tiny-random's own weights, bit for bit (its cached folder is keyed by version,
    # so the defaults must never drift).
    default = tiny_model(tok)
    saved = JanusAdapter.load("tiny-random").model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in default.state_dict().items())
    c = default.config
    assert (c.text_config.hidden_size, c.vision_config.hidden_size, c.vq_config.num_patches) == (
        64,
        32,
        4,
    )
    # Other sizes: a VQ grid of 8x8 at patch 4, seeded.
    sizes = JanusSizes(lm_hidden=48, patch_size=4, vq_codes=32, vq_channel_multiplier=(1, 2, 2))
    a, b = tiny_model(tok, sizes, seed=3), tiny_model(tok, sizes, seed=3)
    assert a.config.text_config.hidden_size == 48 and a.config.vq_config.num_patches == 8
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with torch.no_grad():
        px = a.model.vqmodel.decode(torch.zeros(1, 64, dtype=torch.long))
    assert px.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="downsample by patch_size"):
        tiny_model(tok, JanusSizes(patch_size=4, vq_channel_multiplier=(1, 1, 1, 1)))


def test_understanding_labels_only_on_answers(adapter):
    enc = adapter.text_encoder()
    ids, labels = enc.understanding(CONVS[1])
    answer_ids = set()
    for text in ("Stripes, many.", "Nothing."):
        answer_ids.update(enc.tokenizer.encode(" " + text, add_special_tokens=False))
    n_img = ids.count(enc.image_id)
    assert n_img == adapter.num_image_tokens == 16
    for t, lab in zip(ids, labels):
        if t in (enc.image_id, enc.boi_id, enc.eoi_id, enc.bos_id):
            assert lab == IGNORE
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert supervised.count(enc.eos_id) == 2
    assert set(supervised) - {enc.eos_id} <= answer_ids
    # The image block sits where the marker was: after "Look ", before " here".
    assert ids.index(enc.boi_id) > 1


def _grad_at_final_hidden(adapter, loss_fn, batch) -> torch.Tensor:
    """Gradient of the loss w.r.t. the language model's last hidden states (B, L, D)."""
    store = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        store["h"] = out

    handle = adapter.model.model.language_model.norm.register_forward_hook(hook)
    try:
        adapter.model.zero_grad()
        loss_fn(batch).backward()
    finally:
        handle.remove()
    return store["h"].grad.abs().sum(-1)


def test_prompt_and_image_positions_carry_no_loss(adapter):
    batch = understanding_batch(adapter)
    g = _grad_at_final_hidden(adapter, adapter.understanding_loss, batch)
    # Position p predicts token p+1: it carries loss iff labels[p+1] is not ignored.
    carries = torch.zeros_like(batch["labels"], dtype=torch.bool)
    carries[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert (g[~carries] == 0).all()
    assert (g[carries] > 0).all()
    image_pos = batch["input_ids"] == adapter.model.config.image_token_id
    assert not (carries & image_pos).any()


def test_generation_loss_only_on_code_positions(adapter):
    batch = generation_batch(adapter)
    g = _grad_at_final_hidden(adapter, adapter.generation_loss, batch)
    lens = batch["attention_mask"].sum(1).tolist()
    m = adapter.num_image_tokens
    assert lens[0] != lens[1]  # rows of different lengths, right-padded
    assert g.shape[1] == max(lens) + m - 1
    for row, n in enumerate(lens):
        assert (g[row, : n - 1] == 0).all()  # prompt and image positions
        assert (g[row, n - 1 : n - 1 + m] > 0).all()  # [BOI], c_0 .. c_{M-2} predict c_0 .. c_{M-1}
        assert (g[row, n - 1 + m :] == 0).all()  # padding


def test_vq_targets_have_the_generation_head_shape(adapter):
    targets = random_images(3)
    codes = adapter.encode_targets(targets)
    head = adapter.model.model.generation_head.vision_head
    vq_cfg = adapter.model.config.vq_config
    assert codes.shape == (3, adapter.num_image_tokens)
    assert codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < head.out_features == vq_cfg.num_embeddings
    assert adapter.num_image_tokens == adapter.model.config.vision_config.num_image_tokens
    assert adapter.decode_codes(codes).shape == targets.shape


def _cosine_nearest(latents: torch.Tensor, codebook: torch.Tensor) -> list[int]:
    """Independent reference: per latent vector, the codebook row of highest cosine similarity."""
    vecs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    rows = codebook.double()
    out = []
    for v in vecs:
        sims = [float(v @ r) / (float(v.norm()) * float(r.norm())) for r in rows]
        out.append(max(range(len(sims)), key=sims.__getitem__))
    return out


def test_vq_codes_are_assigned_after_l2_normalisation(adapter):
    """Janus's tokenizer (codebook_l2_norm) compares directions: a long codebook row must not win
    by its norm, which is what transformers' quantizer forward (unnormalised) lets it do."""
    vq = adapter.model.model.vqmodel
    weight = vq.quantize.embedding.weight
    saved = weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            # Row norms spanning four orders of magnitude.
            weight.mul_(
                torch.logspace(-2, 2, weight.shape[0])[
                    torch.randperm(weight.shape[0], generator=g)
                ][:, None]
            )
        targets = random_images(4, seed=5)
        codes = adapter.encode_targets(targets)
        with torch.no_grad():
            x = targets.float() / 127.5 - 1.0
            h = vq.quant_conv(vq.encoder(x))
            _, _, unnormalised = vq.quantize(h)
        expected = _cosine_nearest(h, weight.detach())
        assert codes.flatten().tolist() == expected
        assert (unnormalised.view(4, -1) != codes).any()  # the scaling does change the answer
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_nearest_codes_ignores_row_norms():
    # Direction (1, 0) is nearest to row 0 by angle; row 1 is closer in plain distance only
    # because row 0 is long.
    codebook = torch.tensor([[100.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    latents = torch.tensor([[1.0, 0.05], [-3.0, 0.1]]).T.reshape(1, 2, 1, 2)
    from trainer.adapters.janus.adapter import nearest_codes

    assert nearest_codes(latents, codebook).tolist() == [[0, 2]]
    plain = torch.cdist(latents.permute(0, 2, 3, 1).reshape(-1, 2), codebook).argmin(1)
    assert plain.tolist() == [1, 2]


def test_guidance_uses_the_trained_unconditional_branch(adapter):
    """cfg logits are u + w (c - u) with u = prompt dropped, image kept: w = 0 is the
    unconditional branch alone, w = 1 the conditional one alone (greedy, so exact)."""
    images = random_images(2, seed=7)
    prompt = "Generate the depth map of this image."
    uncond = adapter.generate(images, "", temperature=0)
    cond = adapter.generate(images, prompt, temperature=0)
    assert not torch.equal(cond, uncond)  # else the check below could not tell them apart
    assert torch.equal(adapter.generate(images, prompt, temperature=0, cfg_weight=0.0), uncond)
    assert torch.equal(adapter.generate(images, prompt, temperature=0, cfg_weight=1.0), cond)
    guided = adapter.generate(images, prompt, temperature=0, cfg_weight=5.0)
    assert guided.shape == cond.shape and guided.dtype == torch.uint8


def test_padding_does_not_change_a_rows_loss(adapter):
    """Mean loss of a padded batch == mean of each row's loss computed alone."""
    prompts = ("A much longer prompt than the other one, really.", "")
    full = generation_batch(adapter, prompts)
    enc = adapter.text_encoder()
    alone = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            one = collate(
                [
                    {
                        "task": "depth",
                        "batch": 0,
                        "input_ids": torch.tensor(enc.generation(p)),
                        "image": random_images(1, i)[0],
                        "target": random_images(1, 10 + i)[0],
                    }
                ],
                enc.pad_id,
            )
            alone.append(float(adapter.generation_loss(one)))
        both = float(adapter.generation_loss(full))
    assert full["attention_mask"][1].min() == 0  # row 1 really is padded
    assert both == pytest.approx(sum(alone) / 2, abs=1e-4)


def test_generate_and_save_load_roundtrip(adapter, tmp_path):
    out = adapter.generate(random_images(2), "Generate the depth map of this image.", seed=1)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    adapter.save(tmp_path / "ckpt")
    again = JanusAdapter.load(str(tmp_path / "ckpt"))
    assert again.random_weights
    sd1, sd2 = adapter.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_gradient_checkpointing_gives_the_same_gradients(adapter):
    batch = generation_batch(adapter)
    model = adapter.model
    model.train()
    try:
        grads = []
        for gc in (False, True):
            if gc:
                adapter.enable_checkpointing()
            model.zero_grad()
            adapter.generation_loss(batch).backward()
            grads.append(model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
    finally:
        off = getattr(model, "activation_checkpointing_disable", None)
        (off or model.gradient_checkpointing_disable)()
        model.eval()
