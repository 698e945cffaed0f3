"""JanusAdapter.answer on tiny-random Janus: batched greedy == one by one, left padding, the
prompt format shared with training, the processor's image preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.adapters.common import IGNORE
from trainer.adapters.janus.adapter import JanusAdapter
from trainer.adapters.janus.text import SYSTEM_PROMPT


@pytest.fixture(scope="module")
def adapter() -> JanusAdapter:
    a = JanusAdapter.load("tiny-random")
    # tiny-random's own weights answer every question with the same token; larger random
    # weights make replies depend on the image and the question, so a padding bug shows.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return a


def _pil(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


PROMPTS = ["What is it?", "Describe this image in many words, please, carefully.", "A?", "Why?"]
SIZES = [(30, 20), (32, 32), (10, 50), (64, 48)]


def test_batched_greedy_answers_equal_one_by_one(adapter):
    images = [_pil(i, s) for i, s in enumerate(SIZES)]
    enc = adapter.text_encoder()
    lengths = {len(enc.question(p)) for p in PROMPTS}
    assert len(lengths) > 1  # the batch really is left-padded
    batched = adapter.answer(images, PROMPTS, max_new_tokens=6)
    alone = [adapter.answer([im], [p], max_new_tokens=6)[0] for im, p in zip(images, PROMPTS)]
    assert batched == alone
    assert len(set(alone)) > 1  # replies depend on the input: the comparison can fail
    assert all(isinstance(r, str) for r in batched)


def test_padding_position_does_not_change_a_reply(adapter):
    """The short question alone vs beside a much longer one (so it is padded on the left)."""
    img = _pil(7, (40, 24))
    short = adapter.answer([img], ["A?"], max_new_tokens=5)[0]
    with_long = adapter.answer([_pil(8, (24, 40)), img], [PROMPTS[1] * 3, "A?"], 5)[1]
    assert with_long == short


def test_reply_length_is_bounded(adapter):
    ids = adapter.answer_ids([_pil(3, (32, 32))], ["Say something."], max_new_tokens=3)[0]
    assert 0 < len(ids) <= 3 and adapter.text_encoder().eos_id not in ids
    assert adapter.answer([], [], 4) == []
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        adapter.answer([_pil(1, (8, 8))] * 2, ["x"], 4)


def test_question_is_the_training_prompt_up_to_the_answer(adapter):
    enc = adapter.text_encoder()
    q = "<image>\nIs the sky blue?"
    ids, labels = enc.understanding(
        [{"from": "human", "value": q}, {"from": "gpt", "value": "Yes"}]
    )
    first_answer = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert enc.question(q) == ids[:first_answer]
    text = enc.tokenizer.decode(enc.question(q))
    assert text.split("<|User|>")[0].endswith(SYSTEM_PROMPT + "\n\n")
    assert text.endswith("Is the sky blue?\n\n<|Assistant|>:")


def test_system_prompt_follows_the_checkpoint(adapter, tmp_path):
    assert SYSTEM_PROMPT in adapter.tokenizer.decode(adapter.text_encoder().question("q"))
    adapter.save(tmp_path / "with")
    assert JanusAdapter.load(str(tmp_path / "with")).system_prompt == SYSTEM_PROMPT
    cfg = json.loads((tmp_path / "with" / "processor_config.json").read_text())
    cfg["use_default_system_prompt"] = False
    (tmp_path / "with" / "processor_config.json").write_text(json.dumps(cfg))
    plain = JanusAdapter.load(str(tmp_path / "with"))
    assert plain.system_prompt == ""
    assert SYSTEM_PROMPT not in plain.tokenizer.decode(plain.text_encoder().question("q"))


def test_images_are_padded_with_the_processors_background(adapter):
    proc = adapter.image_processor
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    px = proc(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert px.shape == (3, adapter.image_size, adapter.image_size)
    mean = torch.tensor(adapter.image_mean).view(3)
    std = torch.tensor(adapter.image_std).view(3)
    fill = torch.tensor(proc.background_color, dtype=torch.float32) / 255
    assert torch.allclose(px[:, 0, 0], (fill - mean) / std, atol=1e-4)  # padded band
    mid = adapter.image_size // 2
    assert torch.allclose(px[:, mid, mid], (1 - mean) / std, atol=1e-3)  # the white image


def test_bfloat16_weights_answer_and_generate():
    """On CUDA the eval stage casts the model to bfloat16 (no autocast around answer());
    the generation probe runs under bfloat16 autocast. Both checked here on CPU."""
    from trainer.evaluation.evaluate import _autocast

    a = JanusAdapter.load("tiny-random")
    a.model.to(torch.bfloat16)
    replies = a.answer([_pil(1, (20, 30)), _pil(2, (30, 20))], ["q?", "a longer question?"], 3)
    assert len(replies) == 2
    with _autocast(a):
        out = a.generate(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "Generate.", seed=0)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
