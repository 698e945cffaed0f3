"""The Emu3 family: Emu3 through transformers' `Emu3ForConditionalGeneration`.

    adapter.py    `Emu3Adapter` (on trainer/adapters/common.py's `BaseAdapter`): resolution,
                  loading, the losses, probe generation, answering
    text.py       the chat format, `Emu3TextEncoder` (runs in DataLoader workers) and
                  `lm_cross_entropy` (the loss over the 184k vocabulary, in chunks)
    processor.py  the image processor's config a saved folder holds
    tiny.py       the tiny-random model (`tiny_model`, `tiny_random_dir`)

The registry (trainer/adapters/__init__.py) reads `ADAPTER` here.
"""

from trainer.adapters.emu3.adapter import Emu3Adapter

ADAPTER = Emu3Adapter
