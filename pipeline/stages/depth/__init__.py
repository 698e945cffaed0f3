"""The depth stage: Depth Anything (V2) relative depth through transformers (docs/depth.md).

    stage.py    `DepthConfig` (the manifest's `stages.depth`) and `DepthStage`: identity,
                model setup, and the steps (decode, resize, forward, quantise)
    overlap.py  `OverlappedShards`, the stage's `run_shard`: reader, compute and writer threads,
                and what travels between them
    model.py    which weights a `model` spec names (hub id, local folder, `tiny-random`)

The 16-bit PNG codecs live in pipeline/depth_png.py: the trainer and the preview read them too.
The registry (pipeline/stages/__init__.py) reads `STAGE` and `CONFIG` here.
"""

from pipeline.stages.depth.stage import DepthConfig, DepthStage

CONFIG = DepthConfig
STAGE = DepthStage
