"""Tiny synthetic datasets on disk in the layouts Ultralytics reads (nothing is downloaded).

Each image is a noisy background with one or two filled rectangles; the label files describe them as
boxes (detect), polygons (segment), boxes plus keypoints (pose) or rotated boxes (obb). Classification
uses one folder per class (the class is the rectangle's colour).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

def offline_ultralytics(config_dir: str) -> None:
    """Make Ultralytics work without a network; call before importing it.

    ``YOLO_OFFLINE`` makes its is_online() answer False without a DNS lookup, the requirements check
    never pip-installs (export), settings live in ``config_dir``, and the Arial.ttf every dataset check
    asks for (and downloads when missing) is matplotlib's DejaVuSans.
    """
    import matplotlib

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    target = Path(config_dir) / "Ultralytics"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(font, target / "Arial.ttf")


COLOURS = ((230, 40, 40), (40, 40, 230))  # class 0 red, class 1 blue
NAMES = {0: "red", 1: "blue"}


def _image(rng: np.random.Generator, size: int, count: int):
    from PIL import Image

    pixels = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
    boxes = []
    for _ in range(count):
        cls = int(rng.integers(0, 2))
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        pixels[y0:y0 + h, x0:x0 + w] = COLOURS[cls]
        boxes.append((cls, x0 / size, y0 / size, (x0 + w) / size, (y0 + h) / size))
    return Image.fromarray(pixels), boxes


def _label(task: str, box: tuple, kpts: int) -> str:
    cls, x0, y0, x1, y1 = box
    xc, yc, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if task == "segment":
        return f"{cls} {x0:.4f} {y0:.4f} {x1:.4f} {y0:.4f} {x1:.4f} {y1:.4f} {x0:.4f} {y1:.4f}"
    if task == "obb":
        return f"{cls} {x0:.4f} {y0:.4f} {x1:.4f} {y0:.4f} {x1:.4f} {y1:.4f} {x0:.4f} {y1:.4f}"
    line = f"{cls} {xc:.4f} {yc:.4f} {w:.4f} {h:.4f}"
    if task == "pose":
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        points = [corners[i % 4] for i in range(kpts)]
        line += "".join(f" {x:.4f} {y:.4f} 2" for x, y in points)
    return line


def make_dataset(root: Path, task: str = "detect", images: int = 4, size: int = 64, kpts: int = 17,
                 seed: int = 0) -> Path:
    """Write ``images`` train and ``images`` val images; returns the data yaml (or folder for classify)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if task == "classify":
        for split in ("train", "val"):
            for index in range(images):
                image, boxes = _image(rng, size, 1)
                folder = root / split / NAMES[boxes[0][0]]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{index}.png")
            for name in NAMES.values():  # every class present in every split
                folder = root / split / name
                if not folder.exists() or not any(folder.iterdir()):
                    folder.mkdir(parents=True, exist_ok=True)
                    image, _ = _image(rng, size, 1)
                    image.save(folder / "extra.png")
        return root
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(images):
            image, boxes = _image(rng, size, 1 + index % 2)
            image.save(root / "images" / split / f"{index}.png")
            lines = [_label(task, box, kpts) for box in boxes]
            (root / "labels" / split / f"{index}.txt").write_text("\n".join(lines) + "\n")
    yaml = [f"path: {root}", "train: images/train", "val: images/val", "names:"]
    yaml += [f"  {index}: {name}" for index, name in NAMES.items()]
    if task == "pose":
        yaml.append(f"kpt_shape: [{kpts}, 3]")
        yaml.append(f"flip_idx: [{', '.join(str(i) for i in range(kpts))}]")
    path = root / "data.yaml"
    path.write_text("\n".join(yaml) + "\n")
    return path


def model_yaml(folder: Path, base: str = "yolov8n.yaml", nc: int = 2) -> Path:
    """Ultralytics' own model yaml ``base`` with ``nc`` classes, written under ``folder`` with the same name
    (the name carries the scale, e.g. the ``n`` of yolov8n)."""
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import YAML

    config = yaml_model_load(base)
    config["nc"] = nc
    config.pop("yaml_file", None)
    path = Path(folder) / base
    path.parent.mkdir(parents=True, exist_ok=True)
    YAML.save(path, config)
    return path
