"""UniMRG post-training, plain Python (no Prefect): see docs/trainer.md.

    trainer.loop        train(), train_fingerprint(), train_output_dir(), the Trainer
    trainer.data        task streams from image/label shards and LLaVA data, the batch plan
    trainer.objective   weighted sum of the per-task losses
    trainer.adapters    one package per model family (janus/, emu3/), behind a small protocol,
                        what they share in trainer/adapters/common.py
    trainer.parallel    FSDP2 sharding and DCP checkpoints (trainer.parallel: fsdp)
    trainer.probe       PNG grid of generated depth / segmentation / reconstruction

Heavy imports (torch, transformers) happen inside functions, so `import trainer` stays fast.
"""
