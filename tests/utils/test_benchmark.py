"""Latency, FPS, throughput and memory measurement on CPU (and CUDA when present)."""

import math

import pytest
import torch
from torch import nn

from structprune.utils import measure_fps, measure_latency, measure_memory, measure_throughput


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    )


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y=None):
        return self.fc(x) + (0 if y is None else y)


def test_latency_mean_and_std():
    mean_ms, std_ms = measure_latency(_small_cnn(), torch.randn(2, 3, 16, 16), repeat=8, warmup=2)
    assert isinstance(mean_ms, float) and isinstance(std_ms, float)
    assert mean_ms > 0
    assert std_ms >= 0 and math.isfinite(std_ms)


def test_latency_single_repeat_has_zero_std():
    _, std_ms = measure_latency(_small_cnn(), torch.randn(1, 3, 8, 8), repeat=1, warmup=0)
    assert std_ms == 0.0


def test_latency_reflects_work():
    slow = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
    fast = nn.Linear(512, 512)
    x = torch.randn(64, 512)
    slow_ms, _ = measure_latency(slow, x, repeat=10, warmup=2)
    fast_ms, _ = measure_latency(fast, x, repeat=10, warmup=2)
    assert slow_ms > fast_ms


@pytest.mark.parametrize(
    "inputs", [torch.randn(3, 4), (torch.randn(3, 4), torch.randn(3, 4)), {"x": torch.randn(3, 4)}]
)
def test_fps_and_throughput_accept_all_input_forms(inputs):
    model = TwoInputs()
    fps = measure_fps(model, inputs, repeat=10, warmup=1)
    throughput = measure_throughput(model, inputs, repeat=10, warmup=1)
    assert fps > 0 and throughput > 0


def test_throughput_is_batch_size_times_fps(monkeypatch):
    from structprune.utils import benchmark

    # Pin fps so the relation is checked exactly rather than between two noisy timings.
    monkeypatch.setattr(benchmark, "measure_fps", lambda *args, **kwargs: 10.0)
    x = torch.randn(5, 4)
    assert measure_throughput(nn.Linear(4, 4), x) == 50.0  # batch inferred from dim 0
    assert measure_throughput(nn.Linear(4, 4), x, batch_size=2) == 20.0
    assert measure_throughput(nn.Linear(4, 4), {"x": torch.randn(3, 4)}) == 30.0


def test_invalid_counts_rejected():
    with pytest.raises(ValueError):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeat=0)
    with pytest.raises(ValueError):
        measure_fps(nn.Linear(2, 2), torch.randn(1, 2), warmup=-1)


def test_training_mode_restored_and_no_hooks_left():
    model = _small_cnn().train()
    model[1].eval()
    x = torch.randn(2, 3, 8, 8)
    measure_latency(model, x, repeat=2, warmup=1)
    measure_fps(model, x, repeat=2, warmup=1)
    measure_memory(model, x)
    assert [m.training for m in model] == [True, False, True, True, True, True]
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # BatchNorm running stats are untouched because measurements run in eval mode.
    assert torch.equal(model[1].running_mean, torch.zeros(8))


def test_cpu_memory_of_linear_chain_is_exact():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 1000))
    x = torch.randn(1, 1000)
    params = 2 * (1000 * 1000 + 1000) * 4
    # input + both activations: the first one is still referenced by
    # Sequential.forward while the second is produced.
    assert measure_memory(model, x) == params + 3 * 1000 * 4


def test_cpu_memory_frees_dead_activations():
    # Ten 4 MB activations in a row: with liveness tracking the peak stays near
    # two of them, far below the 40 MB an "add every output" estimate gives.
    model = nn.Sequential(*[nn.ReLU() for _ in range(10)])
    x = torch.randn(1000, 1000)  # 4 MB
    peak = measure_memory(model, x)
    assert 4_000_000 * 2 <= peak <= 4_000_000 * 4


def test_cpu_memory_grows_with_batch():
    model = _small_cnn()
    small = measure_memory(model, torch.randn(1, 3, 32, 32))
    large = measure_memory(model, torch.randn(8, 3, 32, 32))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params < small < large


def test_memory_with_explicit_device():
    # Exercises the CUDA allocator path where a GPU exists, the host estimate otherwise.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Linear(256, 256)
    x = torch.randn(4, 256)
    peak = measure_memory(model, x, device=device)
    assert peak >= (256 * 256 + 256) * 4 + 2 * 4 * 256 * 4
    assert next(model.parameters()).device.type == "cpu"  # moved back afterwards


def test_timings_on_model_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _small_cnn().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    mean_ms, std_ms = measure_latency(model, x, repeat=5, warmup=1)
    assert mean_ms > 0 and std_ms >= 0
    assert measure_fps(model, x, repeat=5, warmup=1) > 0
