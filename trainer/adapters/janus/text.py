"""Janus's text side: its chat format and the token ids of both sequence kinds.

`chat_pieces` (Janus's chat format as pieces, `<|User|>` / `<|Assistant|>`, turns separated by a
blank line, opened by `SYSTEM_PROMPT`) and `JanusTextEncoder` (token ids for understanding and
generation sequences; picklable, runs in DataLoader workers). Used by the adapter (adapter.py)
for training and answering alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.adapters.common import IGNORE

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKEN, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT, SEP = "<|User|>", "<|Assistant|>", "\n\n"


#: Janus's default system prompt (deepseek-ai/Janus `VLChatProcessor.system_prompt`, the same text
#: transformers' JanusProcessor prepends with `use_default_system_prompt`).
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


def chat_pieces(
    conversations: list[dict[str, str]], system_prompt: str = ""
) -> list[tuple[str, str]]:
    """Janus's chat format as pieces `(kind, text)`, kind one of prompt | image | answer.

    The one place the format is written: training (`JanusTextEncoder.understanding`) and
    answering (`JanusTextEncoder.question`) both tokenize these pieces, so a question is asked
    exactly as training showed it. `image` marks where the image block goes: at the first
    `<image>` of the first human turn, or opening that turn when the text has no marker. A
    conversation ending with a human turn ends with `<|Assistant|>:` (the model answers next).
    Raises ValueError when the conversation is malformed.
    """
    pieces: list[tuple[str, str]] = []
    if system_prompt:
        pieces.append(("prompt", system_prompt + SEP))
    image_done = False
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"conversations[{i}].value: expected a string")
        if role in ("human", "user"):
            if not image_done:
                before, marker, after = value.partition("<image>")
                if not marker:
                    before, after = "", "\n" + value
                pieces += [
                    ("prompt", f"{USER}: {before}"),
                    ("image", ""),
                    ("prompt", f"{after.replace('<image>', '')}{SEP}{ASSISTANT}:"),
                ]
                image_done = True
            else:
                pieces.append(
                    ("prompt", f"{USER}: {value.replace('<image>', '')}{SEP}{ASSISTANT}:")
                )
        elif role in ("gpt", "assistant"):
            pieces.append(("answer", " " + value.strip()))
        else:
            raise ValueError(f"conversations[{i}].from: expected human or gpt, got {role!r}")
    if not image_done:
        raise ValueError("conversation has no human turn")
    return pieces


# --------------------------------------------------------------------------------------------
# text


@dataclass
class JanusTextEncoder:
    """Token ids for both sequence kinds. Picklable and CPU-only: runs in DataLoader workers."""

    tokenizer: Any
    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int
    boi_id: int
    eoi_id: int
    num_image_tokens: int
    max_length: int = 2048
    system_prompt: str = ""
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def _tok(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _image_block(self) -> list[int]:
        return [self.boi_id, *([self.image_id] * self.num_image_tokens), self.eoi_id]

    def understanding(self, conversations: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """LLaVA turns (`from`: human/gpt, `value`) -> (input_ids, labels).

        The format is `chat_pieces`; loss is taken on answers and their EOS. Raises ValueError
        when the conversation is malformed or nothing of an answer survives truncation to
        `max_length`.
        """
        ids, labels = [self.bos_id], [IGNORE]
        for kind, text in chat_pieces(conversations, self.system_prompt):
            if kind == "answer":
                answer = [*self._tok(text), self.eos_id]
                ids += answer
                labels += answer
                continue
            p = self._image_block() if kind == "image" else self._tok(text)
            ids += p
            labels += [IGNORE] * len(p)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if self.image_id in ids and ids.count(self.image_id) != self.num_image_tokens:
            raise ValueError(f"image block cut by truncation to {self.max_length} tokens")
        if all(t == IGNORE for t in labels):
            raise ValueError(f"no answer tokens within {self.max_length} tokens")
        return ids, labels

    def question(self, prompt: str) -> list[int]:
        """One question about the image, formatted as training formats it, ending with
        `<|Assistant|>:` (the answer is generated next)."""
        ids = [self.bos_id]
        for kind, text in chat_pieces([{"from": "human", "value": prompt}], self.system_prompt):
            ids += self._image_block() if kind == "image" else self._tok(text)
        return ids

    def text_to_image(self, caption: str) -> list[int]:
        """Caption alone, ending with [BOI]: Janus's own text-to-image sequence
        (`<|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>`, no system prompt, as its
        generation code). Raises ValueError when the caption does not fit."""
        ids = [
            self.bos_id,
            *self._tok(f"{USER}: {caption}{SEP}{ASSISTANT}:"),
            self.boi_id,
        ]
        if len(ids) > self.max_length:  # max_length leaves room for the image's codes
            raise ValueError(f"caption of {len(ids)} tokens does not fit {self.max_length}")
        return ids

    def generation(self, prompt: str) -> list[int]:
        """Condition image + prompt, ending with [BOI]: the next tokens are the image's codes."""
        key = prompt
        if key not in self._cache:
            self._cache[key] = [
                self.bos_id,
                *self._tok(f"{USER}: "),
                *self._image_block(),
                *self._tok(f"\n{prompt}{SEP}{ASSISTANT}:"),
                self.boi_id,
            ]
        return list(self._cache[key])
