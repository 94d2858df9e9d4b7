"""A pruner is assembled from mixins (planning, verification, heads, report...) and sparse-training
subclasses; their state must not collide. BNScalePruner and GroupNormPruner once stored their group sizes
as ``self._sizes``, shadowing VerifyMixin's method ``_sizes()``, and ``step(interactive=True)`` raised
``TypeError: 'list' object is not callable``."""
import ast
import inspect
import textwrap

import pytest
import torch

from catalog import CLASSES, calibrate, make_criterion, public_pruners, train_step
from nets import CatResidualNet

import structprune as tp

PRUNERS = public_pruners()
#: public torch_pruning attributes that user code reads and sets, and that several parts keep current on
#: purpose: the schedule's step counter and the head counts (a restored checkpoint puts them back)
SHARED_PUBLIC_STATE = {"current_step", "num_heads"}


def callable_class_attributes(cls) -> set:
    return {name for name in dir(cls) if callable(getattr(cls, name, None))}


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_no_instance_attribute_shadows_a_method_after_a_training_round(pruner_name):
    torch.manual_seed(0)
    model = CatResidualNet(CLASSES)
    x = torch.randn(2, 3, 8, 8)
    criterion = make_criterion(tp.importance.TaylorImportance)
    pruner = PRUNERS[pruner_name](model, x, criterion, pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.fc])
    calibrate(criterion, model, x)
    train_step(pruner, model)
    for group in pruner.step(interactive=True):
        group.prune()
    pruner.update_regularizer()
    calibrate(criterion, model, x)
    train_step(pruner, model)
    pruner.step()
    pruner.report()
    shadowing = set(vars(pruner)) & callable_class_attributes(type(pruner))
    assert not shadowing, f"{pruner_name} instance attributes hide methods of its class: {sorted(shadowing)}"


def assigned_attributes(klass) -> set:
    """Names ``klass``'s own source assigns as ``self.<name> = ...`` (also annotated and augmented)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == "self":
                    names.add(element.attr)
    return names


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_each_attribute_has_one_owner_among_the_parts_and_none_is_a_method(pruner_name):
    """Read from the source, so attributes set only on rare paths (a fallback, a checkpoint load) count."""
    cls = PRUNERS[pruner_name]
    methods = callable_class_attributes(cls)
    owners: dict = {}
    for klass in cls.__mro__[:-1]:  # not object
        for name in assigned_attributes(klass):
            owners.setdefault(name, []).append(klass.__name__)
    assert not {name for name in owners if name in methods}, \
        {name: owners[name] for name in owners if name in methods}
    shared = {name: classes for name, classes in owners.items() if len(classes) > 1}
    assert set(shared) <= SHARED_PUBLIC_STATE, (
        f"attributes assigned by more than one part of {pruner_name}: "
        f"{ {name: classes for name, classes in shared.items() if name not in SHARED_PUBLIC_STATE} }; let one part "
        f"own each and the others call a method of it (as verify.py calls ReportMixin._note_refusal)")


def test_the_source_check_sees_a_shadowing_assignment():
    """The check above reads assignments as the sparse pruners made them; a class repeating the old bug fails it."""
    class Shadowing(tp.pruner.BasePruner):
        def update_regularizer(self):
            self._sizes = [1, 2]

    assert "_sizes" in assigned_attributes(Shadowing) and "_sizes" in callable_class_attributes(Shadowing)
