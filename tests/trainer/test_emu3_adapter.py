"""Emu3Adapter on tiny-random Emu3: the image layout against transformers' own Emu3Processor and
VQ tokenizer, labels only on visual tokens, losses against the model's own forward, the probe's
constraints, context-size refusal, answering, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.manifest import ManifestError
from tests.trainer.conftest import (
    CONVS,
    generation_batch,
    random_images,
    understanding_batch,
)
from trainer.adapters import Adapter, adapter_class
from trainer.adapters.common import IGNORE
from trainer.adapters.emu3.adapter import Emu3Adapter
from trainer.adapters.emu3.text import EOL, SYSTEM_PROMPT, VISUAL


@pytest.fixture(scope="module")
def adapter() -> Emu3Adapter:
    return Emu3Adapter.load("tiny-random")


def test_found_by_file_and_meets_the_protocol(adapter):
    assert adapter_class("emu3") is Emu3Adapter
    assert isinstance(adapter, Adapter)
    assert adapter.random_weights and adapter.image_size == 32 and adapter.grid == (4, 4)
    vq = adapter.model.config.vq_config
    assert vq.hidden_size == vq.base_channels * vq.channel_multiplier[-1]


def test_understanding_layout_matches_emu3_processor(adapter):
    """Token for token what transformers' Emu3Processor + Emu3Model.get_image_tokens make."""
    from transformers import Emu3Processor

    proc = Emu3Processor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer)
    arr = np.asarray(random_images(1, 3)[0].permute(1, 2, 0))
    question = "What is it?"
    text = f"{SYSTEM_PROMPT} USER: <image>{question} ASSISTANT:"
    inputs = proc(images=[Image.fromarray(arr)], text=[text], return_tensors="pt")
    theirs = inputs["input_ids"][0]
    h, w = (int(x) // 8 for x in inputs["image_sizes"][0])
    assert (h, w) == adapter.grid
    enc = adapter.text_encoder()
    ours = torch.tensor(enc.question(f"<image>\n{question}", h, w))
    assert torch.equal(ours, theirs)  # placeholders, markers and size prefix alike
    # The training sequence of a conversation starts with the very same tokens.
    ids, labels = enc.understanding([*CONVS[0][:1], {"from": "gpt", "value": "A cat."}])
    assert ids[: len(ours)] == ours.tolist() and set(labels[: len(ours)]) == {IGNORE}
    # Placeholders filled with the model's own image tokens (VQ codes -> vocabulary, EOL rows).
    model = adapter.model.model
    with torch.no_grad():
        ref = model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
    tokens = adapter.image_tokens(
        adapter.encode_codes(torch.from_numpy(arr).permute(2, 0, 1)[None])
    )
    assert torch.equal(tokens[0], ref)
    filled, _ = adapter.fill_images(ours[None], tokens)
    expected = theirs.clone()
    expected[theirs == model.vocabulary_mapping.image_token_id] = ref.long()
    assert torch.equal(filled[0], expected)
    # Layout: an EOL closes every row; every other image token is `<|visual token {code}|>`.
    rows = tokens[0].view(h, w + 1)
    eol = adapter.tokenizer.convert_tokens_to_ids(EOL)
    assert (rows[:, -1] == eol).all()
    codes = adapter.encode_codes(torch.from_numpy(arr).permute(2, 0, 1)[None])[0]
    names = adapter.tokenizer.convert_ids_to_tokens(rows[:, :-1].flatten().tolist())
    assert names == [VISUAL.format(int(c)) for c in codes.flatten()]


def test_understanding_loss_is_the_models_own_loss_on_answers(adapter):
    batch = understanding_batch(adapter)
    loss = adapter.understanding_loss(batch)
    # Reference: the model's forward on the filled ids with labels only on answers.
    tokens = adapter.image_tokens(adapter.encode_codes(batch["image"]))
    ids, _ = adapter.fill_images(batch["input_ids"], tokens)
    with torch.no_grad():
        ref = adapter.model(
            input_ids=ids, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # Prompt and image positions carry no loss.
    keep = batch["labels"] != IGNORE
    assert not keep[batch["input_ids"] == adapter.image_token_id].any()
    answer_ids = adapter.tokenizer.encode(" A cat.", add_special_tokens=False)
    row = batch["labels"][0][keep[0]].tolist()
    assert row == [*answer_ids, adapter.tokenizer.eos_token_id]


def test_generation_labels_only_on_the_targets_visual_tokens(adapter):
    batch = generation_batch(adapter)
    embeds, mask, pred, labels = adapter.generation_targets(batch)
    h, w = adapter.grid
    codes = adapter.encode_codes(batch["target"])
    # Exactly the h*w visual tokens of the target, in row order: no EOL, EOF, EOI, no text,
    # nothing of the condition image.
    assert labels.shape == (2, h * w)
    assert torch.equal(labels, adapter.visual_ids[codes].flatten(1))
    assert not (labels == adapter.eol_id).any()
    # Teacher forcing: the input right after each predicting position is the label's token.
    emb = adapter.model.get_input_embeddings()
    rows = torch.arange(2)[:, None].expand_as(pred)
    assert torch.allclose(embeds[rows, pred + 1], emb(labels))
    assert mask[rows, pred + 1].all()
    # The loss equals the model's own loss on the full sequence with labels on those tokens.
    loss = adapter.generation_loss(batch)
    enc = adapter.text_encoder()
    tokens = adapter.image_tokens(codes)
    cond = adapter.image_tokens(adapter.encode_codes(batch["image"]))
    refs = []
    for i, prompt in enumerate(("Generate the depth map of this image.", "")):
        prefix, _ = adapter.fill_images(torch.tensor([enc.generation(prompt)]), cond[i : i + 1])
        ids = torch.cat([prefix[0], tokens[i]])[None]
        lab = torch.full_like(ids, IGNORE)
        target_visual = torch.isin(tokens[i], adapter.visual_ids)
        lab[0, prefix.shape[1] :][target_visual] = tokens[i][target_visual]
        with torch.no_grad():
            refs.append(adapter.model(input_ids=ids, labels=lab).loss)
    assert loss.item() == pytest.approx(torch.stack(refs).mean().item(), rel=1e-5)
    loss.backward()
    vq_grads = [p.grad for n, p in adapter.model.named_parameters() if "vqmodel" in n]
    assert all(g is None for g in vq_grads)
    adapter.model.zero_grad(set_to_none=True)


def test_chunked_cross_entropy_matches_and_backpropagates():
    from trainer.adapters.emu3.text import lm_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    x = torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    a = lm_cross_entropy(head, x, t, chunk=5)
    (ga,) = torch.autograd.grad(a, x)
    b = torch.nn.functional.cross_entropy(head(x), t)
    (gb,) = torch.autograd.grad(b, x)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert torch.allclose(ga, gb, atol=1e-6)


def test_probe_keeps_emu3s_constraints_and_guidance(adapter):
    images = random_images(2)
    h, w = adapter.grid
    prompt = "Generate the depth map of this image."
    tokens = adapter.generate_tokens(images, prompt, seed=1, temperature=1.0, cfg_weight=3.0)
    rows = tokens.view(2, h, w + 1)
    assert (rows[..., -1] == adapter.eol_id).all()
    assert torch.isin(rows[..., :-1], adapter.visual_ids).all()
    # Guidance weight 0 is the unconditional branch (prompt dropped, image kept), 1 the prompt's.
    uncond = adapter.generate_tokens(images, "", temperature=0)
    cond = adapter.generate_tokens(images, prompt, temperature=0)
    assert torch.equal(adapter.generate_tokens(images, prompt, temperature=0, cfg_weight=0), uncond)
    assert torch.equal(adapter.generate_tokens(images, prompt, temperature=0, cfg_weight=1), cond)
    out = adapter.generate(images, prompt, seed=1, temperature=1.0, cfg_weight=3.0)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(
        out, adapter.generate(images, prompt, seed=1, temperature=1.0, cfg_weight=3.0)
    )
    assert Emu3Adapter.probe_cfg_weight == 3.0


def test_resolutions_must_fit_the_context(adapter):
    # tiny-random: 512 positions; two 112 px blocks (14 x 15 tokens each) plus the prompt fit.
    assert adapter.max_image_size == 112
    assert adapter.sequence_length(112) <= 512 < adapter.sequence_length(120)
    with pytest.raises(
        ManifestError, match=r"trainer.image_size: 120 px .* largest that fits is 112"
    ):
        adapter.check_image_size(120)
    with pytest.raises(ManifestError, match="multiple of the VQ's downsampling"):
        adapter.check_image_size(36)
    # Emu3's real context (9216): a 512 px condition plus a 512 px target fit, 720 px do not.
    real = Emu3Adapter.__new__(Emu3Adapter)
    real.__dict__.update(adapter.__dict__, context=9216, factor=8, source="Emu3")
    assert real.sequence_length(512) <= 9216 < real.sequence_length(720)
    assert 512 <= real.max_image_size < 720
    big = Emu3Adapter.load("tiny-random", image_size=64)
    assert big.image_size == 64 and big.text_encoder().grid == (8, 8)


def test_answer_batched_equals_one_by_one(adapter):
    g = np.random.default_rng(0)
    images = [
        Image.fromarray(g.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    ]
    prompts = ["What is it?", "Which colour dominates?"]
    batched = adapter.answer_ids(images, prompts, max_new_tokens=4)
    single = [adapter.answer_ids([i], [p], max_new_tokens=4)[0] for i, p in zip(images, prompts)]
    assert batched == single and all(len(r) <= 4 for r in batched)
    assert len(adapter.answer(images, prompts, max_new_tokens=4)) == 2


def test_save_and_load_back(adapter, tmp_path):
    big = Emu3Adapter.load("tiny-random", image_size=64)
    big.save(tmp_path / "ckpt")
    again = Emu3Adapter.load(str(tmp_path / "ckpt"))
    assert again.image_size == 64 and again.random_weights
    a, b = big.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ident = Emu3Adapter.identity(str(tmp_path / "ckpt"))
    assert ident["random_weights"] and ident["weights"]
