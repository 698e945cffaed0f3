"""The Janus family: Janus / Janus-Pro through transformers' `JanusForConditionalGeneration`.

    adapter.py    `JanusAdapter` (on trainer/adapters/common.py's `BaseAdapter`): loading, the
                  losses, probe generation, answering; `nearest_codes` (the VQ's code assignment)
    text.py       the chat format and `JanusTextEncoder` (runs in DataLoader workers)
    processor.py  a `JanusProcessor` for a model that has none, the chat template
    tiny.py       the tiny-random model (`JanusSizes`, `tiny_model`, `tiny_random_dir`)

The registry (trainer/adapters/__init__.py) reads `ADAPTER` here.
"""

from trainer.adapters.janus.adapter import JanusAdapter

ADAPTER = JanusAdapter
