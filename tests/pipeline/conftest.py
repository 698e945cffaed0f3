"""Pipeline fixtures: the tiny random SAM the segment tests share, one torch thread for them."""

from __future__ import annotations

import pytest
import torch

from pipeline.stages.segment.model import load_sam, tiny_sam_checkpoint


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast and does not spin against other jobs.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """The tiny random SAM, loaded once per module. Its checkpoint is built in the session's
    cache: a module-scoped fixture runs before the per-test `_isolated_cache` sets it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIMRG_CACHE", str(tmp_path_factory.getbasetemp() / "unimrg-cache"))
        return load_sam("tiny-random", tiny_sam_checkpoint())
