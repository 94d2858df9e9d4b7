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


def private_attributes_used(klass) -> set:
    """Names ``klass``'s own source reads or writes as ``self._<name>``, ``getattr(self, "_<name>")`` (or
    ``setattr``/``hasattr``) and ``self.__dict__...("_<name>")``: its private state, and other parts' it touches."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "self" and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant):
            names.add(node.args[1].value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "__dict__" \
                and node.args and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
    return {name for name in names if isinstance(name, str) and name.startswith("_") and not name.startswith("__")}


def private_state_users(cls) -> dict:
    """{private data attribute: the parts of ``cls`` whose source touches it} (methods and properties aside)."""
    users: dict = {}
    for klass in cls.__mro__[:-1]:
        for name in private_attributes_used(klass):
            if callable(getattr(cls, name, None)) or isinstance(getattr(cls, name, None), property):
                continue
            users.setdefault(name, set()).add(klass.__name__)
    return users


@pytest.mark.parametrize("pruner_name", sorted(PRUNERS))
def test_private_state_is_touched_by_its_owner_only(pruner_name):
    """A part's private state (``self._planning``, ``self._uniform``...) is read and written by that part
    alone; another part calls a method of it. ``_held_back`` was once written by planning and by
    uniform_config_widths, and read by the report through ``getattr(self, "_held_back", [])``."""
    shared = {name: sorted(parts) for name, parts in private_state_users(PRUNERS[pruner_name]).items()
              if len(parts) > 1}
    assert shared == {}, f"private attributes of {pruner_name} touched by more than one part: {shared}"


def test_the_private_state_check_sees_a_read_by_another_part():
    class Owner:
        def _init_owner(self):
            self._held = []

    class Reader:
        def _notes(self):
            return getattr(self, "_held", []) + self.__dict__.get("_cache", [])

    class Writer:
        def _plan(self):
            self.__dict__.setdefault("_cache", [])

    class Composed(Owner, Reader, Writer):
        pass

    users = private_state_users(Composed)
    assert users == {"_held": {"Owner", "Reader"}, "_cache": {"Reader", "Writer"}}


def test_the_source_check_sees_a_shadowing_assignment():
    """The check above reads assignments as the sparse pruners made them; a class repeating the old bug fails it."""
    class Shadowing(tp.pruner.BasePruner):
        def update_regularizer(self):
            self._sizes = [1, 2]

    assert "_sizes" in assigned_attributes(Shadowing) and "_sizes" in callable_class_attributes(Shadowing)
