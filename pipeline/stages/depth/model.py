"""Which Depth Anything weights a `model` spec names: a hub id, a local directory, `tiny-random`.

A hub id (+ revision) must already be in the local Hugging Face cache (no machine here reaches
the hub); a local directory is relative to the manifest's folder; `tiny-random` is the real
class at tiny size, fixed seed, saved under `cache_dir()/tiny-random/depth-anything/<version>-<key>/` and loaded
back through the same `from_pretrained` code (its output is noise).

Usage:
    from pipeline.stages.depth.model import resolve_model_dir
    resolve_model_dir("tiny-random")  # -> the folder `from_pretrained` loads
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import resolve_path
from pipeline.fingerprint import tiny_random_cache
from pipeline.shards import atomic_build_dir

__all__ = [
    "MODEL_CONFIG_FILES",
    "PATCH",
    "TINY_RANDOM",
    "WEIGHT_SUFFIXES",
    "ModelNotFoundError",
    "is_hub_model",
    "local_model_path",
    "resolve_model_dir",
    "tiny_random_model_dir",
]

TINY_RANDOM = "tiny-random"
#: Depth Anything's ViT patch size: input sides are multiples of it.
PATCH = 14
#: Files whose bytes define the model (hashed into the fingerprint).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MODEL_CONFIG_FILES = ("config.json", "preprocessor_config.json")


class ModelNotFoundError(FileNotFoundError):
    """The configured depth model is neither a local directory nor in the local hub cache."""


#: Bump when the builder changes what it saves: the cache folder is named after it.
TINY_VERSION = "v1"


def local_model_path(model: str, base_dir: Path | None = None) -> Path:
    """`model` read as a local path (relative to `base_dir`, the manifest's folder)."""
    return resolve_path(model, base_dir)


def is_hub_model(model: str, base_dir: Path | None = None) -> bool:
    return model != TINY_RANDOM and not local_model_path(model, base_dir).is_dir()


def resolve_model_dir(
    model: str, revision: str | None = None, base_dir: Path | None = None
) -> Path:
    """The local folder the model is loaded from (tiny-random is built on first use)."""
    if model == TINY_RANDOM:
        return tiny_random_model_dir()
    local = local_model_path(model, base_dir)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # not cached, or not even a valid repo id
        raise ModelNotFoundError(
            f"stages.depth.model: {model!r} (revision {revision or 'main'}) is not a "
            f"local directory ({local}) and not in the local Hugging Face cache "
            f"({type(exc).__name__}). Download it where the hub is reachable "
            f"(`hf download {model}`), or set stages.depth.model to a local directory "
            f"or `tiny-random`."
        ) from None


def tiny_random_model_dir() -> Path:
    """Build (once) and return the `tiny-random` Depth Anything: real classes, tiny sizes, seed 0.

    Saved atomically (temporary folder, then rename) so a half-written model is never loaded;
    the same seed gives the same weight bytes, so its fingerprint is stable.
    """
    final = tiny_random_cache("depth-anything", TINY_VERSION, ("torch", "transformers"))
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=518,
        patch_size=PATCH,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=PATCH,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DepthAnythingForDepthEstimation(config).eval()
    # The Depth Anything V2 processor settings (the hub's preprocessor_config.json).
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=PATCH,
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return atomic_build_dir(final, build, marker="config.json")
