"""Emu3's text side: its chat format, the token ids of both sequence kinds, the chunked loss.

`chat_pieces` (Emu3's chat format as pieces), `Emu3TextEncoder` (token ids for understanding and
generation sequences; picklable, runs in DataLoader workers) and `lm_cross_entropy` (the loss over
the 184k vocabulary, in chunks recomputed in the backward pass). Used by the adapter
(adapter.py) for training and answering alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainer.adapters.common import IGNORE

IMAGE_TOKEN, BOI, EOI = "<image>", "<|image start|>", "<|image end|>"
IMG, EOL, EOF = "<|image token|>", "<|extra_200|>", "<|extra_201|>"
BOS, EOS, PAD = "<|extra_203|>", "<|extra_204|>", "<|endoftext|>"
VISUAL = "<|visual token {:06d}|>"
#: Emu3's chat format (baaivision/Emu3 `Emu3Processor.chat_template`).
SYSTEM_PROMPT = "You are a helpful assistant."
USER, ASSISTANT = "USER: ", " ASSISTANT:"


def chat_pieces(
    conversations: list[dict[str, str]], system_prompt: str = SYSTEM_PROMPT
) -> list[tuple[str, str]]:
    """Emu3's chat format as pieces `(kind, text)`, kind one of prompt | image | answer.

    `{system} USER: {image}{question} ASSISTANT: {answer}` then ` USER: {question} ASSISTANT:
    {answer}` per further turn; the image block goes where the first human turn's `<image>` is
    (whitespace next to the marker dropped: Emu3 writes `{image}{text}`), or opens that turn.
    Training and `answer()` both tokenize these pieces. Raises ValueError when malformed.
    """
    pieces: list[tuple[str, str]] = []
    head = f"{system_prompt} " if system_prompt else ""
    image_done = False
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"conversations[{i}].value: expected a string")
        if role in ("human", "user"):
            opener = head + USER if not pieces else " " + USER
            if not image_done:
                before, _, after = value.partition("<image>")
                if "<image>" not in value:
                    before, after = "", value
                pieces += [("prompt", opener + before.rstrip()), ("image", "")]
                pieces.append(("prompt", after.replace("<image>", "").strip() + ASSISTANT))
                image_done = True
            else:
                pieces.append(("prompt", opener + value.replace("<image>", "").strip() + ASSISTANT))
        elif role in ("gpt", "assistant"):
            pieces.append(("answer", " " + value.strip()))
        else:
            raise ValueError(f"conversations[{i}].from: expected human or gpt, got {role!r}")
    if not image_done:
        raise ValueError("conversation has no human turn")
    return pieces


def lm_cross_entropy(head, hidden: torch.Tensor, target: torch.Tensor, chunk: int = 1024):
    """Mean cross-entropy of `head(hidden)` (N, D) against `target` (N,), over the full vocabulary.

    Projected `chunk` rows at a time and recomputed in the backward pass, so at most one
    (chunk x vocabulary) float32 block is alive: 184k-entry logits for 4096 image tokens would
    be 3 GB per sample.
    """
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0

    def ce_sum(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    if n <= chunk:
        return ce_sum(hidden, target) / n
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        h, t = hidden[s : s + chunk], target[s : s + chunk]
        total = total + checkpoint(ce_sum, h, t, use_reentrant=False)
    return total / n


# --------------------------------------------------------------------------------------------
# text


@dataclass
class Emu3TextEncoder:
    """Token ids with `<image>` placeholders. Picklable and CPU-only: runs in DataLoader workers."""

    tokenizer: Any
    ids: dict[str, int]  # bos eos pad image boi eoi img eof
    grid: tuple[int, int]  # (h, w) of the training images' code grid
    max_length: int = 9216
    system_prompt: str = SYSTEM_PROMPT
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def pad_id(self) -> int:
        return self.ids["pad"]

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def image_block(self, h: int | None = None, w: int | None = None) -> list[int]:
        """The processor's layout: BOI, size prefix, IMG, h*(w+1) placeholders, EOF, EOI."""
        h, w = (h, w) if h is not None else self.grid
        i = self.ids
        return [
            i["boi"],
            *self._tok(f"{h}*{w}"),
            i["img"],
            *([i["image"]] * (h * (w + 1))),
            i["eof"],
            i["eoi"],
        ]

    def understanding(self, conversations: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """LLaVA turns -> (input_ids, labels): loss on answers and their EOS (`chat_pieces`).

        Raises ValueError when malformed, or when the image block or every answer token would
        be cut by truncation to `max_length`.
        """
        ids, labels = [self.ids["bos"]], [IGNORE]
        for kind, text in chat_pieces(conversations, self.system_prompt):
            if kind == "answer":
                answer = [*self._tok(text), self.ids["eos"]]
                ids += answer
                labels += answer
                continue
            p = self.image_block() if kind == "image" else self._tok(text)
            ids += p
            labels += [IGNORE] * len(p)
        if len(ids) > self.max_length:
            if self.ids["eoi"] not in ids[: self.max_length]:
                raise ValueError(f"image block cut by truncation to {self.max_length} tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(t == IGNORE for t in labels):
            raise ValueError(f"no answer tokens within {self.max_length} tokens")
        return ids, labels

    def question(self, prompt: str, h: int | None = None, w: int | None = None) -> list[int]:
        """One question about an (h x w)-code image, formatted as training formats it, ending
        with `ASSISTANT:`."""
        ids = [self.ids["bos"]]
        for kind, text in chat_pieces([{"from": "human", "value": prompt}], self.system_prompt):
            ids += self.image_block(h, w) if kind == "image" else self._tok(text)
        return ids

    def text_to_image(self, caption: str) -> list[int]:
        """Caption alone + the target's BOI, size prefix and IMG: Emu3-Gen's sequence
        (`[BOS]{caption}[BOI]{h}*{w}[IMG]`), no condition image. Raises ValueError when the
        caption and the image do not fit the context."""
        h, w = self.grid
        ids = [
            self.ids["bos"],
            *self._tok(caption),
            self.ids["boi"],
            *self._tok(f"{h}*{w}"),
            self.ids["img"],
        ]
        if len(ids) + h * (w + 1) > self.max_length:
            raise ValueError(f"caption of {len(ids)} tokens does not fit {self.max_length}")
        return ids

    def generation(self, prompt: str) -> list[int]:
        """Condition image + prompt + the target's BOI, size prefix and IMG: the next tokens are
        the target's visual tokens."""
        if prompt not in self._cache:
            h, w = self.grid
            self._cache[prompt] = [
                self.ids["bos"],
                *self.image_block(),
                *self._tok(prompt),
                self.ids["boi"],
                *self._tok(f"{h}*{w}"),
                self.ids["img"],
            ]
        return list(self._cache[prompt])
