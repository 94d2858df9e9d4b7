"""A deterministic clock for tests that run real latency code paths: every forward costs its MACs (1 ms per
10^6) plus 0.01 ms a call. The profile, the budget's passes and the timings then behave as on a quiet device,
so a shared CI machine's noise cannot put a floor above a budget or a result outside its tolerance."""
import torch

import structprune as tp


def use_macs_clock(monkeypatch) -> None:
    from structprune.utils import latency

    cache: dict = {}

    def per_call_ms(module, inputs, repeat, device):
        values = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        key = (id(module), tuple(tuple(p.shape) for p in module.parameters()),
               tuple(tuple(t.shape) for t in values if isinstance(t, torch.Tensor)))
        if key not in cache:
            cache[key] = float(tp.utils.count_ops_and_params(module, inputs)[0]) * 1e-6 + 0.01
        return [cache[key]] * repeat

    monkeypatch.setattr(latency, "_per_call_ms", per_call_ms)
