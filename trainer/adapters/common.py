"""What the model families share, written once: `BaseAdapter` and the helpers around it.

A family is a package `trainer/adapters/<family>/` (adapter.py, text.py, tiny.py, ...) whose
adapter subclasses `BaseAdapter` and writes only what differs:

    model_class()           the transformers class `load` builds from a folder
    _from_folder(...)       the adapter from the loaded model, tokenizer and the folder's files
                              (its processor, normalisation; refusing an `image_size` it cannot
                              take)
    language_model()        the decoder under `lm_head` (the module whose final hidden states
                              the losses read)
    _embed(ids, images)     input embeddings with the condition images in place (images None:
                              a sequence without an image)
    token_loss(h, target)   optional: cross-entropy of `lm_head` at the answer positions
                              (default: one projection, `F.cross_entropy`)
    _answer_ids(...)        its questions' token rows and image inputs, handed to `_greedy`
    _save_processor(path)   what beside the weights makes a saved folder open in transformers
    _meta()                 optional: more keys for the folder's META_FILE
    _default_image_processor()  the image processor of a folder that has none
    tiny_random_dir         its tiny-random builder (tiny.py, built on `tiny_random_folder`)
    text_encoder, generation_loss, generate, its VQ side

`BaseAdapter` gives the rest: spec resolution, `load` and the fingerprint's `identity` (no model
loaded), `device`, `enable_checkpointing`, the language model call with or without a KV cache
(`_lm`), `understanding_loss`, the frame of `save`, the probe's KV-cache branches (`_branches`,
`_advance`), `answer` and the left-padded greedy decoding behind `answer_ids` (`_greedy`).

Around it: `scale_grad` (the released code's gradient scale on the understanding features),
model specs to folders and their identity (`resolve_model`, `model_identity`, `read_json`,
`META_FILE`), `save_weights` (storage dtype), and the tiny-random models' byte-level tokenizer and
cache folder (`byte_level_tokenizer`, `tiny_random_folder`).

Spec resolution: `tiny-random`, a local directory (a training checkpoint `step_NNNNNN/` means its
`model/`), or a hub id, which must be in the local Hugging Face cache and resolves to its
snapshot folder, named by the commit. The identity of a hub id names that commit, so
`revision: null` still pins the weights actually loaded (a tag or `main` moves).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pipeline.config import resolve_path
from pipeline.fingerprint import hash_files, hub_snapshot, is_hub_snapshot, tiny_random_cache
from pipeline.pretrained import from_pretrained
from pipeline.shards import atomic_build_dir, make_readable
from trainer.checkpoints import MODEL_SUBDIR

__all__ = [
    "IGNORE",
    "META_FILE",
    "TINY_LIBRARIES",
    "BaseAdapter",
    "byte_level_tokenizer",
    "model_identity",
    "read_json",
    "resolve_model",
    "save_weights",
    "scale_grad",
    "set_config_dtype",
    "tiny_random_folder",
]

#: Label of a position that carries no loss (the labels of every family's text encoder).
IGNORE = -100
#: Our own file in a model folder: which adapter wrote it, whether the weights are random.
META_FILE = "unimrg_adapter.json"
WEIGHT_GLOBS = ("*.safetensors", "*.bin")
#: Libraries whose classes and defaults shape a tiny-random model's files (its cache key).
TINY_LIBRARIES = ("torch", "transformers", "tokenizers")


# --------------------------------------------------------------------------------------------
# gradient scale


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: Any, scale: float) -> Any:
    """`x` unchanged in the forward pass; its gradient multiplied by `scale` in the backward.

    The released UniMRG code's `grad_scale` (0.1) on the understanding encoder's features: the
    losses see the exact features, the encoder gets a tenth of their gradient.
    """
    if scale == 1.0:
        return x
    return _ScaleGrad.apply(x, float(scale))


# --------------------------------------------------------------------------------------------
# model specs


def read_json(folder: str | Path, name: str) -> dict | None:
    """The JSON file `name` in `folder`, or None when the folder has none."""
    p = Path(folder) / name
    return json.loads(p.read_text()) if p.is_file() else None


def resolve_model(
    spec: str,
    base_dir: Path | None,
    revision: str | None,
    tiny_random_dir: Callable[[], Path],
) -> tuple[Path, dict[str, Any]]:
    """(local folder, the content of its META_FILE or {}) for a model spec; `tiny_random_dir`
    builds (once) and returns the family's tiny-random folder. A relative directory is taken
    against `base_dir` (the manifest's folder)."""
    if spec == "tiny-random":
        p = tiny_random_dir()
        return p, read_json(p, META_FILE) or {}
    p = resolve_path(spec, base_dir)
    if p.is_dir():
        if (p / MODEL_SUBDIR / "config.json").is_file():
            p = p / MODEL_SUBDIR
        return p, read_json(p, META_FILE) or {}
    snapshot = hub_snapshot(spec, revision)
    if snapshot is None:
        raise ValueError(
            f"trainer.model: {spec!r} (revision {revision or 'main'}) is not a local directory "
            f"({p}) and not in the local Hugging Face cache. Download it where the hub is "
            f"reachable (`hf download {spec}`), or set trainer.model to a local directory or "
            "`tiny-random`."
        )
    return snapshot, {}


def model_identity(spec: str, folder: Path, random_weights: bool) -> dict[str, Any]:
    """The fingerprint's identity of the weights in `folder` (resolved from `spec`): their
    hash, whether they are random, and where they come from; a hub snapshot is named by its id
    and commit, not by the cache path (which differs between machines)."""
    files = [f for g in WEIGHT_GLOBS for f in folder.glob(g)]
    ident: dict[str, Any] = {
        "weights": hash_files(files) if files else None,
        "random_weights": random_weights,
        "model": "tiny-random" if spec == "tiny-random" else str(folder),
    }
    if is_hub_snapshot(folder):
        ident.update(model=spec, revision=folder.name)
    return ident


# --------------------------------------------------------------------------------------------
# saving


def save_weights(model: Any, path: Path, dtype: Any = None) -> None:
    """`model.save_pretrained(path)` with floating-point weights stored in `dtype` (the training
    dtype: bf16 on CUDA; None or float32: as they are). The config records the storage dtype so
    `from_pretrained(dtype="auto")` loads it as saved."""
    state = None
    if dtype is not None and dtype != torch.float32:
        state = {
            k: v.detach().to(dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
    model.save_pretrained(path, state_dict=state)
    if state is not None:
        set_config_dtype(Path(path), str(dtype).removeprefix("torch."))


def set_config_dtype(path: Path, dtype: str) -> None:
    """Record the storage dtype in a saved config.json (save_pretrained writes the live model's
    float32 master dtype even when the state dict it was given is bf16)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for sub in (cfg, *(v for v in cfg.values() if isinstance(v, dict) and "dtype" in v)):
        sub["dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# tiny-random


def byte_level_tokenizer(bos: str, eos: str, pad: str, **extra: Any):
    """A `PreTrainedTokenizerFast` over bytes with these BOS / EOS / PAD tokens: one token per
    byte (the 256 symbols of byte-level BPE, no merges), so any text encodes without a trained
    vocabulary; each family then adds its own special tokens. `extra`: more keyword arguments
    for its constructor (Emu3's `extra_special_tokens`, say)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=512,
        **extra,
    )


def tiny_random_folder(
    family: str, version: str, build: Callable[[Path], None], meta: dict[str, Any] | None = None
) -> Path:
    """Build (once) and return a family's tiny-random folder,
    `<cache_dir>/tiny-random/<family>/<version>-<key>/` (`pipeline.fingerprint.tiny_random_cache`,
    the key hashing `TINY_LIBRARIES`' versions): `build(tmp)` writes the model, tokenizer and
    processor files, then META_FILE (`{"adapter": family, "random_weights": true, **meta}`) marks
    the folder complete. Bump `version` when a builder changes what it saves."""
    final = tiny_random_cache(family, version, TINY_LIBRARIES)

    def run(tmp: Path) -> None:
        build(tmp)
        (tmp / META_FILE).write_text(
            json.dumps({"adapter": family, "random_weights": True, **(meta or {})})
        )

    return atomic_build_dir(final, run, marker=META_FILE)


# --------------------------------------------------------------------------------------------
# the adapter base


class BaseAdapter:
    """The part of the adapter protocol (trainer/adapters/__init__.py) every family shares; a
    family subclasses it and writes what the module docstring lists."""

    name: ClassVar[str]
    frozen_patterns: tuple[str, ...] = ("model.vqmodel.*",)
    encoder_patterns: tuple[str, ...] = ()
    #: gradient factor into the understanding encoder's output features (the trainer sets the
    #: manifest's `trainer.condition_grad_scale`; 1.0 for plain use)
    condition_grad_scale: float = 1.0
    probe_cfg_weight: ClassVar[float]
    #: () -> the family's tiny-random folder, built once (a staticmethod of the subclass)
    tiny_random_dir: ClassVar[Callable[[], Path]]

    def __init__(
        self,
        model,
        tokenizer,
        image_mean,
        image_std,
        random_weights: bool,
        source: str,
        system_prompt: str,
        image_processor: Any,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.random_weights = random_weights
        self.source = source
        self.system_prompt = system_prompt
        self._image_processor = image_processor
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        lm = self.language_model()
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        )

    # ---- what a family writes

    @classmethod
    def model_class(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def _from_folder(
        cls, spec: str, path: str, meta: dict[str, Any], model, tokenizer, image_size: int | None
    ) -> BaseAdapter:
        raise NotImplementedError

    def language_model(self) -> Any:
        raise NotImplementedError

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _answer_ids(self, images: list[Any], prompts: list[str], max_new_tokens: int):
        raise NotImplementedError

    def _save_processor(self, path: Path) -> None:
        raise NotImplementedError

    def _default_image_processor(self) -> Any:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        """Keys of META_FILE beyond adapter, random_weights and base."""
        return {}

    def text_encoder(self) -> Any:
        raise NotImplementedError

    # ---- spec and identity

    @classmethod
    def resolve(
        cls, spec: str, base_dir: Path | None = None, revision: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """(local folder, our metadata file's content or {}) for a model spec (`resolve_model`:
        a hub id resolves to its cached snapshot folder)."""
        path, meta = resolve_model(spec, base_dir, revision, cls.tiny_random_dir)
        return str(path), meta

    @classmethod
    def identity(
        cls, spec: str, revision: str | None = None, base_dir: Path | None = None
    ) -> dict[str, Any]:
        """The weights' identity for fingerprints (`model_identity`); loads no model."""
        path, meta = cls.resolve(spec, base_dir, revision)
        return model_identity(spec, Path(path), bool(meta.get("random_weights", False)))

    @classmethod
    def load(
        cls,
        spec: str,
        revision: str | None = None,
        base_dir: Path | None = None,
        device: str = "cpu",
        image_size: int | None = None,
    ) -> BaseAdapter:
        """The adapter of a model spec (a hub id in the local cache, a local directory or
        checkpoint, `tiny-random`): `model_class()` and the tokenizer from its folder, master
        weights in float32 on `device` whatever the storage precision (checkpoints are bf16 on
        CUDA), then `_from_folder`. `image_size`: the manifest's (None: the model's own); one
        the family cannot take is refused with a one-line ManifestError."""
        from transformers import AutoTokenizer

        path, meta = cls.resolve(spec, base_dir, revision)
        model = from_pretrained(cls.model_class(), path, dtype=torch.float32).to(device)
        tokenizer = from_pretrained(AutoTokenizer, path)
        return cls._from_folder(spec, path, meta, model, tokenizer, image_size)

    # ---- saving

    def save(self, path: Path, dtype: torch.dtype | None = None) -> None:
        """A folder `load` and transformers read back on their own (AutoModel,
        AutoModelForImageTextToText, AutoProcessor, AutoTokenizer: `_save_processor`) and our
        META_FILE. `dtype`: the storage precision of floating-point weights (the training dtype:
        bf16 on CUDA); the config records it so `from_pretrained(dtype="auto")` loads it as saved.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(self.model, path, dtype)
        self._save_processor(path)
        meta = {"adapter": self.name, "random_weights": self.random_weights, "base": self.source}
        (path / META_FILE).write_text(json.dumps({**meta, **self._meta()}))
        make_readable(path)  # safetensors writes its file 0600

    def enable_checkpointing(self) -> None:
        """Recompute activations in backward (transformers renamed the method in 5.x)."""
        kw = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    # ---- the language model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _lm(self, embeds, attention_mask, position_ids=None, cache=None):
        """Final hidden states of `language_model()`; with `cache`, extending that KV cache."""
        kw = (
            {self._cache_kw: cache, "use_cache": True}
            if cache is not None
            else {"use_cache": False}
        )
        return self.language_model()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kw
        ).last_hidden_state

    def token_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of `lm_head(hidden)` (N, D) against `target` (N,); 0 (attached to
        the graph) when there is no position."""
        logits = self.model.lm_head(hidden)
        if logits.shape[0] == 0:
            return hidden.sum() * 0.0
        return F.cross_entropy(logits.float(), target)

    def understanding_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (labels != -100), next-token shifted. Only the
        positions that carry loss are projected: the vocabulary matmul is the big one."""
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        hidden = self._lm(self._embed(batch["input_ids"], batch["image"]), mask)
        target = labels[:, 1:]
        keep = target != IGNORE
        return self.token_loss(hidden[:, :-1][keep], target[keep])

    # ---- probe generation: one KV-cache branch per guidance term

    def _start(self, ids: list[int], images: torch.Tensor) -> list:
        """Run one branch's prompt: [last hidden state, attention mask, KV cache]."""
        from transformers import DynamicCache

        ids = torch.tensor([ids] * images.shape[0], device=self.device)
        mask = torch.ones_like(ids)
        try:
            cache = DynamicCache(config=self.model.config.text_config)
        except TypeError:
            cache = DynamicCache()
        return [self._lm(self._embed(ids, images), mask, cache=cache)[:, -1], mask, cache]

    def _branches(self, prompt: str, images: torch.Tensor, cfg_weight: float) -> list[list]:
        """The prompt's branch and, with guidance (`cfg_weight` != 1), the unconditional one the
        trainer trains: the prompt dropped, the condition image kept."""
        enc = self.text_encoder()
        branches = [self._start(enc.generation(prompt), images)]
        if cfg_weight != 1.0:
            branches.append(self._start(enc.generation(""), images))
        return branches

    def _advance(self, branches: list[list], embeds: torch.Tensor) -> None:
        """Feed one generated token's embeddings (B, 1, D) to every branch."""
        b = embeds.shape[0]
        for br in branches:
            _, mask, cache = br
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = torch.full((b, 1), mask.shape[1] - 1, device=self.device)
            br[:] = [self._lm(embeds, mask, pos, cache=cache)[:, -1], mask, cache]

    # ---- answering (evaluation)

    @property
    def image_processor(self):
        """The checkpoint's own image processor, or the family's default for this adapter's
        size and normalisation when the checkpoint has none."""
        if self._image_processor is None:
            self._image_processor = self._default_image_processor()
        return self._image_processor

    @torch.no_grad()
    def answer(self, images: list[Any], prompts: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy replies to one question per image (PIL images, any size): the raw text.

        Questions are formatted by the family's `chat_pieces` exactly as in training; images go
        through the checkpoint's own image processor. A batch gives the same replies as asking
        one question at a time (`_greedy`).
        """
        return [
            self.tokenizer.decode(seq, skip_special_tokens=True).strip()
            for seq in self.answer_ids(images, prompts, max_new_tokens)
        ]

    @torch.no_grad()
    def answer_ids(
        self, images: list[Any], prompts: list[str], max_new_tokens: int = 16
    ) -> list[list[int]]:
        """The generated token ids of `answer`, cut before the first EOS."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        return self._answer_ids(images, prompts, max_new_tokens)

    def _greedy(
        self,
        rows: list[list[int]],
        pad_id: int,
        bos_id: int,
        eos_id: int,
        max_new_tokens: int,
        config: dict[str, Any] | None = None,
        **inputs: Any,
    ) -> list[list[int]]:
        """Greedy continuations of token `rows` as one left-padded batch (attention mask 0 on
        the padding, positions counted from each row's first real token) through transformers'
        `generate` with a KV cache, stopping at EOS; each row's new ids cut before its first
        EOS. `config`: more GenerationConfig fields; `inputs`: more `generate` arguments (the
        image inputs)."""
        from transformers import GenerationConfig

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            **(config or {}),
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=generation_config,
            **inputs,
        )
        return [
            seq[: seq.index(eos_id)] if eos_id in seq else seq for seq in out[:, width:].tolist()
        ]
