"""The ``structprune`` command: ``demo``, ``inspect`` and ``prune``.

Every failure a user can cause (unknown model, bad shape, bad ratio, missing factory...) ends as one
``structprune: error: ...`` line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

PROG = "structprune"
IMPORTANCES = ("l1", "l2", "taylor", "random")
DEFAULT_INPUT_SHAPE = "1,3,224,224"
SOURCE_FILE = "structprune_cli.json"  # written next to the pruned model: how it was made
ULTRALYTICS = "ultralytics"
ULTRALYTICS_IMGSZ = 640

MAIN_EPILOG = """examples:
  structprune demo
  structprune inspect torchvision:resnet18 --input-shape 1,3,64,64 --ratio 0.5
  structprune prune timm:resnet18 --ratio 0.5 --importance l2 --out pruned/
  structprune <command> --help"""

DEMO_EPILOG = """examples:
  structprune demo                              # growing regularization, 75% of channels, ~1 minute
  structprune demo --method greg1 --out runs/greg1
  structprune demo --ratio 0.5 --epochs 4 --seed 1"""

INSPECT_EPILOG = """MODEL is torchvision:NAME, timm:NAME (built with pretrained=False) or path/to/file.py:factory
(a function returning the model).

examples:
  structprune inspect torchvision:resnet18
  structprune inspect timm:mobilenetv3_small_100 --input-shape 1,3,128,128 --ratio 0.5
  structprune inspect my_models.py:build_net --input-shape 2,3,32,32"""

PRUNE_EPILOG = """MODEL is torchvision:NAME, timm:NAME (built with pretrained=False) or path/to/file.py:factory.
The output folder is read back with  tp.load_pruned(fresh_model, DIR).
MODEL may also be ultralytics:NAME.yaml (random init) or ultralytics:path/to/weights.pt (extra 'yolo'):
the output folder then holds NAME.pt, loaded with  YOLO("DIR/NAME.pt")  (--input-shape sets the traced
image size, 640 by default).

examples:
  structprune prune torchvision:resnet18 --ratio 0.5 --importance l2 --out resnet18-50
  structprune prune timm:resnet50 --ratio 0.3 --importance taylor --global --round-to 8 --out r50
  structprune prune my_models.py:build_net --ratio 0.25 --importance l1 --input-shape 1,3,32,32 --out net
  structprune prune ultralytics:yolov8n.yaml --ratio 0.5 --out pruned/
  structprune prune ultralytics:runs/detect/train/weights/best.pt --ratio 0.3 --out pruned/"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() prints one line."""

    def error(self, message: str):
        raise CLIError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------------
def parse_ratio(text: str) -> float:
    """A pruning ratio in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must lie in [0, 1), got {text}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; every size a positive integer."""
    parts = [part.strip() for part in text.split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input shape must be comma-separated positive integers such as 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"input shape sizes must be positive integers, got {text!r}")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def load_model(spec: str) -> nn.Module:
    """Build the model named by ``torchvision:NAME``, ``timm:NAME`` or ``path/to/file.py:factory``
    (random weights, eval mode: batch-1 inputs then work with BatchNorm)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise CLIError(f"model must be torchvision:NAME, timm:NAME or path/to/file.py:factory, got {spec!r}")
    if source == ULTRALYTICS:
        raise CLIError(f"{spec}: Ultralytics models are pruned with  structprune prune {spec} --ratio R --out DIR")
    loaders: dict[str, Callable[[str], nn.Module]] = {"torchvision": _torchvision_model, "timm": _timm_model}
    loader = loaders.get(source)
    model = loader(name) if loader is not None else _factory_model(Path(source), name)
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise CLIError("torchvision models need the 'torchvision' package: pip install torchvision") from None

    if name not in torchvision.models.list_models():
        raise CLIError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise CLIError("timm models need the 'timm' package: pip install timm") from None
    if not timm.is_model(name):
        raise CLIError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False)


def _factory_model(path: Path, factory: str) -> nn.Module:
    if path.suffix != ".py":
        raise CLIError(
            f"unknown model source {str(path)!r}: use torchvision:NAME, timm:NAME or path/to/file.py:factory"
        )
    if not path.is_file():
        raise CLIError(f"model file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_structprune_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise CLIError(f"importing {path} failed: {type(error).__name__}: {error}") from None
    function = getattr(module, factory, None)
    if not callable(function):
        raise CLIError(f"{path} has no function {factory!r}")
    try:
        return function()
    except Exception as error:
        raise CLIError(f"{path}:{factory}() failed: {type(error).__name__}: {error}") from None


def _run_model(model: nn.Module, inputs: torch.Tensor, spec: str) -> None:
    try:
        with torch.no_grad():
            model(inputs)
    except Exception as error:
        raise CLIError(f"{spec} does not run on inputs of shape {tuple(inputs.shape)}: "
                       f"{type(error).__name__}: {error}; pass --input-shape") from None


# ---------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------
def make_importance(name: str):
    """The criterion behind each ``--importance`` choice."""
    from . import importance

    factories = {
        "l1": lambda: importance.MagnitudeImportance(p=1),
        "l2": lambda: importance.MagnitudeImportance(p=2),
        "taylor": importance.TaylorImportance,
        "random": importance.RandomImportance,
    }
    if name not in factories:
        raise CLIError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")
    return factories[name]()


def prune_model(model: nn.Module, inputs: torch.Tensor, ratio: float, importance: str = "l2",
                global_pruning: bool = False, round_to: int | None = None, seed: int = 0):
    """Prune ``model`` in place and return the pruner that did it. Layers producing the model's outputs
    are left whole by the dependency graph itself (outputs keep their shape).

    ``taylor`` first runs one backward pass of ``output.sum()`` on ``inputs`` so every weight has a gradient.
    """
    from .pruner import BasePruner
    from .utils import flatten_as_list

    torch.manual_seed(seed)  # random importance draws from the global RNG: same seed, same pruned model
    criterion = make_importance(importance)
    pruner = BasePruner(model, inputs, criterion, pruning_ratio=ratio, global_pruning=global_pruning,
                        round_to=round_to)
    if importance == "taylor":
        model.zero_grad()
        sum(t.float().sum() for t in flatten_as_list(model(inputs)) if t.is_floating_point()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return pruner


def example_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Standard-normal example inputs of ``shape``, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def _count(model: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    from .utils import count_ops_and_params

    macs, params = count_ops_and_params(model, inputs)
    return int(macs), int(params)


def _human(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _change(before: int, after: int) -> str:
    return f"{_human(before)} -> {_human(after)} ({after / before:.1%} left)" if before else f"{before} -> {after}"


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo.run import DemoConfig, run_demo
    except ImportError as error:
        raise CLIError(f"the demo needs scikit-learn, matplotlib and tqdm ({error}): "
                       f"pip install 'structprune[demo]'") from None

    started = time.perf_counter()
    config = DemoConfig(ratio=args.ratio, method=args.method, epochs=args.epochs, seed=args.seed,
                        out=Path(args.out) if args.out else None, show_progress=not args.quiet,
                        threads=args.threads)
    result = run_demo(config)
    print(result.table)
    print(f"(accuracy on the 397 test digits; latency: CPU, {args.threads} thread(s), batch 1 and 64; "
          f"file: the tp.save_pruned folder)")
    print(f"\nreport: {result.out}/ (summary.json, PNG plots, pruned_model/ for tp.load_pruned)")
    print(f"total time: {time.perf_counter() - started:.1f} s")
    return 0


def _load_and_count(args: argparse.Namespace):
    """The model named on the command line, its example input (checked to run), MACs and params."""
    torch.manual_seed(args.seed)  # random init: the same seed builds and prunes the same model
    args.input_shape = args.input_shape or parse_shape(DEFAULT_INPUT_SHAPE)
    model = load_model(args.model)
    inputs = example_input(args.input_shape, args.seed)
    _run_model(model, inputs, args.model)
    macs, params = _count(model, inputs)
    return model, inputs, macs, params


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import DependencyGraph

    model, inputs, macs, params = _load_and_count(args)
    print(f"model: {args.model}   input: {tuple(args.input_shape)}")
    print(f"MACs: {_human(macs)} ({macs:,})   params: {_human(params)} ({params:,})")

    graph = DependencyGraph().build_dependency(model, inputs)
    groups = list(graph.get_all_groups())
    print(f"\n{len(groups)} prunable groups:")
    print(f"{'#':>4}  {'root layer':<34} {'channels':>8}  coupled layers")
    for index, group in enumerate(groups):
        root = group[0].dep.target
        print(f"{index:>4}  {_layer_label(root):<34} {len(group[0].idxs):>8}  {_coupled(group)}")

    if args.ratio is not None:
        pruned = copy.deepcopy(model)
        prune_model(pruned, inputs, args.ratio, "l2", seed=args.seed)
        after_macs, after_params = _count(pruned, inputs)
        print(f"\nwith --ratio {args.ratio} (l2 magnitude, per layer; layers feeding the outputs kept whole):")
        print(f"  MACs:   {_change(macs, after_macs)}")
        print(f"  params: {_change(params, after_params)}")
    return 0


def _layer_label(node) -> str:
    return f"{node.name} ({type(node.module).__name__})"


def _coupled(group, limit: int = 8) -> str:
    names = [f"{item.dep.target.name}[{item.side}]"
             for item in list(group)[1:]]
    shown = ", ".join(names[:limit]) or "-"
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def cmd_prune(args: argparse.Namespace) -> int:
    from .serialization import save_pruned

    if args.model.startswith(ULTRALYTICS + ":"):
        return _prune_ultralytics(args)
    model, inputs, macs, params = _load_and_count(args)
    pruner = prune_model(model, inputs, args.ratio, args.importance, args.global_pruning, args.round_to, args.seed)
    after_macs, after_params = _count(model, inputs)
    out = save_pruned(model, args.out, history=pruner.pruning_history())
    source = {"model": args.model, "input_shape": list(args.input_shape), "ratio": args.ratio,
              "importance": args.importance, "global": args.global_pruning, "round_to": args.round_to,
              "seed": args.seed}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    print(f"model: {args.model}   input: {tuple(args.input_shape)}   importance: {args.importance}"
          f"{'  (global)' if args.global_pruning else ''}")
    print(f"MACs:   {_change(macs, after_macs)}")
    print(f"params: {_change(params, after_params)}")
    print(f"saved to {out}/ ; load with tp.load_pruned(<fresh {args.model} model>, {str(out)!r})")
    return 0


def _ultralytics_model(name: str):
    """``YOLO(name)`` (``RTDETR`` for rtdetr names): a yaml from Ultralytics' configs or a local .pt/.yaml."""
    try:
        from .integrations import ultralytics as tpu

        tpu.require_ultralytics()
    except ImportError as error:
        raise CLIError(str(error)) from None
    from ultralytics import RTDETR, YOLO

    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".pt"):
        raise CLIError(f"{ULTRALYTICS}:{name}: give a model yaml (yolov8n.yaml) or a weights file (.pt)")
    if path.suffix == ".pt" and not path.is_file():
        raise CLIError(f"{ULTRALYTICS}:{name}: no such file (structprune never downloads weights)")
    try:
        return (RTDETR if "rtdetr" in path.stem else YOLO)(name)
    except Exception as error:  # unknown yaml name, unreadable checkpoint
        raise CLIError(f"{ULTRALYTICS}:{name} could not be loaded: {type(error).__name__}: {error}") from None


def _prune_ultralytics(args: argparse.Namespace) -> int:
    """Prune an Ultralytics model with its head kept and save it where YOLO(path) reads it."""
    from .integrations import ultralytics as tpu

    name = args.model.split(":", 1)[1]
    torch.manual_seed(args.seed)  # yaml models are random init: the same seed, the same model
    yolo = _ultralytics_model(name)
    imgsz = args.input_shape[-1] if args.input_shape else ULTRALYTICS_IMGSZ
    model = yolo.model
    inputs = tpu.make_example_inputs(model, imgsz, seed=args.seed)
    torch.manual_seed(args.seed)
    criterion = make_importance(args.importance)
    if args.importance == "taylor":
        model.zero_grad()
        sum(t.float().sum() for t in tpu.head_outputs(model, inputs)).backward()
    _, summary = tpu.prune(yolo, args.ratio, criterion, example_inputs=inputs, round_to=args.round_to,
                           global_pruning=args.global_pruning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(name).stem}.pt"
    yolo.save(path)
    source = {"model": args.model, "imgsz": int(inputs.shape[-1]), "ratio": args.ratio,
              "importance": args.importance, "global": args.global_pruning, "round_to": args.round_to,
              "seed": args.seed}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    print(f"model: {args.model}   image: {summary.imgsz}x{summary.imgsz}   importance: {args.importance}"
          f"{'  (global)' if args.global_pruning else ''}")
    print(f"MACs:   {_change(summary.macs_before, summary.macs_after)}")
    print(f"params: {_change(summary.params_before, summary.params_after)}")
    print(f"saved to {path} ; load with YOLO({str(path)!r}); fine-tune with "
          f"yolo.train(..., trainer=tp.integrations.ultralytics.trainer(yolo))")
    return 0


# ---------------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``structprune`` argument parser with its three sub-commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Structural pruning for PyTorch.", epilog=MAIN_EPILOG,
                     formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser("demo", help="growing-regularization pruning of a small CNN on 8x8 digits",
                               description="Train a small CNN on scikit-learn's digits, grow a per-channel "
                               "penalty, prune, fine-tune; compare with one-shot magnitude pruning and write "
                               "a report folder.", epilog=DEMO_EPILOG, formatter_class=formatter)
    demo.add_argument("--ratio", type=parse_ratio, default=0.75, help="fraction of channels to remove (0.75)")
    demo.add_argument("--method", choices=("growing_reg", "greg1", "magnitude"), default="growing_reg",
                      help="growing_reg: update_reg once per epoch (default); greg1: the paper's GReg-1; "
                      "magnitude: one-shot")
    demo.add_argument("--epochs", type=_positive_int, default=10,
                      help="baseline and regularization epochs; fine-tuning gets half (10)")
    demo.add_argument("--seed", type=int, default=0, help="data split, init and batch order (0)")
    demo.add_argument("--out", default=None, help="report folder (runs/demo-<timestamp>)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch CPU threads for training and latency (1: fastest and reproducible here)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)

    inspect = commands.add_parser("inspect", help="list a model's prunable groups, MACs and params",
                                  description="Print the coupled-channel groups of a model, its MACs and "
                                  "params, and with --ratio what pruning would leave.",
                                  epilog=INSPECT_EPILOG, formatter_class=formatter)
    _add_model_arguments(inspect)
    inspect.add_argument("--ratio", type=parse_ratio, default=None,
                         help="also prune a copy by l2 magnitude and report MACs/params after")
    inspect.set_defaults(handler=cmd_inspect)

    prune = commands.add_parser("prune", help="prune a model and save it for tp.load_pruned",
                                description="Prune a model's channels and save it with tp.save_pruned.",
                                epilog=PRUNE_EPILOG, formatter_class=formatter)
    _add_model_arguments(prune)
    prune.add_argument("--ratio", type=parse_ratio, required=True, help="fraction of channels to remove")
    prune.add_argument("--importance", choices=IMPORTANCES, default="l2",
                       help="channel criterion: l1/l2 magnitude, taylor (one backward of a sum loss), random")
    prune.add_argument("--global", dest="global_pruning", action="store_true",
                       help="rank channels across layers instead of per layer")
    prune.add_argument("--round-to", type=_positive_int, default=None,
                       help="keep channel counts multiples of this (e.g. 8)")
    prune.add_argument("--out", required=True, help="output folder")
    prune.set_defaults(handler=cmd_prune)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="torchvision:NAME, timm:NAME, path/to/file.py:factory (prune: also ultralytics:NAME)")
    parser.add_argument("--input-shape", type=parse_shape, default=None,
                        help=f"example input shape, comma-separated ({DEFAULT_INPUT_SHAPE}; "
                        f"ultralytics: 1,3,{ULTRALYTICS_IMGSZ},{ULTRALYTICS_IMGSZ})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and example inputs (0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exit_request:  # --help
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except CLIError as error:
        _fail(str(error))
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as error:  # anything else still ends as one line, never a traceback
        _fail(f"{type(error).__name__}: {error}")
        return 1


def _fail(message: str) -> None:
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
