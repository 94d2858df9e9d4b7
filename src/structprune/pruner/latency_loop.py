"""The closed loop of a latency budget step: plan, prune, time the whole model, calibrate, plan again.

Layers timed alone do not add up to the model: the ops between them, per-call overheads of a layer run
alone and kernels that change with a width move the whole model's latency away from the profile's
prediction. A step therefore runs in passes. Each pass plans the knapsack to a target through the
:class:`Calibration` (the profile's prediction mapped onto the whole model's timings), prunes, and times
the model again.

- The calibration starts as the ratio of the whole model's timing to the profile's total (the profile's
  level re-anchored on the model timed now). After each timing it is anchored on that timing, and its
  slope becomes the ratio of the measured change to the predicted change since the timing before: the
  layers' per-call overhead, which the model running them back to back pays less of, makes the prediction
  fall more slowly with width than the model does; a ratio of levels would keep that bias, the ratio of
  changes removes it.
- Every pass aims short of the budget (``HOLD`` of the gap left over) and plans with the largest slope the
  step has seen (``Calibration.planning``): channels are never put back, so a pass must not overshoot below
  the budget, and the profile's error is not one factor for the whole model. Layers timed alone mis-rank
  one another (on efficientnet_b0 at batch 8 the first pass, cutting the 112 px layers the profile rates
  highest, made the model 4% faster where the profile predicted 27%); a slope learned there and applied to
  the next layers cut the model to 0.33x its budget. The largest slope seen removes the least per pass, so
  a mis-ranking costs a pass, not the budget.
- Passes stop when the measurement is within ``TOLERANCE`` above the budget (or anywhere below it), when a
  pass removed nothing (every group at its floor or ``max_pruning_ratio``), when a measurement is over
  ``TRUSTED`` times what the pass expected (the profile does not describe the model), or after
  ``MAX_PASSES``.
- Each slope update is bounded by ``STEP_CORRECTION``: on a loaded machine one slow timing must not cut the
  model to its floors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: the share of the gap (latency now minus budget) each pass leaves for the passes after it
HOLD = 0.25
#: a measurement this far above the budget (a fraction of it) still meets it; passes stop there
TOLERANCE = 0.05
#: a step ending further than this from its budget, either way, warns (the issue's "within 10%")
WARN_TOLERANCE = 0.10
#: passes of one step at most (each closes about 1 - HOLD of the gap left when the profile is right)
MAX_PASSES = 6
#: a measurement this many times the pass's calibrated prediction means the profile does not describe the
#: model: no further pass
TRUSTED = 1.5
#: one timing moves the calibration's slope by at most this factor either way
STEP_CORRECTION = 1.5
#: a change of the prediction smaller than this share of it is timing noise, not a slope
MIN_CHANGE = 0.02


@dataclass
class Calibration:
    """The whole model's latency predicted from the profile's: ``level + slope * (predicted - anchor)``,
    ``level`` the latency timed last and ``anchor`` what the profile predicted for the widths timed.
    ``planning`` is the largest slope seen: the one that removes the least to reach a latency."""

    level: float
    anchor: float
    slope: float
    planning: float = 0.0

    def __post_init__(self) -> None:
        self.planning = max(self.planning, self.slope)

    @classmethod
    def anchored(cls, measured: float, predicted: float) -> "Calibration":
        """A ratio: the profile's prediction scaled to the whole model timed once."""
        return cls(measured, predicted, measured / predicted if predicted > 0 else 1.0)

    def calibrated(self, predicted: float) -> float:
        return self.level + self.slope * (predicted - self.anchor)

    def profile_target(self, latency: float) -> float:
        """The profile's prediction to plan for to reach ``latency``, on the planning slope: where the model's
        response to the next cuts is uncertain, removing too little costs a pass, too much the budget."""
        return self.anchor + (latency - self.level) / self.planning

    def observe(self, predicted: float, measured: float) -> None:
        """Anchor on a new timing; the slope follows the measured change over the predicted one."""
        change = self.anchor - predicted
        if abs(change) >= MIN_CHANGE * self.anchor:
            secant = (self.level - measured) / change
            if secant > 0:  # a slower model after removing channels is noise or a kernel switch, not a slope
                self.slope = min(max(secant, self.slope / STEP_CORRECTION), self.slope * STEP_CORRECTION)
                self.planning = max(self.planning, self.slope)
        self.level, self.anchor = measured, predicted


@dataclass
class LatencyPass:
    """One pass: what it aimed at, what the profile and the calibrated profile predicted for the widths it
    left, and the whole model's latency timed after it (ms)."""

    target: float
    predicted: float
    calibrated: float
    measured: float | None = None


@dataclass
class LatencyLoop:
    """The passes of one latency budget step, and the calibration they leave."""

    budget: float
    calibration: Calibration
    passes: list = field(default_factory=list)
    #: the whole model's latency when the step began (timed at construction, or at the end of the last step)
    start: float = field(init=False)
    #: why the passes stopped short of the budget: "floors", "untrusted", "untimed: <error>" or "passes"
    stopped: str | None = None

    def __post_init__(self) -> None:
        self.start = self.calibration.level

    def met(self, latency: float) -> bool:
        return latency <= self.budget * (1 + TOLERANCE)

    def next_target(self) -> float | None:
        """The latency (ms) the next pass plans for, or None when the step is done."""
        latest = self.calibration.level
        if self.stopped is not None or self.met(latest):
            return None
        if len(self.passes) >= MAX_PASSES:
            self.stopped = "passes"
            return None
        return self.budget + HOLD * (latest - self.budget)

    def profile_target(self, latency: float) -> float:
        return self.calibration.profile_target(latency)

    def plan(self, target: float, predicted: float) -> LatencyPass:
        """A pass planned to ``target``, the profile predicting ``predicted`` for the widths it left."""
        entry = LatencyPass(target, predicted, self.calibration.calibrated(predicted))
        self.passes.append(entry)
        return entry

    def observe(self, measured: float) -> None:
        """The model timed after the last pass: calibrate, and stop when the profile is no guide."""
        entry = self.passes[-1]
        entry.measured = measured
        self.calibration.observe(entry.predicted, measured)
        if not self.met(measured) and measured > entry.calibrated * TRUSTED:
            self.stopped = "untrusted"

    def stuck(self) -> None:
        """The pass just planned removed nothing: every group the budget may narrow is at its floor."""
        self.stopped = "floors"

    def untimed(self, error: Exception) -> None:
        """Mid-step the model may not run yet (a config synced at the end of the step): the step's timing
        after it is the only one."""
        self.stopped = f"untimed: {type(error).__name__}: {error}"

    def outcome(self, measured: float, predicted: float) -> dict:
        """The report's record of the step (``StepRecord.budget``), the model timed once more after it (``measured``, with the profile predicting ``predicted``
        for its widths); the calibration takes that timing in too."""
        calibrated = self.calibration.calibrated(predicted)
        self.calibration.observe(predicted, measured)
        return {"metric": "latency_ms", "budget": self.budget, "predicted": predicted, "calibrated": calibrated,
                "measured": measured, "start": self.start, "calibration": self.calibration.slope,
                "stopped": self.stopped, "passes": [asdict(entry) for entry in self.passes]}


def miss_warning(outcome: dict) -> str | None:
    """The warning for a final step whose measured latency missed its budget by more than WARN_TOLERANCE."""
    budget, measured = outcome["budget"], outcome["measured"]
    if not math.isfinite(measured) or abs(measured - budget) <= WARN_TOLERANCE * budget:
        return None
    share = abs(measured / budget - 1)
    passes = len(outcome["passes"])
    head = (f"step() left latency_ms at {measured:.6g}, {share:.0%} {'above' if measured > budget else 'under'} "
            f"the budget {budget:.6g} (calibrated prediction {outcome['calibrated']:.6g}, after {passes} "
            f"pass{'es' if passes != 1 else ''}): ")
    if measured < budget:
        why = ("a pass removed more than the calibrated profile predicted, and removed channels are never put "
               "back; a multi-step schedule (iterative_steps) approaches the budget in smaller moves")
    else:
        why = _reason_above(outcome["stopped"])
    return head + why + ". pruner.report() shows every step and pass"


def _reason_above(stopped: str | None) -> str:
    if stopped == "floors":
        return ("no group can go further (each is at max_pruning_ratio or its last channel group, or refused): "
                "the layers left, and the ops between them, keep the rest of the time")
    if stopped == "untrusted":
        return ("a timing was over 1.5x what the calibrated profile expected, so the layers timed alone do not "
                "describe this model (call overheads dominate, or the machine was busy): no further pass was "
                "planned on them")
    if stopped is not None and stopped.startswith("untimed"):
        return f"the model could not be timed between passes ({stopped[9:]}), so no pass was corrected"
    if stopped == "passes":
        return (f"{MAX_PASSES} passes did not get there: each moves the calibration's slope by at most "
                f"{STEP_CORRECTION}x, and the model stayed slower than the calibrated profile predicted")
    return "the model was timed slower after the step than between its passes (timing noise)"
