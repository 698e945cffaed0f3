"""The segment stage: Segment Anything automatic masks as segmentation pseudo-labels
(docs/segment.md).

    stage.py    `SegmentConfig` (the manifest's `stages.segment`) and `SegmentStage`: identity,
                setup, the shard runner with CPU work overlapped with the device
    model.py    the SAM models: a checkpoint (`weights_only=True`) or `tiny-random`
    fast.py     `impl: fast`: the reference generator's masks, batched on the device
    decoder.py  the batched prompt encoder + mask decoder `fast.py` uses with `precision: fast`
    render.py   the training targets: the edge map and the filled colour map

The registry (pipeline/stages/__init__.py) reads `STAGE` and `CONFIG` here.
"""

from pipeline.stages.segment.stage import SegmentConfig, SegmentStage

CONFIG = SegmentConfig
STAGE = SegmentStage
