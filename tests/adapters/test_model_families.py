"""The registry of model families: what the pruner asks about a whole model, and that it is what it gets."""
import pytest
import torch
from torch import nn

import structprune as tp
from structprune.adapters import Adapter, register_adapter, unregister_adapter
from structprune.adapters.families import (
    FAMILIES,
    PLAIN,
    ModelFamily,
    family_of,
    head_size_names,
    register_family,
    unregister_family,
)


class Carded(nn.Module):
    """A model with state outside its layers (a dict its adapter keeps in step), as a config would be."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)
        self.card = {"width": 16}

    def forward(self, x):
        return {"logits": self.fc2(torch.relu(self.fc1(x))), "hidden": self.fc1(x)}


def _snapshot(model):
    saved = {id(module): dict(module.card) for module in model.modules() if isinstance(module, Carded)}

    def restore():
        for module in model.modules():
            if id(module) in saved:
                module.card = dict(saved[id(module)])

    return restore


CARDED = ModelFamily("test carded models", lambda model: isinstance(model, Carded),
                     extra_root_types=(nn.Embedding,), task_outputs=lambda output: output["logits"],
                     snapshot=_snapshot, head_size_names=("test_head_width",))


@pytest.fixture
def carded():
    register_family(CARDED)
    card_sync = register_adapter(Adapter("test card width", lambda module: isinstance(module, Carded),
                                         lambda module: module.card.update(width=module.fc1.out_features)))
    yield CARDED
    unregister_adapter(card_sync)
    unregister_family(CARDED)


def test_registering_a_family_twice_keeps_one_and_a_second_under_its_name_is_refused(carded):
    register_family(CARDED)
    assert FAMILIES.count(CARDED) == 1
    with pytest.raises(ValueError, match="a model family named 'test carded models' is already registered"):
        register_family(ModelFamily("test carded models", lambda model: False))


def test_a_model_no_family_claims_is_plain_and_a_claimed_one_gets_its_family(carded):
    assert family_of(nn.Sequential(nn.Linear(2, 2))) is PLAIN
    assert family_of(Carded()) is CARDED
    assert head_size_names()[0] == "head_dim" and "test_head_width" in head_size_names()


def test_the_pruner_takes_roots_and_outputs_from_the_family(carded):
    model = Carded()
    pruner = tp.pruner.BasePruner(model, torch.randn(2, 4), tp.importance.MagnitudeImportance(), pruning_ratio=0.5)
    assert pruner.output_transform is CARDED.task_outputs
    assert nn.Embedding in pruner.root_module_types
    pruner.step()
    # only the logits keep their shape: the hidden output shrinks with fc1, and the adapter followed it
    assert model.fc1.out_features == 8 and model.card == {"width": 8}
    assert model(torch.randn(2, 4))["logits"].shape == (2, 3)


class _FailsOnSecondGroup(tp.importance.MagnitudeImportance):
    """A criterion whose statistics hook raises after the first group of a step was pruned."""

    def __init__(self):
        super().__init__()
        self.pruned = 0

    def on_pruned(self, group):
        self.pruned += 1
        if self.pruned == 2:
            raise RuntimeError("statistics out of step")


class TwoGroups(Carded):
    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        return {"logits": self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))), "hidden": self.fc1(x)}


def test_a_failed_step_puts_back_the_state_the_family_snapshots(carded):
    model = TwoGroups()
    pruner = tp.pruner.BasePruner(model, torch.randn(2, 4), _FailsOnSecondGroup(), pruning_ratio=0.5)
    with pytest.raises(RuntimeError, match="statistics out of step"):
        pruner.step()
    assert (model.fc1.out_features, model.fc2.out_features) == (16, 16)
    assert model.card == {"width": 16}  # the adapter had written 8 after the first group
    assert pruner.current_step == 0


def test_a_transformers_model_belongs_to_the_registered_transformers_family():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    family = family_of(transformers.LlamaForCausalLM(config))
    assert family.name == "Hugging Face transformers"
    assert family.config is not None and family.activation_outliers
    assert {"attention_head_size", "key_value_proj_dim"} <= set(head_size_names())
