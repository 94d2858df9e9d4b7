"""Property-based tests: random valid networks must trace, prune and stay consistent.

For every generated network (see ``strategies.py``):

1. the dependency graph builds;
2. every group ``get_all_groups`` offers prunes with random valid indices (>= 1 channel left, the
   same local channels in every block where heads, grouped convs or group norms ask for it), one
   after the other on the same graph, and the model still runs with the same output shapes;
   blocked groups are fine only for the documented reasons in ``ALLOWED_BLOCKED``;
3. the lossless-removal oracle holds at every step: channels whose consumers were zeroed are removed
   and the outputs do not move (skipped for groups holding a GroupNorm/LayerNorm, whose statistics
   mix channels);
4. MACs and parameters never grow;
5. the pruned model traces again.

A second property feeds arbitrary (not necessarily valid) index sets: the library may block them or
refuse them, but must never leave a model that no longer runs.

``STRUCTPRUNE_FUZZ_EXAMPLES`` sets the number of examples (200 by default).
"""
from __future__ import annotations

import math
import os
import random
import re

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn

import structprune as tp
from oracle import leaves, run, silence_consumers
from strategies import SpecNet, attention_product_layers, specs

EXAMPLES = int(os.environ.get("STRUCTPRUNE_FUZZ_EXAMPLES", 200))

#: Reasons a generated network may legitimately refuse a group, as documented by the library.
ALLOWED_BLOCKED = {
    "model output": re.compile(r"channels reach a model output"),
    "model input": re.compile(r"channels reach .*model input"),
    "regrouped (heads / fused qkv must stay symmetric)": re.compile(r"regroup"),
    "a reshape spells out a size the removal would shrink (a fixed head count)": re.compile(r"spells out the size"),
}


BLOCKED_SEEN: dict = {}  # reason pattern -> count, over the whole run (printed by the campaign)


def _note(text):
    try:
        note(text)
    except Exception:  # noqa: BLE001 - outside a hypothesis test there is nowhere to note to
        pass


def unexpected_reasons(reasons):
    return [r for r in reasons if not any(p.search(r) for p in ALLOWED_BLOCKED.values())]


def outputs(model, xs):
    with torch.no_grad():
        return [t.detach().clone() for t in leaves(run(model, xs))]


def shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def prunable_layers(graph):
    return [m for m in graph.module2node if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def _is_out(item):
    return tp.graph.is_out_channel_pruning_fn(item.dep.handler)


def declared_blocks(group) -> int:
    """Least common multiple of the channel groups every layer of ``group`` declares."""
    blocks = 1
    for item in group:
        module, pruner = item.dep.target.module, item.dep.target.pruner
        if isinstance(module, nn.Parameter):
            continue
        count = pruner.get_out_channel_groups(module) if _is_out(item) else pruner.get_in_channel_groups(module)
        blocks = blocks * (count or 1) // math.gcd(blocks, count or 1)
    return blocks


def symmetric_for_every_layer(group) -> bool:
    """Grouped convs, GroupNorms and heads need the same local channels removed from each of their blocks."""
    for item in group:
        module, pruner = item.dep.target.module, item.dep.target.pruner
        if isinstance(module, nn.Parameter):
            continue
        if _is_out(item) or pruner.is_coupled(module):
            count, total = pruner.get_out_channel_groups(module), pruner.get_out_channels(module)
        else:
            count, total = pruner.get_in_channel_groups(module), pruner.get_in_channels(module)
        if not count or count <= 1 or not total:
            continue
        unit = total // count
        per_block = [set() for _ in range(count)]
        for i in item.idxs:
            per_block[i // unit].add(i % unit)
        if any(block != per_block[0] for block in per_block):
            return False
    return True


def choose_valid(graph, root, rng):
    """A prunable group removing some but not all of ``root``'s channels, symmetric where required."""
    pruner = graph.get_pruner_of_module(root)
    fn = pruner.prune_out_channels
    n = pruner.get_out_channels(root)
    if n < 2:
        return None, []
    full = graph.get_pruning_group(root, fn, list(range(n)))
    base = declared_blocks(full)
    candidates = [b for b in range(base, n + 1) if n % b == 0 and b % base == 0][:8]
    refusals = []
    for blocks in candidates:
        per_block = n // blocks
        if per_block < 2:
            continue
        for _ in range(3):
            local = rng.sample(range(per_block), rng.randint(1, per_block - 1))
            idxs = sorted(b * per_block + i for b in range(blocks) for i in local)
            group = graph.get_pruning_group(root, fn, idxs)
            if group.blocked:
                refusals.extend(group.blocked)
                continue
            if graph.check_pruning_group(group) and symmetric_for_every_layer(group):
                return group, refusals
    return None, refusals


def lossless_applicable(group) -> bool:
    return not any(isinstance(item.dep.target.module, (nn.GroupNorm, nn.LayerNorm)) for item in group)


def check_valid_pruning(spec, rng, log=None):
    """Properties 1-5 on one spec; returns counts for the campaign log."""
    log = log if log is not None else []
    stats = {"pruned": 0, "oracle": 0, "skipped": 0, "blocked_roots": 0}
    model = SpecNet(spec).eval()
    xs = spec.example_inputs()
    reference = outputs(model, xs)
    macs, params = tp.utils.count_ops_and_params(model, xs)

    graph = tp.DependencyGraph().build_dependency(model, xs)  # (1)
    for layer in prunable_layers(graph):
        n = graph.get_out_channels(layer)
        if n < 2:
            continue  # a one-channel layer cannot be pruned anyway
        group = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, range(n))
        if group.blocked:
            stats["blocked_roots"] += 1
            log.append(f"{graph._name(layer)} blocked: {group.blocked}")
            _note(f"blocked: {graph._name(layer)}: {group.blocked}")
            for reason in group.blocked:
                key = next((k for k, p in ALLOWED_BLOCKED.items() if p.search(reason)), "undocumented")
                BLOCKED_SEEN[key] = BLOCKED_SEEN.get(key, 0) + 1
            bad = unexpected_reasons(group.blocked)
            assert not bad, f"{graph._name(layer)} blocked for an undocumented reason: {bad}"

    roots = [group[0].dep.target.module for group in graph.get_all_groups()]
    rng.shuffle(roots)
    attention = {graph.model.layers[name] for name in attention_product_layers(spec)}
    for root in roots:
        group, refusals = choose_valid(graph, root, rng)
        bad = unexpected_reasons(refusals)
        assert not bad, f"{graph._name(root)}: undocumented refusal {bad}"
        if group is None:
            stats["skipped"] += 1
            continue
        oracle = lossless_applicable(group)
        if oracle:
            producers = any(item.dep.target.module in attention for item in group)
            silence_consumers(group, producers)
        before = outputs(model, xs)
        description = str(group.details())
        group.prune()  # (2)
        try:
            after = outputs(model, xs)
        except Exception as error:  # pragma: no cover - reported with context
            raise AssertionError(
                f"model no longer runs ({type(error).__name__}: {error}) after pruning\n{description}"
            ) from error
        assert shapes(after) == shapes(reference), (
            f"output shapes changed {shapes(reference)} -> {shapes(after)} after pruning\n{description}")
        if oracle:  # (3)
            stats["oracle"] += 1
            for b, a in zip(before, after):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{m}\n{description}")
        new_macs, new_params = tp.utils.count_ops_and_params(model, xs)  # (4)
        assert new_macs <= macs and new_params <= params, (macs, new_macs, params, new_params, description)
        macs, params = new_macs, new_params
        stats["pruned"] += 1
    again = tp.DependencyGraph().build_dependency(model, xs)  # (5)
    list(again.get_all_groups())
    return stats


def check_arbitrary_idxs(spec, rng, steps=4):
    """Any index set: blocked, refused with the model untouched, or pruned with the model still running."""
    model = SpecNet(spec).eval()
    xs = spec.example_inputs()
    reference = shapes(outputs(model, xs))
    graph = tp.DependencyGraph().build_dependency(model, xs)
    layers = prunable_layers(graph)
    outcomes = []
    for _ in range(steps):
        layer = rng.choice(layers)
        n = graph.get_out_channels(layer)
        if n < 2:
            continue
        idxs = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
        group = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs)
        if group.blocked:
            bad = unexpected_reasons(group.blocked)
            assert not bad, f"{graph._name(layer)} blocked for an undocumented reason: {bad}"
            outcomes.append("blocked")
            continue
        state, before = state_of(model), outputs(model, xs)
        description = group.details()
        try:
            group.prune()
        except (ValueError, RuntimeError) as error:
            assert same_state(state, state_of(model)), f"refused ({error}) but the model changed\n{description}"
            after = outputs(model, xs)
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            outcomes.append("refused")
            continue
        try:
            after = outputs(model, xs)
        except Exception as error:
            raise AssertionError(
                f"pruning {graph._name(layer)} idxs={idxs} was accepted but broke the model: "
                f"{type(error).__name__}: {error}\n{description}"
            ) from error
        assert shapes(after) == reference, description
        outcomes.append("pruned")
    return outcomes


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ_SETTINGS
@given(spec=specs(), seed=st.integers(0, 2**16))
def test_random_networks_prune_consistently(spec, seed):
    note(repr(spec))
    check_valid_pruning(spec, random.Random(seed))


@FUZZ_SETTINGS
@given(spec=specs(), seed=st.integers(0, 2**16))
def test_arbitrary_indices_never_break_a_model_silently(spec, seed):
    note(repr(spec))
    check_arbitrary_idxs(spec, random.Random(seed))


def test_the_generator_covers_every_piece():
    """Guard against a generator that silently stops producing some op (the properties would then pass)."""
    seen_ops, seen_layers = set(), set()

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(specs())
    def collect(spec):
        for op in spec.ops:
            seen_ops.add(op.kind if op.kind != "attn" else f"attn:{op.arg('variant')}")
            if op.kind == "split":
                seen_ops.add(f"split:{op.arg('how')}")
        for name, ctor in spec.layers.items():
            seen_layers.add(ctor[0] if ctor[0] not in ("conv", "convT") or ctor[4] == 1 else f"{ctor[0]}:grouped")
        for out in spec.outputs:
            seen_ops.add(f"output:{out[0]}")

    collect()
    for kind in ("layer", "act", "pool", "add", "mul", "cat", "split", "se", "gap", "flatten_linear", "tokens",
                 "untokens", "tokmean", "attn:manual", "attn:sdpa", "attn:fused", "scale", "in_res",
                 "split:split", "split:slice", "split:tensor_split", "split:narrow", "output:raw", "output:head"):
        assert kind in seen_ops, kind
    for kind in ("conv", "conv:grouped", "convT", "linear", "bn2d", "bn1d", "gn", "ln", "prelu"):
        assert kind in seen_layers, kind
