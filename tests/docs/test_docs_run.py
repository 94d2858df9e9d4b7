"""Every ```python block of README.md and docs/*.md runs, and does what its page says.

A page's blocks run in order in one namespace, as a reader pastes them. What a page leaves to the reader
(a model, `train_loader`, calibration batches) is provided as names in that namespace, as small as the
example allows. Where a block spells out a size only a real job can afford (`epochs=50`, 640 px images,
`prune_at_step=2000`), `replace` swaps that literal text for a small one; every swap must match the page, so
an edited page fails here instead of running something else. `torch` and `tp` are there already, as after
the README's quickstart. The first test counts the blocks of every page against BLOCKS, so a new block cannot
go untested.
"""
from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import structprune as tp
from blocks import ROOT, python_blocks
from macs_clock import use_macs_clock

# page -> number of python blocks. Pages tested in another file say where (that test runs all of them).
BLOCKS = {
    "README.md": 2,
    "docs/growing_regularization.md": 3,
    "docs/importance.md": 1,
    "docs/graph.md": 2,
    "docs/transformers.md": 2,
    "docs/distributed.md": 2,
    "docs/ultralytics.md": 2,
    "docs/ultralytics_attention.md": 1,
    "docs/hf_trainer.md": 1,
    "docs/saving.md": 1,
    "docs/latency.md": 3,
}
ELSEWHERE = {
    "docs/llm.md": (2, "tests/docs/test_llm_doc.py"),
    "docs/adding_a_family.md": (2, "tests/adapters/test_adapter_registry.py"),
}


def _pages_with_python_blocks() -> dict[str, int]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    counts = {str(page.relative_to(ROOT)): len(re.findall(r"^```python\n", page.read_text(), re.M)) for page in pages}
    return {page: count for page, count in counts.items() if count}


def test_every_python_block_of_every_page_is_run_by_a_test():
    expected = {**BLOCKS, **{page: count for page, (count, _) in ELSEWHERE.items()}}
    assert _pages_with_python_blocks() == expected
    for page, (_, test_file) in ELSEWHERE.items():
        assert Path(page).name in (ROOT / test_file).read_text(), f"{test_file} no longer runs {page}"


def run_page(page: str, namespace: dict, replace: dict[str, str] | None = None,
             before: dict[int, Callable[[dict], None]] | None = None) -> dict:
    """Execute every python block of ``page`` in ``namespace``; ``before[i](namespace)`` runs before block i."""
    blocks = python_blocks(page)
    assert len(blocks) == BLOCKS[page]
    namespace.setdefault("torch", torch)  # pages continue the README's quickstart, which imports both
    namespace.setdefault("tp", tp)
    unused = dict(replace or {})
    executed = 0
    for index, block in enumerate(blocks):
        for old, new in (replace or {}).items():
            if old in block:
                block = block.replace(old, new)
                unused.pop(old, None)
        if before and index in before:
            before[index](namespace)
        exec(compile(block, f"{page} block {index + 1}", "exec"), namespace)
        executed += 1
    assert not unused, f"{page} no longer contains {list(unused)}: update the replacements"
    assert executed == BLOCKS[page]
    return namespace


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class TinyResNet(nn.Module):
    """resnet18's names (conv1, bn1, layer3.0.conv2, fc) and residual coupling at a fraction of its cost."""

    def __init__(self, classes: int = 1000):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        downsample = nn.Sequential(nn.Conv2d(32, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
        self.layer3 = nn.Sequential(BasicBlock(32, 128, stride=2, downsample=downsample), BasicBlock(128, 128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.layer3(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def image_batches(count: int, classes: int, size: int = 16, batch: int = 4) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def tiny_llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


# -- README.md ------------------------------------------------------------------------------------------
def test_readme_quickstart_prunes_resnet18_to_about_a_quarter_then_regularizes(capsys):
    namespace = {"num_reg_epochs": 1, "train_loader": image_batches(2, 1000, size=32, batch=2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the quickstart runs without a warning
        run_page("README.md", namespace)
    # the quickstart's comments: 1.82 G, 11.69 M, then about a quarter of both
    assert round(namespace["macs"] / 1e9, 2) == 1.82 and round(namespace["params"] / 1e6, 2) == 11.69
    assert 0.2 < namespace["params2"] / namespace["params"] < 0.3
    assert 0.2 < namespace["macs2"] / namespace["macs"] < 0.3
    assert "MACs 1.82G -> " in capsys.readouterr().out
    model = namespace["model"]
    assert params_of(model) < namespace["params2"]  # the growing-regularization step pruned again
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# -- docs/growing_regularization.md ---------------------------------------------------------------------
def test_growing_regularization_loops_prune_and_delta_reg_for_gives_the_quoted_values():
    model = small_cnn()
    namespace = {"model": model, "example_inputs": torch.randn(1, 3, 16, 16), "num_reg_epochs": 2,
                 "train_loader": image_batches(2, 10), "lr": 3e-4, "loader": image_batches(2, 10),
                 "loss_fn": lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1])}
    # the page's pruner ignores no layer, so the classifier's outputs are refused, and step() says so
    with pytest.warns(UserWarning, match=r"8 \(0 of 2: reaches a model output\)\. pruner.report\(\)"):
        run_page("docs/growing_regularization.md", namespace)
    assert model[0].out_channels < 8 and model[3].out_channels < 16  # step 1 of 3 towards 50%
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    pruner = namespace["pruner"]
    # the AdamW loop's update_reg() after update_regularizer() raised the penalties above `reg` again
    assert max(float(reg.max()) for reg in pruner.group_reg.values()) > 1e-5
    # the page's figures: about 7.5e-3 (seed schedule) and 1.1e-4 (GReg-1) with momentum 0.9
    seed = tp.pruner.delta_reg_for(lr=0.05, iterations_per_update=22, updates=10, reg=1e-4, momentum=0.9)
    greg1 = tp.pruner.delta_reg_for(0.05, 1, 400, reg=1e-4, momentum=0.9)
    assert round(seed, 4) == 0.0075 and round(greg1, 5) == 0.00011
    assert namespace["delta"] == tp.pruner.delta_reg_for(3e-4, 1, 100, target_shrink=1e-3)


# -- docs/importance.md ---------------------------------------------------------------------------------
def test_obdc_recipe_prunes_after_gathering_statistics():
    model = TinyResNet()
    namespace = {"model": model, "example_inputs": torch.randn(1, 3, 16, 16),
                 "calibration_batches": image_batches(2, 1000, size=16, batch=2)}
    run_page("docs/importance.md", namespace)
    assert model.conv1.out_channels == 16 and model.layer3[0].conv1.out_channels == 64
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 1000)


# -- docs/graph.md --------------------------------------------------------------------------------------
class TwoConvs(nn.Module):
    """b's output is the model output, so its group is refused: the page's report() example."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_graph_page_prunes_by_hand_then_interactively_and_report_reads_as_written(capsys):
    import torchvision

    model = torchvision.models.resnet18()
    torch.manual_seed(0)
    toy = TwoConvs()
    printed_by_block_1 = []

    def report_pruner(namespace: dict) -> None:  # block 2 shows report() on a pruner whose b is refused
        printed_by_block_1.append(capsys.readouterr().out)
        namespace["pruner"] = tp.pruner.BasePruner(toy, torch.randn(1, 3, 16, 16),
                                                   tp.importance.MagnitudeImportance(), pruning_ratio=0.5)

    with pytest.warns(UserWarning, match=re.escape("step() removed 4 of the 8 channels its schedule asked for: "
                                                   "b (0 of 4: reaches a model output)")):
        run_page("docs/graph.md", {"model": model, "example_inputs": torch.randn(1, 3, 64, 64)},
                 before={1: report_pruner})
    # block 1: conv1 lost 3 channels by hand, then half of the rest interactively, with bn1 in step
    assert model.conv1.out_channels < 61 and model.bn1.num_features == model.conv1.out_channels
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert "conv1" in printed_by_block_1[0] and "bn1" in printed_by_block_1[0]
    # block 2 prints what its comment shows, line for line
    printed = capsys.readouterr().out.strip().splitlines()
    block = python_blocks("docs/graph.md")[1]
    commented = [line.split("# ", 1)[1] for line in block.splitlines() if line.startswith("# ")]
    assert [line.rstrip() for line in printed] == [line.rstrip() for line in commented]
    assert (toy.a.out_channels, toy.b.out_channels) == (4, 8)


# -- docs/transformers.md -------------------------------------------------------------------------------
def tiny_mixtral(namespace: dict) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    namespace["model"] = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)).eval()
    namespace["ids"] = torch.randint(0, 128, (1, 16))


def test_transformers_page_prunes_a_llama_and_the_experts_of_a_mixtral(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = run_page("docs/transformers.md", {"torch": torch, "tp": tp}, before={1: tiny_mixtral})
    assert (tmp_path / "pruned" / "config.json").exists()
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    assert llama.config.hidden_size == 128 and llama.config.num_key_value_heads == 1
    mixtral = namespace["model"]
    assert mixtral.config.num_local_experts == 2  # half of 4 experts, the router's top-2 kept
    assert mixtral.model.layers[0].mlp.gate.weight.shape[0] == 2
    assert mixtral(namespace["ids"]).logits.shape == (1, 16, 128)


# -- docs/distributed.md --------------------------------------------------------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_recipes_run_on_one_rank(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    namespace = {"tp": tp, "torch": torch, "copy": copy, "model": model, "example_inputs": torch.randn(1, 3, 16, 16),
                 "imp": tp.importance.MagnitudeImportance(), "epochs": 1, "loader": image_batches(2, 10),
                 "optimizer": optimizer, "criterion": nn.CrossEntropyLoss(),
                 "DistributedDataParallel": DistributedDataParallel,
                 "fully_shard": fully_shard, "mesh": init_device_mesh("cpu", (1,)),
                 "loss_fn": lambda output: output.square().mean()}

    def fsdp_loader(ns: dict) -> None:
        assert ns["model"][0].out_channels == 4  # the DDP recipe pruned half
        ns["loader"] = [images for images, _ in image_batches(2, 10)]

    with pytest.warns(UserWarning, match="reaches a model output"):  # the page ignores no layer
        run_page("docs/distributed.md", namespace, before={1: fsdp_loader})
    assert model[0].out_channels == 2  # FSDP2 recipe: half again
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the pruned model sharded again computes what the pruned model computes
        torch.testing.assert_close(namespace["sharded"](x), model(x))


# -- docs/ultralytics.md and docs/ultralytics_attention.md ----------------------------------------------
# project: an absolute folder, or Ultralytics under pytest writes into its own package's tests/tmp
TRAIN = 'imgsz=64, batch=2, workers=0, plots=False, amp=False, device="cpu", project="{runs}", exist_ok=True'


@pytest.fixture
def offline_ultralytics_in(tmp_path, monkeypatch):
    """Ultralytics offline, in tmp_path: a synthetic 2-class dataset as data.yaml, an image as image.jpg."""
    import socket
    import sys

    def refuse(*args, **kwargs):
        raise OSError("the docs tests must not reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a download attempt fails the test

    sys.path.insert(0, str(ROOT / "tests" / "integrations"))
    try:
        from test_ultralytics_attention import TINY_RTDETR
        from yolo_data import make_dataset, model_yaml, offline_ultralytics
    finally:
        sys.path.remove(str(ROOT / "tests" / "integrations"))
    if "ultralytics" not in sys.modules:
        offline_ultralytics(tempfile.mkdtemp(prefix="structprune-yolo-config-", dir=tmp_path))
    monkeypatch.chdir(tmp_path)
    model_yaml(tmp_path, "yolov8n.yaml", nc=2)  # found first: the page's yolov8n.yaml built for the 2-class data
    (tmp_path / "rtdetr-tiny.yaml").write_text(TINY_RTDETR)  # RT-DETR-l's modules, 2 decoder layers of 4 heads
    data = make_dataset(tmp_path / "data")
    (tmp_path / "data.yaml").write_text(data.read_text())
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 90, 200)).save(tmp_path / "image.jpg")
    return tmp_path


def test_ultralytics_page_prunes_saves_reloads_and_trains_with_growing_regularization(offline_ultralytics_in):
    from ultralytics import YOLO

    train = TRAIN.format(runs=offline_ultralytics_in / "runs")
    YOLO("yolov8n.yaml").save("yolov8n.pt")  # the page's trained weights: random ones, found before a download
    replace = {
        "tpu.prune(yolo, ratio=0.5)": "tpu.prune(yolo, ratio=0.5, imgsz=64)",
        'model.predict("image.jpg")': 'model.predict("image.jpg", imgsz=64)',
        'model.val(data="data.yaml")': f'model.val(data="data.yaml", {train})',
        'model.export(format="onnx")': 'model.export(format="onnx", imgsz=64)',
        'data="data.yaml", epochs=50,': f'data="data.yaml", epochs=1, {train},',
        "reg_epochs=30,": "reg_epochs=1, imgsz=64,",
        'data="data.yaml", epochs=60,': f'data="data.yaml", epochs=2, {train},',
    }
    namespace = run_page("docs/ultralytics.md", {"tp": tp}, replace=replace)
    summary = namespace["yolo"].trainer.summary
    assert summary["epoch"] == 1 and summary["params_after"] < 0.5 * summary["params_before"]
    assert (offline_ultralytics_in / "pruned.onnx").exists()
    best = YOLO(str(offline_ultralytics_in / "runs" / "train" / "weights" / "best.pt"))
    assert params_of(best.model) == summary["params_after"]


def test_ultralytics_attention_page_halves_rtdetr_cross_attention_heads(offline_ultralytics_in):
    from ultralytics import RTDETR

    from structprune.integrations import ultralytics as tpu

    tiny = str(offline_ultralytics_in / "rtdetr-tiny.yaml")
    namespace = run_page("docs/ultralytics_attention.md", {"tpu": tpu, "RTDETR": lambda name: RTDETR(tiny)},
                         replace={"head_pruning_ratio=0.5)": "head_pruning_ratio=0.5, imgsz=64)"})
    layers = namespace["yolo"].model.model[-1].decoder.layers
    assert [layer.cross_attn.n_heads for layer in layers] == [2, 2]


# -- docs/hf_trainer.md ---------------------------------------------------------------------------------
def test_hf_trainer_recipe_regularizes_prunes_and_saves_a_reloadable_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    ids = torch.randint(1, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    namespace = {"tp": tp, "model": model, "ids": ids[:1], "data": [{"input_ids": row, "labels": row} for row in ids]}
    replace = {"prune_at_step=2000": "prune_at_step=2",
               'TrainingArguments("out", num_train_epochs=3)':
                   'TrainingArguments("out", num_train_epochs=3, report_to="none", use_cpu=True, disable_tqdm=True)'}
    namespace = run_page("docs/hf_trainer.md", namespace, replace=replace)
    reloaded = namespace["model"]
    assert reloaded.config.hidden_size < 32 and reloaded.config.intermediate_size < 64
    assert reloaded.config.hidden_size == model.config.hidden_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids[:2]).logits, model.eval()(ids[:2]).logits)


# -- docs/saving.md -------------------------------------------------------------------------------------
def test_saving_page_round_trips_a_pruned_resnet18(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.chdir(tmp_path)
    pruned = torchvision.models.resnet18().eval()
    tp.pruner.BasePruner(pruned, torch.randn(1, 3, 32, 32), tp.importance.MagnitudeImportance(),
                         pruning_ratio=0.5, ignored_layers=[pruned.fc]).step()
    namespace = run_page("docs/saving.md", {"tp": tp, "torchvision": torchvision, "model": pruned})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(x), pruned(x))  # "same outputs, exactly"
    assert namespace["model"] is not pruned and namespace["model"].conv1.out_channels == pruned.conv1.out_channels
    again = tp.load_state_dict(torchvision.models.resnet18(), namespace["sd"]).eval()  # the page's last line
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


# -- docs/latency.md ------------------------------------------------------------------------------------
def test_latency_page_profiles_rounds_and_plans_steps_to_a_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    use_macs_clock(monkeypatch)  # the page's steps, without the shared machine's timing noise
    model = TinyResNet(classes=10).eval()
    namespace = {"model": model, "example_inputs": torch.randn(1, 3, 16, 16), "x": torch.randn(1, 3, 16, 16)}
    before = params_of(model)
    # 40 ms is more than the stand-in costs (a budget must be below the current cost): half its profiled latency
    replace = {'target={"latency_ms": 40.0}': 'target={"latency_ms": 0.5 * profile.total}'}
    namespace = run_page("docs/latency.md", namespace, replace=replace)
    assert namespace["profile"].total > 0 and "layer3.0.conv2" in namespace["profile"].layers
    assert params_of(model) < before
    assert "latency_ms budget" in str(namespace["pruner"].report())
    budget = namespace["pruner"].report().steps[-1].budget
    assert abs(budget["measured"] - budget["budget"]) <= 0.1 * budget["budget"], budget  # the page's "within 10%"
