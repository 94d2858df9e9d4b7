"""The public pruner classes and importance criteria, enumerated from the public modules so that a new
one joins the tests that cover them all without editing them, and what each needs before a step."""
import inspect

import torch

import structprune as tp

#: the class count of the models these tests build (OBDC samples labels from the class scores)
CLASSES = 5


def public_pruners() -> dict:
    """{name: class} of every distinct pruner class in tp.pruner (MetaPruner/MagnitudePruner alias BasePruner)."""
    found = {}
    for name in sorted(dir(tp.pruner)):
        value = getattr(tp.pruner, name)
        if isinstance(value, type) and issubclass(value, tp.pruner.BasePruner) and value not in found.values():
            found[name] = value
    return found


#: public classes criteria derive from, which score nothing themselves (Importance is abstract, the others
#: leave their per-element or per-channel score to subclasses); a new base must be named here
CRITERION_BASES = ("Importance", "ElementwiseImportance", "CalibratedImportance")


def public_criteria() -> dict:
    """{name: class} of every importance criterion in tp.importance.__all__ but the bases."""
    return {name: getattr(tp.importance, name) for name in tp.importance.__all__
            if isinstance(getattr(tp.importance, name), type)
            and issubclass(getattr(tp.importance, name), tp.importance.Importance) and name not in CRITERION_BASES}


def make_criterion(criterion_class):
    if "num_classes" in inspect.signature(criterion_class).parameters:
        return criterion_class(num_classes=CLASSES)  # OBDC samples labels from the model's class scores
    return criterion_class()


def calibrate(criterion, model, x) -> None:
    """What the criterion needs before scoring the model as it is now: gradients on every parameter
    (Taylor; the sparse pruners' penalties also act on them), per-sample squared gradients (Hessian),
    statistics gathered by hooks over a forward (activation criteria) and its backward (OBDC's K-FAC).
    Statistics are tied to the shapes, so this runs every step."""
    if hasattr(criterion, "zero_grad"):
        criterion.zero_grad()
    if hasattr(criterion, "register"):
        criterion.register(model)
        model.zero_grad()
        if hasattr(criterion, "sample_loss"):
            criterion.sample_loss(model(x)).backward()
        else:
            with torch.no_grad():
                model(x)
        criterion.remove_hooks()
    if hasattr(criterion, "accumulate_grad"):
        for sample in x.split(1):
            model.zero_grad()
            model(sample).pow(2).sum().backward()
            criterion.accumulate_grad(model)
    model.zero_grad()
    model(x).pow(2).sum().backward()


def train_step(pruner, model) -> None:
    """One pass of the sparse-training calls a training loop makes (BasePruner's do nothing)."""
    if hasattr(pruner, "update_reg"):
        pruner.update_reg()
    pruner.regularize(model)
