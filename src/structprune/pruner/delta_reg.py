"""Choosing ``delta_reg``: how far a growing penalty shrinks a channel the loss does not defend.

At penalty ``gamma`` one iteration multiplies such a channel's weights by ``1 - lr * gamma`` (decoupled
decay exactly; the gradient form under SGD with momentum ``m`` by about ``1 - lr * gamma / (1 - m)`` once the
momentum buffer has filled). Growing regularization raises gamma by ``delta_reg`` at every ``update_reg()``
(the seed schedule's least important channel and GReg-1's chosen channels alike), so what decides the
outcome is the product over all iterations, not ``delta_reg`` alone: the same ``delta_reg`` that works for
10 epochs of 22 iterations at lr 0.05 crushes the network when an epoch has 100 iterations. Fixing the
shrink instead (1e-2: the channel keeps 1% of its norm) gives ``delta_reg`` for any learning rate, epoch
length and number of updates; the values hand-tuned in ``benchmarks/greg_digits.py`` sit at about 1e-2.
"""
from __future__ import annotations

import math


def shrink_after(delta_reg: float, lr: float, iterations_per_update: int, updates: int, reg: float = 0.0,
                 momentum: float = 0.0, reg_ceiling: float | None = None) -> float:
    """Factor by which ``updates`` growth steps of ``iterations_per_update`` iterations each shrink an
    undefended channel (the penalty during update ``j`` is ``min(reg + j * delta_reg, reg_ceiling)``)."""
    step = lr / (1.0 - momentum)
    log_shrink = 0.0
    for j in range(1, updates + 1):
        gamma = reg + j * delta_reg
        if reg_ceiling is not None:
            gamma = min(gamma, reg_ceiling)
        factor = 1.0 - step * gamma
        if factor <= 0.0:
            return 0.0
        log_shrink += iterations_per_update * math.log(factor)
    return math.exp(log_shrink)


def delta_reg_for(lr: float, iterations_per_update: int, updates: int, target_shrink: float = 1e-2,
                  reg: float = 0.0, momentum: float = 0.0, reg_ceiling: float | None = None) -> float:
    """The ``delta_reg`` after which the most penalised channels keep ``target_shrink`` of their norm.

    ``updates``: how many times ``update_reg()`` runs before ``step()`` (epochs for the seed schedule,
    iterations for GReg-1 updated every iteration); ``iterations_per_update``: optimizer steps between two
    calls. ``lr``: the learning rate the penalty acts with; ``momentum``: SGD's, for the gradient form
    (``regularize(model)``); leave it 0 for ``regularize(model, decoupled=True, lr=...)``, whatever the
    optimizer. Adam's gradient form has no such rule (its normalisation rescales the penalty), which is one
    reason to use the decoupled form with Adam.

    Exact for the decoupled form. With momentum the rule takes the heavy ball's steady state; once
    ``lr * gamma`` exceeds ``(1 - sqrt(momentum)) ** 2`` the ball oscillates and the channel shrinks faster
    than the target (a few times smaller for short schedules): the derived value errs on the strong side.

    Example: digits, 22 iterations an epoch, 10 epochs, SGD lr 0.05 momentum 0.9, reg 1e-4:
    ``delta_reg_for(0.05, 22, 10, reg=1e-4, momentum=0.9)`` is about 7.6e-3 (hand-tuned: 7e-3).
    """
    if not 0.0 < target_shrink < 1.0:
        raise ValueError(f"target_shrink must lie in (0, 1), got {target_shrink}")
    if not lr > 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
    for name, value in (("iterations_per_update", iterations_per_update), ("updates", updates)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    fastest = momentum ** (iterations_per_update * updates / 2)
    if target_shrink <= fastest:
        # a heavy ball shrinks by at most sqrt(momentum) an iteration, however strong the penalty: asking for
        # more only makes the loss lose to the penalty everywhere (digits, 3 epochs: the network collapses)
        raise ValueError(
            f"SGD with momentum {momentum} shrinks a channel by at most {fastest:.3g} in "
            f"{iterations_per_update * updates} iterations, however large delta_reg is; for target_shrink="
            f"{target_shrink} regularize for more iterations, lower the momentum or use "
            f"regularize(model, decoupled=True, lr=...) (then pass momentum=0)"
        )
    args = (lr, iterations_per_update, updates, reg, momentum, reg_ceiling)
    if shrink_after(0.0, *args) <= target_shrink:
        raise ValueError(
            f"reg={reg} alone already shrinks undefended channels to {shrink_after(0.0, *args):.3g} of their norm "
            f"(target {target_shrink}); lower reg"
        )
    if reg_ceiling is not None and shrink_after(reg_ceiling, *args) > target_shrink:
        raise ValueError(
            f"even at reg_ceiling={reg_ceiling} from the first update the channels keep "
            f"{shrink_after(reg_ceiling, *args):.3g} of their norm (target {target_shrink}); raise reg_ceiling "
            f"or regularize for more iterations"
        )
    low, high = 0.0, 1.0
    while shrink_after(high, *args) > target_shrink:
        high *= 2.0
    for _ in range(100):  # the shrink falls monotonically as delta_reg grows
        middle = 0.5 * (low + high)
        if shrink_after(middle, *args) > target_shrink:
            low = middle
        else:
            high = middle
    return high
