"""A `JanusProcessor` built for a Janus model that has none (tiny-random, older checkpoints).

`build_processor` joins a `JanusImageProcessor` (CLIP normalisation by default), the tokenizer
with its image token names and Janus's chat template (`CHAT_TEMPLATE`): what
`AutoProcessor.from_pretrained` opens from a saved folder. Used by the adapter (adapter.py) and
the tiny-random builder (tiny.py).
"""

from __future__ import annotations

from pipeline.pretrained import from_pretrained
from trainer.adapters.janus.text import BOI, EOI, IMAGE_TOKEN

__all__ = ["CHAT_TEMPLATE", "CLIP_MEAN", "CLIP_STD", "build_processor", "with_image_token_names"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


#: Janus's chat format for `processor.apply_chat_template` (written for tiny-random and for a
#: base model that has no processor of its own; a hub model's own template is kept as it is).
CHAT_TEMPLATE = (  # one line, no whitespace control needed: the text is exactly what renders
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}"
    "{{ '<|User|>' if message['role'] == 'user' else '<|Assistant|>' }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image_placeholder>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<｜end▁of▁sentence｜>' if message['role'] == 'assistant' else '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build_processor(tokenizer, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, num_image_tokens=576):
    """A `JanusProcessor` (image processor + tokenizer + chat template) for a model that has none:
    what `AutoProcessor.from_pretrained` opens from a saved folder."""
    from transformers import JanusImageProcessor, JanusProcessor

    tokenizer = with_image_token_names(tokenizer)
    image_processor = JanusImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        min_size=14,
    )
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
        # Explicit: the library's default changed (True before transformers 5.2x, False after);
        # Janus checkpoints prepend the system prompt (the adapter reads this).
        use_default_system_prompt=True,
    )


def with_image_token_names(tokenizer):
    """The tokenizer with `image_token` / `boi_token` / `eoi_token` named, as JanusProcessor
    needs (a tokenizer saved without the names is reloaded through its files with them)."""
    if getattr(tokenizer, "image_token", None) is not None:
        return tokenizer
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return from_pretrained(
            AutoTokenizer,
            d,
            extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI},
        )
