"""UniMRG post-training, plain Python (no Prefect): see docs/trainer.md.

    trainer.loop        train() and the Trainer
    trainer.run_folder  the train fingerprint, the run folder (train_output_dir), lineage
    trainer.checkpoints step_NNNNNN/ folders: writing, finding, pruning, exporting
    trainer.data        task streams from image/label shards and LLaVA data, the batch plan
    trainer.image_index every ingested image by row, image_id and (source, path)
    trainer.objective   weighted sum of the per-task losses
    trainer.adapters    one package per model family (janus/, emu3/), behind a small protocol,
                        what they share in trainer/adapters/common.py
    trainer.parallel    FSDP2 sharding and DCP checkpoints (trainer.parallel: fsdp)
    trainer.probe_grid  PNG grid of generated depth / segmentation / reconstruction

Heavy imports (torch, transformers) happen inside functions, so `import trainer` stays fast.
"""
