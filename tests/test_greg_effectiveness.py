"""Growing regularization earns its keep: after GReg-1 removing 75% of the channels costs almost nothing,
while one-shot magnitude pruning of the same trained network loses most of its accuracy."""
import copy

import pytest
import torch

import structprune as tp
from structprune.demo.data import load_digits_split
from structprune.demo.model import build_model, example_inputs, ignored_layers
from structprune.demo.run import prune_and_record_norms
from structprune.demo.train import TrainConfig, evaluate, fit, regularize_until_ready

RATIO = 0.75
TRAIN = TrainConfig()


@pytest.fixture(scope="module")
def trained():
    data = load_digits_split(0)
    model = build_model(0)
    fit(model, data, 6, TRAIN, torch.Generator().manual_seed(0), show_progress=False)
    return data, model


def _pruner(model, **kwargs):
    return tp.pruner.GrowingRegPruner(model, example_inputs(), tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=RATIO, ignored_layers=ignored_layers(model), **kwargs)


def test_greg1_right_after_pruning_beats_one_shot_magnitude_by_far(trained):
    data, baseline = trained
    assert evaluate(baseline, data.x_test, data.y_test) >= 0.97

    one_shot = copy.deepcopy(baseline)
    tp.pruner.BasePruner(one_shot, example_inputs(), tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=RATIO, ignored_layers=ignored_layers(one_shot)).step()
    one_shot_accuracy = evaluate(one_shot, data.x_test, data.y_test)

    model = copy.deepcopy(baseline)
    # faster growth than the benchmark's 1e-4 to stay well under a minute; still enough to work
    pruner = _pruner(model, reg=1e-4, delta_reg=1e-3, schedule="greg1", reg_ceiling=1.0)
    log = regularize_until_ready(model, pruner, data, TRAIN, torch.Generator().manual_seed(1),
                                 update_every=1, max_epochs=10, bias=True, show_progress=False)
    assert pruner.ready_to_prune() and log.iterations < 10 * 22  # stopped on its own signal
    regularized_accuracy = evaluate(model, data.x_test, data.y_test)
    norms = prune_and_record_norms(pruner)
    pruned_accuracy = evaluate(model, data.x_test, data.y_test)

    assert tp.utils.count_ops_and_params(model, example_inputs()) == \
        tp.utils.count_ops_and_params(one_shot, example_inputs())  # same architecture, only the channels differ
    assert pruned_accuracy >= one_shot_accuracy + 0.3, (pruned_accuracy, one_shot_accuracy)
    assert pruned_accuracy >= 0.9
    assert abs(pruned_accuracy - regularized_accuracy) <= 0.02  # removal itself is nearly free
    # the channels GReg-1 chose were driven far below the ones it keeps
    for group, split in norms.items():
        assert max(split["removed"]) < 0.1 * min(split["kept"]), group

