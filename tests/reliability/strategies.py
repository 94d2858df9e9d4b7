"""Random but valid networks made of the pieces structprune supports, for property-based tests.

A generated network is a :class:`Spec`: a list of small ops over numbered values (``v0``, ``v1``...)
plus a table of layers. :class:`SpecNet` interprets a spec as one ``nn.Module``, so a failing example
prints as a readable program (``repr(spec)``) and can be rebuilt by hand as a plain module.

Values have one of three layouts, all with batch 2:

* ``img``  ``[B, C, H, W]`` with ``H = W = 4``; channels on dim 1
* ``vec``  ``[B, F]``; channels on dim 1
* ``tok``  ``[B, T, C]`` with ``T = 16``; channels on the last dim

Split sizes are never stored: like real code, the forward reads them from the layers that consume
the pieces (``conv.in_channels``, ``linear.in_features``, ``bn.num_features``), so a pruned model
still splits consistently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

H = W = 4
T = H * W
BATCH = 2
HEAD_OUT = 3

ACTIVATIONS = ("relu", "gelu", "sigmoid", "tanh", "silu", "hardswish", "leaky_relu", "relu_module")
SPLIT_WAYS = ("split", "slice", "tensor_split", "narrow")


# -- the spec ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """``outs = kind(srcs, **args)``; ``args`` is a tuple of (key, value) pairs so ops stay hashable."""

    kind: str
    srcs: tuple
    outs: tuple
    args: tuple = ()

    def arg(self, key, default=None):
        for k, v in self.args:
            if k == key:
                return v
        return default

    def __str__(self):
        outs = ", ".join(f"v{o}" for o in self.outs) or "_"
        srcs = ", ".join(f"v{s}" for s in self.srcs)
        extra = "".join(f", {k}={v!r}" for k, v in self.args)
        return f"{outs} = {self.kind}({srcs}{extra})"


@dataclass
class Spec:
    inputs: list  # [(value id, channels)] image inputs
    layers: dict  # name -> constructor tuple, see build_layer
    params: dict  # name -> shape of a bare nn.Parameter used in forward (layer scale)
    ops: list
    outputs: list  # [("head", value, layer name) | ("raw", value)]
    combine: str  # "sum": heads are summed into one tensor, "tuple": every head is an output
    meta: dict  # value id -> (layout, channels)
    seed: int = 0

    def __repr__(self):
        lines = ["Spec("]
        lines.append("  inputs: " + ", ".join(f"v{v}: img[{c}]" for v, c in self.inputs))
        for name, ctor in self.layers.items():
            lines.append(f"  layer {name} = {describe_layer(ctor)}")
        for name, shape in self.params.items():
            lines.append(f"  param {name}: {tuple(shape)}")
        for op in self.ops:
            layout, size = self.meta.get(op.outs[0], ("?", "?")) if op.outs else ("", "")
            lines.append(f"  {op}    # {layout}[{size}]")
        outs = [f"{o[0]}(v{o[1]})" for o in self.outputs]
        lines.append(f"  outputs ({self.combine}): " + ", ".join(outs))
        lines.append(f"  seed={self.seed})")
        return "\n".join(lines)

    def example_inputs(self, dtype=torch.float32, device="cpu"):
        generator = torch.Generator().manual_seed(self.seed + 1)
        xs = tuple(torch.randn(BATCH, c, H, W, generator=generator) for _, c in self.inputs)
        return tuple(x.to(device=device, dtype=dtype) for x in xs)


def describe_layer(ctor) -> str:
    kind = ctor[0]
    if kind in ("conv", "convT"):
        _, cin, cout, k, groups = ctor
        name = "Conv2d" if kind == "conv" else "ConvTranspose2d"
        return f"{name}({cin}, {cout}, {k}, padding={k // 2}, groups={groups})"
    if kind == "linear":
        return f"Linear({ctor[1]}, {ctor[2]})"
    if kind == "bn2d":
        return f"BatchNorm2d({ctor[1]})"
    if kind == "bn1d":
        return f"BatchNorm1d({ctor[1]})"
    if kind == "gn":
        return f"GroupNorm({ctor[1]}, {ctor[2]})"
    if kind == "ln":
        return f"LayerNorm({ctor[1]})"
    if kind == "prelu":
        return f"PReLU({ctor[1]})"
    raise ValueError(ctor)


def build_layer(ctor) -> nn.Module:
    kind = ctor[0]
    if kind == "conv":
        _, cin, cout, k, groups = ctor
        return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
    if kind == "convT":
        _, cin, cout, k, groups = ctor
        return nn.ConvTranspose2d(cin, cout, k, padding=k // 2, groups=groups)
    if kind == "linear":
        return nn.Linear(ctor[1], ctor[2])
    if kind == "bn2d":
        return nn.BatchNorm2d(ctor[1])
    if kind == "bn1d":
        return nn.BatchNorm1d(ctor[1])
    if kind == "gn":
        return nn.GroupNorm(ctor[1], ctor[2])
    if kind == "ln":
        return nn.LayerNorm(ctor[1])
    if kind == "prelu":
        return nn.PReLU(ctor[1])
    raise ValueError(ctor)


def layer_in_size(layer: nn.Module) -> int:
    """The channel count a layer reads: how the forward sizes the split pieces it consumes."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return layer.num_features
    raise TypeError(f"{type(layer).__name__} cannot size a split piece")


# -- the interpreter --------------------------------------------------------------------------------
def _activation(name, x):
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "silu":
        return F.silu(x)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, 0.1)
    raise ValueError(name)


class SpecNet(nn.Module):
    """One module that runs a :class:`Spec`."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.layers = nn.ModuleDict({name: build_layer(ctor) for name, ctor in spec.layers.items()})
        self.scales = nn.ParameterDict(
            {name: nn.Parameter(torch.rand(*shape) + 0.5) for name, shape in spec.params.items()}
        )
        self.act = nn.ReLU()
        with torch.no_grad():
            for layer in self.layers.values():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.running_mean.uniform_(-0.5, 0.5)
                    layer.running_var.uniform_(0.5, 1.5)
                if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                    layer.weight.uniform_(0.5, 1.5)
                    layer.bias.uniform_(-0.5, 0.5)

    def forward(self, *inputs):
        spec = self.spec
        env = {}
        for (vid, _), x in zip(spec.inputs, inputs):
            env[vid] = x
        for op in spec.ops:
            results = self._run(op, [env[s] for s in op.srcs], inputs)
            for vid, value in zip(op.outs, results):
                env[vid] = value
        heads = []
        raws = []
        for out in spec.outputs:
            if out[0] == "head":
                heads.append(self._head(env[out[1]], out[2]))
            else:
                raws.append(env[out[1]])
        if spec.combine == "sum" and heads:
            total = heads[0]
            for h in heads[1:]:
                total = total + h
            heads = [total]
        outputs = heads + raws
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _head(self, x, name):
        layer = self.layers[name]
        if x.dim() == 4:
            return layer(x).mean((2, 3))
        if x.dim() == 3:
            return layer(x.mean(1))
        return layer(x)

    def _run(self, op, xs, inputs):
        kind = op.kind
        layers = self.layers
        if kind == "layer":
            layer = layers[op.arg("name")]
            x = xs[0]
            if op.arg("layout") == "cl":  # channels last and back
                return [layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)]
            return [layer(x)]
        if kind == "act":
            name = op.arg("fn")
            return [self.act(xs[0]) if name == "relu_module" else _activation(name, xs[0])]
        if kind == "pool":
            how = op.arg("how")
            if how == "max":
                return [F.max_pool2d(xs[0], 3, 1, 1)]
            if how == "avg":
                return [F.avg_pool2d(xs[0], 3, 1, 1, count_include_pad=False)]
            return [F.interpolate(F.avg_pool2d(xs[0], 2), scale_factor=2.0, mode="nearest")]
        if kind == "add":
            return [xs[0] + xs[1]]
        if kind == "mul":
            return [xs[0] * xs[1]]
        if kind == "cat":
            return [torch.cat(xs, dim=op.arg("dim"))]
        if kind == "split":
            return self._split(op, xs[0])
        if kind == "scale":
            return [xs[0] * self.scales[op.arg("name")]]
        if kind == "se":
            x = xs[0]
            gate = layers[op.arg("fc2")](F.relu(layers[op.arg("fc1")](x.mean((2, 3)))))
            return [x * torch.sigmoid(gate)[:, :, None, None]]
        if kind == "gap":
            if op.arg("how") == "adaptive":
                return [F.adaptive_avg_pool2d(xs[0], 1).flatten(1)]
            return [xs[0].mean((2, 3))]
        if kind == "flatten_linear":
            return [layers[op.arg("name")](torch.flatten(xs[0], 1))]
        if kind == "tokens":
            return [xs[0].flatten(2).transpose(1, 2)]
        if kind == "untokens":
            x = xs[0]
            return [x.transpose(1, 2).reshape(x.shape[0], -1, H, W)]
        if kind == "tokmean":
            return [xs[0].mean(1)]
        if kind == "attn":
            return [self._attention(op, xs[0])]
        if kind == "in_res":
            return [xs[0] + inputs[op.arg("input")]]
        raise ValueError(kind)

    def _split(self, op, x):
        dim = op.arg("dim")
        sizes = [layer_in_size(self.layers[name]) for name in op.arg("sizers")]
        how = op.arg("how")
        if how == "split":
            return list(torch.split(x, sizes, dim=dim))
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        if how == "tensor_split":
            return list(torch.tensor_split(x, offsets[1:-1], dim=dim))
        if how == "narrow":
            return [x.narrow(dim, start, size) for start, size in zip(offsets, sizes)]
        pieces = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            pieces.append(x[:, start:end] if dim == 1 else x[..., start:end])
        return pieces

    def _attention(self, op, x):
        layers = self.layers
        heads = op.arg("heads")
        scale = op.arg("scale")
        batch, tokens = x.shape[0], x.shape[1]
        if op.arg("variant") == "fused":
            qkv = layers[op.arg("qkv")](x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = layers[op.arg("q")](x).view(batch, tokens, heads, -1).transpose(1, 2)
            k = layers[op.arg("k")](x).view(batch, tokens, heads, -1).transpose(1, 2)
            v = layers[op.arg("v")](x).view(batch, tokens, heads, -1).transpose(1, 2)
        if op.arg("variant") == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * scale
            out = attn.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return layers[op.arg("o")](out)


def attention_product_layers(spec: Spec) -> set:
    """Layers whose output channels meet through q . k (the oracle must zero them on both sides)."""
    names = set()
    for op in spec.ops:
        if op.kind == "attn":
            for key in ("q", "k", "qkv"):
                if op.arg(key) is not None:
                    names.add(op.arg(key))
    return names


# -- the generator ----------------------------------------------------------------------------------
class _Builder:
    def __init__(self, draw, min_piece=1, grouped=True):
        self.draw = draw
        self.min_piece = min_piece
        self.grouped = grouped
        self.layers: dict = {}
        self.params: dict = {}
        self.ops: list = []
        self.meta: dict = {}
        self.consumed: set = set()
        self.inputs: list = []
        self.next_value = 0
        self.next_layer = 0

    # helpers
    def value(self, layout, size):
        vid = self.next_value
        self.next_value += 1
        self.meta[vid] = (layout, size)
        return vid

    def layer(self, ctor, prefix):
        name = f"{prefix}{self.next_layer}"
        self.next_layer += 1
        self.layers[name] = ctor
        return name

    def emit(self, kind, srcs, outs, **args):
        self.ops.append(Op(kind, tuple(srcs), tuple(outs), tuple(args.items())))
        self.consumed.update(srcs)

    def pick(self, options):
        options = list(options)
        return options[self.draw(st.integers(0, len(options) - 1))] if len(options) > 1 else options[0]

    def values(self, layout=None, min_size=1):
        return [v for v, (l, s) in self.meta.items() if (layout is None or l == layout) and s >= min_size]

    def size(self, lo=2, hi=10):
        return self.draw(st.integers(lo, hi))

    # ops
    def apply(self, name, src, layout_kind, out_size, layout=None):
        out = self.value(layout_kind, out_size)
        if layout:
            self.emit("layer", [src], [out], name=name, layout=layout)
        else:
            self.emit("layer", [src], [out], name=name)
        return out

    def conv(self, src):
        cin = self.meta[src][1]
        variant = self.pick(["plain", "plain", "grouped", "depthwise", "transposed"])
        if not self.grouped and variant in ("grouped", "depthwise"):
            variant = "plain"
        k = self.pick([1, 3])
        divisors = [g for g in (2, 3, 4) if cin % g == 0]
        if variant == "depthwise" and cin >= 2:
            name = self.layer(("conv", cin, cin, 3, cin), "dw")
            return self.apply(name, src, "img", cin)
        if variant in ("grouped", "transposed") and divisors:
            groups = self.pick(divisors) if variant == "grouped" else self.pick([1, 1] + divisors * self.grouped)
            cout = groups * self.draw(st.integers(1, 3))
            kind = "conv" if variant == "grouped" else "convT"
            name = self.layer((kind, cin, cout, k, groups), "gconv" if kind == "conv" else "convT")
            return self.apply(name, src, "img", cout)
        kind = "convT" if variant == "transposed" else "conv"
        cout = self.size()
        name = self.layer((kind, cin, cout, k, 1), "conv" if kind == "conv" else "convT")
        return self.apply(name, src, "img", cout)

    def linear(self, src, out_size=None):
        layout, cin = self.meta[src]
        cout = out_size or self.size()
        if layout == "img":
            name = self.layer(("linear", cin, cout), "cl_fc")
            return self.apply(name, src, "img", cout, layout="cl")
        name = self.layer(("linear", cin, cout), "fc")
        return self.apply(name, src, layout, cout)

    def project(self, target_layout, size):
        """A fresh value of the given layout and size, made by a layer from some existing value."""
        sources = self.values(target_layout)
        src = self.pick(sources) if sources else None
        if src is None:
            return None
        if target_layout == "img":
            cin = self.meta[src][1]
            name = self.layer(("conv", cin, size, self.pick([1, 3]), 1), "proj")
            return self.apply(name, src, "img", size)
        return self.linear(src, size)

    def norm(self, src):
        layout, c = self.meta[src]
        if layout == "img":
            what = self.pick(["bn", "bn", "gn", "ln", "prelu"])
            if what == "gn":
                groups = self.pick([g for g in (1, 2, 3, 4) if c % g == 0])
                return self.apply(self.layer(("gn", groups, c), "gn"), src, "img", c)
            if what == "ln":
                return self.apply(self.layer(("ln", c), "ln"), src, "img", c, layout="cl")
            if what == "prelu":
                return self.apply(self.layer(("prelu", c), "prelu"), src, "img", c)
            return self.apply(self.layer(("bn2d", c), "bn"), src, "img", c)
        if layout == "vec":
            what = self.pick(["bn", "ln", "prelu"])
            ctor = {"bn": ("bn1d", c), "ln": ("ln", c), "prelu": ("prelu", c)}[what]
            return self.apply(self.layer(ctor, what), src, "vec", c)
        return self.apply(self.layer(("ln", c), "ln"), src, "tok", c)

    def binary(self, kind, a):
        layout, size = self.meta[a]
        partners = [v for v in self.values(layout) if self.meta[v][1] == size]
        b = self.pick(partners) if self.draw(st.booleans()) else self.project(layout, size)
        if b is None:
            b = a
        out = self.value(layout, size)
        self.emit(kind, [a, b], [out])
        return out

    def cat(self, a):
        layout = self.meta[a][0]
        n = self.draw(st.integers(2, 3))
        others = [self.pick(self.values(layout)) for _ in range(n - 1)]
        srcs = [a] + others
        srcs = srcs if not self.draw(st.booleans()) else list(reversed(srcs))
        out = self.value(layout, sum(self.meta[s][1] for s in srcs))
        self.emit("cat", srcs, [out], dim=1 if layout != "tok" else -1)
        return out

    def split(self, src):
        layout, size = self.meta[src]
        n = self.draw(st.integers(2, max(2, min(3, size // self.min_piece))))
        cuts = sorted(self.draw(st.lists(st.integers(1, size - 1), min_size=n - 1, max_size=n - 1, unique=True)))
        if self.min_piece > 1:  # campaign knob: pieces at least this wide (to look past a known bug)
            cuts = [c for c in cuts if c >= self.min_piece and size - c >= self.min_piece][:1] or [size // 2]
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [size])]
        pieces = [self.value(layout, s) for s in sizes]
        sizers = []
        sizer_ops = []
        for piece, piece_size in zip(pieces, sizes):
            if layout == "img":
                what = self.pick(["conv", "conv", "bn"])
                if what == "bn":
                    name = self.layer(("bn2d", piece_size), "sbn")
                    out_size = piece_size
                else:
                    out_size = self.size(1, 8)
                    name = self.layer(("conv", piece_size, out_size, self.pick([1, 3]), 1), "sconv")
            else:
                what = self.pick(["fc", "fc", "bn"]) if layout == "vec" else "fc"
                if what == "bn":
                    name = self.layer(("bn1d", piece_size), "sbn")
                    out_size = piece_size
                else:
                    out_size = self.size(1, 8)
                    name = self.layer(("linear", piece_size, out_size), "sfc")
            sizers.append(name)
            sizer_ops.append((name, piece, out_size))
        how = self.pick(SPLIT_WAYS)
        self.emit("split", [src], pieces, dim=1 if layout != "tok" else -1, how=how, sizers=tuple(sizers))
        self.consumed.difference_update(pieces)
        for name, piece, out_size in sizer_ops:
            self.apply(name, piece, layout, out_size)
        return pieces[-1]

    def shared(self, src):
        """Call an existing layer again, on another value of the right size."""
        layout, size = self.meta[src]
        options = []
        for name, ctor in self.layers.items():
            if name.startswith("head"):
                continue
            if layout == "img" and ctor[0] in ("conv", "bn2d") and _reads(ctor) == size:
                options.append(name)
            if layout in ("vec", "tok") and ctor[0] == "linear" and ctor[1] == size:
                options.append(name)
        if not options:
            return None
        name = self.pick(options)
        return self.apply(name, src, layout, _writes(self.layers[name]))

    def attention(self, src):
        c = self.meta[src][1]
        heads = self.pick([1, 2, 3])
        variant = self.pick(["manual", "sdpa", "fused"])
        dim = self.pick([2, 3])
        vdim = dim if variant == "fused" else self.pick([2, 3])
        cout = self.size(2, 8)
        scale = 1.0 / math.sqrt(dim)
        o = self.layer(("linear", heads * vdim, cout), "attn_o")
        out = self.value("tok", cout)
        if variant == "fused":
            qkv = self.layer(("linear", c, 3 * heads * dim), "attn_qkv")
            self.emit("attn", [src], [out], variant=variant, heads=heads, scale=scale, qkv=qkv, o=o)
        else:
            q = self.layer(("linear", c, heads * dim), "attn_q")
            k = self.layer(("linear", c, heads * dim), "attn_k")
            v = self.layer(("linear", c, heads * vdim), "attn_v")
            self.emit("attn", [src], [out], variant=variant, heads=heads, scale=scale, q=q, k=k, v=v, o=o)
        return out

    def step(self):
        """Add one op reading a random existing value."""
        src = self.pick(sorted(self.meta))
        layout, size = self.meta[src]
        choices = {
            "img": ["conv", "conv", "conv", "norm", "act", "pool", "add", "mul", "cat", "split", "se", "gap",
                    "flatten_linear", "tokens", "linear", "shared", "scale", "in_res", "attn_img"],
            "vec": ["linear", "linear", "norm", "act", "add", "mul", "cat", "split", "shared", "scale"],
            "tok": ["linear", "linear", "norm", "act", "add", "cat", "split", "attn", "attn", "untokens", "tokmean",
                    "tokmean", "shared"],
        }[layout]
        what = self.pick(choices)
        if what == "split" and size < 2 * self.min_piece:
            what = "act"
        if what == "conv":
            return self.conv(src)
        if what == "linear":
            return self.linear(src)
        if what == "norm":
            return self.norm(src)
        if what == "act":
            out = self.value(layout, size)
            self.emit("act", [src], [out], fn=self.pick(ACTIVATIONS))
            return out
        if what == "pool":
            out = self.value("img", size)
            self.emit("pool", [src], [out], how=self.pick(["max", "avg", "down_up"]))
            return out
        if what in ("add", "mul"):
            return self.binary(what, src)
        if what == "cat":
            return self.cat(src)
        if what == "split":
            return self.split(src)
        if what == "se":
            hidden = max(1, size // 2)
            fc1 = self.layer(("linear", size, hidden), "se_fc")
            fc2 = self.layer(("linear", hidden, size), "se_fc")
            out = self.value("img", size)
            self.emit("se", [src], [out], fc1=fc1, fc2=fc2)
            return out
        if what == "gap":
            out = self.value("vec", size)
            self.emit("gap", [src], [out], how=self.pick(["mean", "adaptive"]))
            return out
        if what == "flatten_linear":
            cout = self.size()
            name = self.layer(("linear", size * H * W, cout), "flat_fc")
            out = self.value("vec", cout)
            self.emit("flatten_linear", [src], [out], name=name)
            return out
        if what == "tokens":
            out = self.value("tok", size)
            self.emit("tokens", [src], [out])
            return out
        if what == "untokens":
            out = self.value("img", size)
            self.emit("untokens", [src], [out])
            return out
        if what == "tokmean":
            out = self.value("vec", size)
            self.emit("tokmean", [src], [out])
            return out
        if what == "attn":
            return self.attention(src)
        if what == "attn_img":  # a transformer block inside a CNN: tokens, attention, back to an image
            tokens = self.value("tok", size)
            self.emit("tokens", [src], [tokens])
            out = self.attention(tokens)
            if self.draw(st.booleans()):
                image = self.value("img", self.meta[out][1])
                self.emit("untokens", [out], [image])
                return image
            return out
        if what == "shared":
            return self.shared(src)
        if what == "scale":
            name = f"scale{len(self.params)}"
            self.params[name] = (size, 1, 1) if layout == "img" else (size,)
            out = self.value(layout, size)
            self.emit("scale", [src], [out], name=name)
            return out
        if what == "in_res":
            matching = [i for i, (vid, c) in enumerate(self.inputs) if c == size]
            if not matching:
                return None
            out = self.value("img", size)
            self.emit("in_res", [src], [out], input=self.pick(matching))
            return out
        raise AssertionError(what)


def _reads(ctor):
    return ctor[1]


def _writes(ctor):
    if ctor[0] in ("conv", "convT", "linear"):
        return ctor[2]
    return ctor[1]


@st.composite
def specs(draw, max_ops: int = 10, min_piece: int = 1, grouped: bool = True) -> Spec:
    """``min_piece`` and ``grouped`` narrow the space, for campaigns that look past a known bug."""
    b = _Builder(draw, min_piece, grouped)
    for _ in range(draw(st.integers(1, 2))):
        c = draw(st.integers(2, 5))
        b.inputs.append((b.value("img", c), c))
    # every net starts with a conv so there is something to prune
    b.conv(b.inputs[0][0])
    for _ in range(draw(st.integers(1, max_ops))):
        b.step()
    input_ids = {vid for vid, _ in b.inputs}
    dangling = [v for v in sorted(b.meta) if v not in b.consumed and v not in input_ids]
    outputs = []
    for v in dangling:
        if draw(st.integers(0, 5)) == 0:  # sometimes a raw value is an output: its channels are blocked
            outputs.append(("raw", v))
            continue
        layout, size = b.meta[v]
        ctor = ("conv", size, HEAD_OUT, 1, 1) if layout == "img" else ("linear", size, HEAD_OUT)
        outputs.append(("head", v, b.layer(ctor, "head")))
    if not any(o[0] == "head" for o in outputs):
        v = outputs[-1][1]
        layout, size = b.meta[v]
        ctor = ("conv", size, HEAD_OUT, 1, 1) if layout == "img" else ("linear", size, HEAD_OUT)
        outputs.append(("head", v, b.layer(ctor, "head")))
    combine = draw(st.sampled_from(["sum", "tuple"]))
    seed = draw(st.integers(0, 2**16))
    return Spec(b.inputs, b.layers, b.params, b.ops, outputs, combine, b.meta, seed)
