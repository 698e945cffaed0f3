"""Model-family adapters: the only place that knows how one UMM family computes its losses.

The trainer (trainer/loop.py) never touches a model's internals. It talks to an adapter through
the small protocol below. A model family is one package here, `trainer/adapters/<name>/`
(janus/, emu3/), holding everything only it uses (its adapter, its text side, its processor,
its tiny-random builder beside it), whose `__init__.py` names its adapter class in
`ADAPTER = MyAdapter`; the manifest's `trainer.adapter: <name>` then selects it. What the families
share is written once in trainer/adapters/common.py: `BaseAdapter` implements most of the
protocol (loading frame, identity, `understanding_loss`, `save`, `answer`, the KV-cache
branches of the probe), so a new family writes only what differs (common.py lists it).

Protocol (see `Adapter` for signatures):

    name                     registry key, the manifest's `trainer.adapter`
    model                    the torch.nn.Module that trains (its state is what checkpoints hold)
    image_size               side of the square images the data layer must deliver (pixels)
    num_image_tokens         VQ codes per generated image (what the generation loss predicts)
    image_mean               per-channel mean (0-1) of its normalisation; understanding images
                               are padded with it (x 255) unless the manifest sets pad_color
    probe_cfg_weight         the family's own guidance weight, used when the manifest sets none
    random_weights           True when the weights are `tiny-random` (probe grids say so)
    frozen_patterns          fnmatch patterns of parameters that never train (e.g. the VQ model)
    encoder_patterns         fnmatch patterns of the understanding encoder's parameters (their
                               AdamW groups take `trainer.encoder_lr_scale`; empty: none)
    condition_grad_scale     factor on the gradient into the understanding encoder's output
                               features (`scale_grad`); the trainer sets it from the manifest
    text_encoder()           a picklable, CPU-only object run inside DataLoader workers:
                               .understanding(conversations) -> (input_ids, labels)
                               .generation(prompt) -> input_ids
                               .text_to_image(caption) -> input_ids (no image block)
                               .pad_id
    understanding_loss(b)    cross-entropy on answer tokens only (labels -100 elsewhere)
    generation_loss(b)       loss of generating b["target"] from (b["image"], prompt ids); a
                               batch without "image" (text_to_image) from the caption alone
    generate(images, prompt, seed, temperature, cfg_weight)
                             uint8 images generated for the probe grid; cfg_weight != 1:
                               classifier-free guidance with the prompt dropped, image kept
    answer(images, prompts, max_new_tokens)
                             greedy text replies, one per (PIL image, question), batched (left
                               padding, KV cache); the question is formatted as the model's
                               understanding training formats it (its chat format, system prompt)
                               and the image goes through the model processor's own preprocessing
    enable_checkpointing()   recompute activations in the backward pass
    save(path, dtype=None)   a directory that `load(path)` reads back and transformers opens on its
                               own (AutoModel, AutoProcessor, AutoTokenizer); floating weights
                               stored in `dtype` (the training dtype) when given
    load(spec, revision, base_dir, device, image_size)
                             classmethod: hub id, local directory, checkpoint or `tiny-random`;
                               `image_size` (the manifest's, none: the model's own) is refused
                               with a one-line ValueError when the family cannot take it
    identity(spec, ...)      classmethod: a JSON-able identity of the weights for fingerprints,
                               computed without loading the model

Batches (built by trainer/data.py `collate`) are dicts of tensors:

    input_ids      (B, L) int64, right-padded with text_encoder().pad_id
    attention_mask (B, L) int64, 0 on padding
    labels         (B, L) int64, understanding only: -100 where no loss is taken
    image          (B, 3, S, S) uint8, the input (condition) image, square-padded to image_size
                     (absent in text_to_image batches)
    target         (B, 3, S, S) uint8, generation only: the image to generate

Images travel as uint8 and are normalised on the device by the adapter (less to copy, and the
normalisation belongs to the model family).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["Adapter", "TextEncoder", "adapter_class", "available_adapters"]

# This package imports no torch: find_spec("trainer.adapters.<name>") at manifest parse time
# imports it. A family package (and common.py) does, when `adapter_class` imports it.


@runtime_checkable
class TextEncoder(Protocol):
    """Turns text into token ids inside DataLoader workers (no model, no device)."""

    pad_id: int

    def understanding(self, conversations: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """LLaVA turns -> (input_ids, labels); labels are -100 except on answer tokens."""
        ...

    def generation(self, prompt: str) -> list[int]:
        """A prompt with the condition image -> input_ids ending where image tokens start."""
        ...

    def text_to_image(self, caption: str) -> list[int]:
        """A caption, no image -> input_ids ending where the image's tokens start."""
        ...


@runtime_checkable
class Adapter(Protocol):
    name: ClassVar[str]
    model: Any
    image_size: int
    num_image_tokens: int
    image_mean: tuple[float, float, float]
    probe_cfg_weight: ClassVar[float]
    random_weights: bool
    frozen_patterns: tuple[str, ...]
    encoder_patterns: tuple[str, ...]

    def text_encoder(self) -> TextEncoder: ...

    def understanding_loss(self, batch: dict[str, Any]) -> Any: ...

    def generation_loss(self, batch: dict[str, Any]) -> Any: ...

    def generate(
        self,
        images: Any,
        prompt: str,
        seed: int = 0,
        temperature: float = 1.0,
        cfg_weight: float = 1.0,
    ) -> Any: ...

    def answer(self, images: list[Any], prompts: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy replies (raw text) to one question per image; a batch answers as one by one."""
        ...

    def enable_checkpointing(self) -> None: ...

    def save(self, path: Path, dtype: Any = None) -> None: ...

    @classmethod
    def load(
        cls,
        spec: str,
        revision: str | None = None,
        base_dir: Path | None = None,
        device: str = "cpu",
        image_size: int | None = None,
    ) -> Adapter: ...

    @classmethod
    def identity(
        cls, spec: str, revision: str | None = None, base_dir: Path | None = None
    ) -> dict[str, Any]: ...


def available_adapters() -> list[str]:
    """Names of the family packages in this folder (no import of any of them)."""
    import pkgutil

    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")
    )


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class the package `trainer/adapters/<name>/` names in its `ADAPTER`
    (imported lazily: it pulls in torch)."""
    if name not in available_adapters():
        raise ValueError(
            f"trainer.adapter: unknown adapter {name!r}, known: {available_adapters()}"
        )
    package = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(package, "ADAPTER"):
        raise ValueError(
            f"trainer/adapters/{name}/__init__.py: defines no ADAPTER = <adapter class>"
        )
    return package.ADAPTER
