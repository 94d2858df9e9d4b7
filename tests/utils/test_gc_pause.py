"""utils.gc_pause: collection waits while the library works, and comes back as the caller had it."""
import gc

import pytest

from structprune.utils.gc_pause import gc_paused


@pytest.fixture
def restore_gc():
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()


def test_collection_is_off_inside_and_back_on_after(restore_gc):
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_inside_still_turns_collection_back_on(restore_gc):
    gc.enable()
    with pytest.raises(ValueError, match="boom"):
        with gc_paused():
            raise ValueError("boom")
    assert gc.isenabled()


def test_a_caller_that_turned_collection_off_keeps_it_off(restore_gc):
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_a_step_runs_with_collection_paused_and_restores_it(restore_gc):
    import torch
    from torch import nn

    import structprune as tp

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())
            return x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Probe(), nn.Conv2d(8, 4, 3))
    gc.enable()
    pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 8, 8), tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model[3]])
    pruner.step()
    assert seen == [False, False]  # the trace and the step's check forward
    assert gc.isenabled() and model[0].out_channels == 4
