"""Every public pruner lists its keywords explicitly, in torch_pruning's order, with BasePruner's defaults:
IDEs, help() and keyword checking see them, and positional torch_pruning calls bind as they do there."""
import inspect

import pytest
import torch

from catalog import public_pruners
from nets import example

import structprune as tp
from structprune.pruner.options import PrunerOptions
from structprune.pruner.signature import option_values

PRUNERS = public_pruners()
#: each pruner's own keywords, between ``importance`` and BasePruner's, as torch_pruning orders them
OWN_FIRST = {"BasePruner": [], "GrowingRegPruner": ["reg", "delta_reg"], "GroupNormPruner": ["reg", "alpha"],
             "BNScalePruner": ["reg", "group_lasso"]}
#: torch_pruning 1.6's GrowingRegPruner signature (seed/GrowingRegPruner.txt)
SEED_GROWING_REG = [
    "model", "example_inputs", "importance", "reg", "delta_reg", "global_pruning", "pruning_ratio",
    "pruning_ratio_dict", "max_pruning_ratio", "iterative_steps", "iterative_pruning_ratio_scheduler",
    "ignored_layers", "round_to", "isomorphic", "in_channel_groups", "out_channel_groups", "num_heads",
    "prune_num_heads", "prune_head_dims", "head_pruning_ratio", "head_pruning_ratio_dict", "customized_pruners",
    "unwrapped_parameters", "root_module_types", "forward_fn", "output_transform", "channel_groups",
    "ch_sparsity", "ch_sparsity_dict",
]


def parameters(cls) -> list:
    return list(inspect.signature(cls).parameters.values())


def test_every_public_pruner_has_its_own_first_keywords_listed():
    assert set(OWN_FIRST) == set(PRUNERS), "a new public pruner: add its own keywords to OWN_FIRST"


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_signature_lists_every_pruner_option_with_its_default_in_order(pruner_name):
    params = parameters(PRUNERS[pruner_name])
    kinds = {p.kind for p in params}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    names = [p.name for p in params]
    fields = PrunerOptions.__dataclass_fields__
    own = OWN_FIRST[pruner_name]
    # model, example_inputs, importance, the pruner's torch_pruning keywords, then every option in order
    assert names[:3] == ["model", "example_inputs", "importance"]
    assert names[3:3 + len(own)] == own
    options = [name for name in fields if name != "importance"]
    assert names[3 + len(own):3 + len(own) + len(options)] == options
    by_name = {p.name: p for p in params}
    for name, field in fields.items():
        assert by_name[name].default == field.default, name
        assert by_name[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
    extras = params[3 + len(own) + len(options):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras), [p.name for p in extras]


def test_growing_reg_signature_starts_as_the_seed_documents_it():
    assert [p.name for p in parameters(tp.pruner.GrowingRegPruner)][:len(SEED_GROWING_REG)] == SEED_GROWING_REG
    defaults = {p.name: p.default for p in parameters(tp.pruner.GrowingRegPruner)}
    assert defaults["reg"] == 1e-5 and defaults["delta_reg"] == 1e-5
    assert defaults["iterative_pruning_ratio_scheduler"] is tp.pruner.linear_scheduler


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_help_describes_every_keyword(pruner_name):
    doc = inspect.getdoc(PRUNERS[pruner_name].__init__) or ""
    for name in PrunerOptions.names():
        assert f"    {name} (" in doc, name
    for name in OWN_FIRST[pruner_name]:
        assert f"``{name}``" in doc, name


def test_positional_torch_pruning_call_binds_reg_and_ratio():
    model, x = example()
    pruner = tp.pruner.GrowingRegPruner(model, x, tp.importance.MagnitudeImportance(), 1e-4, 2e-5, False, 0.25)
    assert (pruner.base_reg, pruner.delta_reg, pruner.pruning_ratio) == (1e-4, 2e-5, 0.25)
    model, x = example()
    pruner = tp.pruner.GroupNormPruner(model, x, tp.importance.GroupMagnitudeImportance(), 1e-3, 2, False, 0.25)
    assert (pruner.reg, pruner.alpha, pruner.pruning_ratio) == (1e-3, 2, 0.25)
    pruner.step()
    assert model.conv1.out_channels == 12


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_a_misspelt_keyword_is_refused(pruner_name):
    model, x = example()
    with pytest.raises(TypeError, match="pruning_ration"):
        PRUNERS[pruner_name](model, x, tp.importance.MagnitudeImportance(), pruning_ration=0.5)


def test_an_option_missing_from_a_subclass_signature_is_named():
    namespace = {name: None for name in PrunerOptions.names() if name != "round_to"}
    with pytest.raises(TypeError, match=r"\['round_to'\]"):
        option_values(namespace)
    assert option_values({**namespace, "round_to": 4, "schedule": "greg1"})["round_to"] == 4
