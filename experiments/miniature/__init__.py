"""The miniature UniMRG experiment: with a trained tokenizer and a base that already generates,
does post-training on reconstruction, depth and segmentation besides understanding (UniMRG)
improve the understanding of depth order, compared with understanding alone?

    python -m experiments.miniature [--out DIR] [--quick] [--bases 0 1 2] [--post-seeds 0 1 2]

One file per role:

    scenes.py      seeded scenes (floating objects: the 2D layout does not give depth away),
                   captions, questions with word answers
    labels.py      the data in the project's contract: scenes, conversations, captions, exact
                   depth and edge label shards, the held-out set
    tokenizer.py   a trained Janus-architecture VQ (L2-normalised codebook), cached; its gate
    model.py       the small UMM, built by trainer/adapters/janus/tiny.py at the miniature's sizes
    protocol.py    Config, the bases (understanding + text-to-image, optionally reconstruction)
                   and the post-training arms, run through `trainer.loop.train`
    evaluation.py  held-out accuracy through the evaluation's scorer, image use, the answers'
                   log-likelihood, generation loss with the right vs a shuffled condition
    report.py      the gates, the paired statistics fixed before the run, the table and plot

What it measured is in docs/experiments.md. `--quick` only checks that everything runs.
"""

from experiments.miniature.protocol import (
    ARMS,
    BASE_WEIGHTS,
    QUICK,
    Config,
    base_weights,
    check,
    run,
)
from experiments.miniature.scenes import Scene, caption, render_scene, scene_questions

__all__ = [
    "ARMS",
    "BASE_WEIGHTS",
    "QUICK",
    "Config",
    "Scene",
    "base_weights",
    "caption",
    "check",
    "render_scene",
    "run",
    "scene_questions",
]
