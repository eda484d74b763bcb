"""Grad-CAM heat maps of a CNN's predictions, and the ``bract explain`` command.

Grad-CAM (Selvaraju et al., ICCV 2017) explains one class score ``y_c`` of one
image through a convolutional layer's feature maps ``A_k``:

* ``alpha_k = mean_{i,j} dy_c / dA_k[i, j]`` (the spatially averaged gradient);
* ``L = ReLU(sum_k alpha_k A_k)``, upsampled (bilinear) to the input size and
  normalised to ``[0, 1]`` per image (all zeros when no location raises ``y_c``).

Guarantee of :func:`grad_cam`: it is a pure read of the model. It runs the model
in eval mode and restores the caller's train/eval mode, takes gradients with
``torch.autograd.grad`` with respect to the layer's activations only (no
``.grad`` of any parameter is written, no optimizer step, no weight changes),
and removes its forward hook before returning, also when it raises.

What a heat map can and cannot say (docs/explain.md): it shows where, at the
chosen layer's resolution, the evidence for a class score lies in this model;
it is not a segmentation, not a causal proof, and says nothing about whether
the prediction is right. No flwr import.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

from bract.argtypes import positive_int

__all__ = [
    "GradCAM",
    "add_explain_parser",
    "class_label",
    "default_layer",
    "draw_grid",
    "draw_overlay",
    "explain_run",
    "find_last_conv",
    "grad_cam",
    "load_model_weights",
    "task_from_report",
]


@dataclass(frozen=True)
class GradCAM:
    """Grad-CAM of a batch: ``heatmaps`` ``[B, H, W]`` float32 in ``[0, 1]`` at the
    input's resolution, the ``classes`` explained, the model's ``predicted``
    classes and softmax ``probabilities`` ``[B, K]``, and the ``layer`` used."""

    heatmaps: np.ndarray
    classes: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    layer: str


def find_last_conv(model: nn.Module) -> str:
    """The name (as in ``model.named_modules()``) of the model's last ``Conv2d``.

    Raises ValueError when the model has none: Grad-CAM needs a convolutional
    feature map (a tabular MLP has no spatial layer to explain).
    """
    name = None
    for n, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            name = n
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no Conv2d layer: Grad-CAM explains a CNN's image "
            "predictions through a convolutional feature map"
        )
    return name


#: Layers that keep a feature map's spatial layout and belong to a conv "stage":
#: the default Grad-CAM layer moves past them to the stage's rectified output.
_STAGE_LAYERS = (
    nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU,
    nn.GELU, nn.SiLU,
)


def default_layer(model: nn.Module) -> str:
    """The layer Grad-CAM uses by default: the last ``Conv2d``'s rectified feature maps.

    That is the last ``Conv2d`` (:func:`find_last_conv`), moved past the
    normalisation and activation modules that directly follow it in the same
    ``nn.Sequential`` (ChestCNN: conv ``features.4`` -> GroupNorm -> ReLU
    ``features.6``). This matches the paper, whose "last convolutional layer" in
    Caffe's VGG is rectified in place. A conv outside a Sequential is used as is.
    """
    name = find_last_conv(model)
    parent_name, _, child = name.rpartition(".")
    parent = dict(model.named_modules())[parent_name]
    if not isinstance(parent, nn.Sequential):
        return name
    keys = list(parent._modules)
    chosen = child
    for key in keys[keys.index(child) + 1 :]:
        if not isinstance(parent._modules[key], _STAGE_LAYERS):
            break
        chosen = key
    return f"{parent_name}.{chosen}" if parent_name else chosen


def _target_classes(
    target: int | Sequence[int] | None, predicted: torch.Tensor, num_classes: int
) -> torch.Tensor:
    if target is None:
        return predicted
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        classes = torch.full_like(predicted, int(target))
    else:
        classes = torch.as_tensor([int(t) for t in target], dtype=torch.long,
                                  device=predicted.device)
        if classes.shape != predicted.shape:
            raise ValueError(
                f"{len(classes)} target classes for {len(predicted)} images; give one per "
                "image, a single class, or None for the predicted class"
            )
    bad = [int(c) for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: the model has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return classes


def grad_cam(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    target: int | Sequence[int] | None = None,
    layer: str | None = None,
) -> GradCAM:
    """Grad-CAM heat maps of ``images`` ``[B, C, H, W]`` for ``model``'s class scores.

    ``target``: ``None`` explains each image's predicted class; an int explains
    that class for every image; a sequence gives one class per image. ``layer``
    names a module whose output is a ``[B, K, h, w]`` feature map (default: the
    last ``Conv2d``'s rectified output, :func:`default_layer`). The class score is the logit
    (pre-softmax), as in the paper.

    A pure read of the model (module docstring): weights, gradients, hooks and
    train/eval mode are as they were when it returns or raises.
    """
    x = torch.as_tensor(images)
    if x.dim() != 4:
        raise ValueError(
            f"images must be a batch [B, C, H, W], got shape {tuple(x.shape)}; add a batch "
            "dimension for a single image"
        )
    layer = layer if layer is not None else default_layer(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"the model has no layer named {layer!r}; its Conv2d layers: {convs}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["a"] = output

    was_training = model.training
    handle = modules[layer].register_forward_hook(keep_output)
    try:
        model.eval()
        with torch.enable_grad():
            # Gradients flow through the input's copy, so the activations need grad even
            # when the parameters are frozen; parameters' .grad is never written.
            xin = x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
            logits = model(xin)
            act = captured.get("a")
            if not isinstance(act, torch.Tensor) or act.dim() != 4:
                shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
                raise ValueError(
                    f"layer {layer!r} outputs {shape}, not a feature map [B, K, h, w]; name a "
                    "convolutional layer (or the activation after one)"
                )
            if logits.dim() != 2:
                raise ValueError(
                    f"the model outputs shape {tuple(logits.shape)}; Grad-CAM needs class "
                    "scores [B, num_classes]"
                )
            probabilities = torch.softmax(logits.detach(), dim=1)
            predicted = probabilities.argmax(dim=1)
            classes = _target_classes(target, predicted, logits.shape[1])
            score = logits.gather(1, classes[:, None]).sum()
            (grads,) = torch.autograd.grad(score, act)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(xin.shape[-2:]), mode="bilinear",
                            align_corners=False)[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    finally:
        handle.remove()
        model.train(was_training)
    return GradCAM(
        heatmaps=cam.detach().cpu().float().numpy(),
        classes=classes.cpu().numpy(),
        predicted=predicted.cpu().numpy(),
        probabilities=probabilities.cpu().float().numpy(),
        layer=layer,
    )


# --------------------------------------------------------------------- drawing
def _grey(image: np.ndarray) -> np.ndarray:
    """An image ``[C, H, W]`` or ``[H, W]`` as grey levels in [0, 1] (channel mean)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=0)
    if img.ndim != 2:
        raise ValueError(f"expected an image [C, H, W] or [H, W], got shape {img.shape}")
    low, high = float(img.min()), float(img.max())
    return (img - low) / (high - low) if high > low else np.zeros_like(img)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def draw_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    title: str,
    path: Path,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> Path:
    """Write a PNG: the input in grey (left) and the heat map over it (right, with
    a colour bar from 0 = no evidence to 1 = strongest evidence); returns ``path``."""
    grey = _grey(image)
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.shape != grey.shape:
        raise ValueError(f"heat map shape {heat.shape} does not match image shape {grey.shape}")
    fig = _figure(8.0, 3.9)
    left, right = fig.subplots(1, 2)
    left.imshow(grey, cmap="gray", vmin=0, vmax=1)
    left.set_title("input", fontsize=9)
    right.imshow(grey, cmap="gray", vmin=0, vmax=1)
    shown = right.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    right.set_title("Grad-CAM", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="relative evidence")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def draw_grid(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> Path:
    """Write a contact sheet of overlays (about square, row by row); returns ``path``."""
    n = len(images)
    if n == 0 or not n == len(heatmaps) == len(titles):
        raise ValueError(f"need as many images, heat maps and titles (>= 1), got "
                         f"{len(images)}, {len(heatmaps)}, {len(titles)}")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = _figure(2.6 * cols, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, img, heat, title in zip(axes, images, heatmaps, titles, strict=False):
        grey = _grey(img)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.asarray(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------- tasks from a report
def task_from_report(report: Mapping[str, Any]) -> Any:
    """The :class:`bract.tasks.TaskConfig` a report's ``config`` describes.

    Takes only the fields TaskConfig has (under their Python name, or the run
    config's hyphenated name for reports of ``flwr run``), so reports keep working
    as fields are added; missing fields take TaskConfig's defaults. Raises
    ValueError naming the problem when the config does not make a valid task.
    """
    from bract.tasks import TaskConfig

    config = report.get("config") if isinstance(report, Mapping) else None
    if not isinstance(config, Mapping):
        raise ValueError("the report has no 'config' object; pass a bract report.json")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TaskConfig):
        for key in (f.name, f.name.replace("_", "-")):
            if key in config:
                values[f.name] = config[key]
                break
    if "dataset" not in values:
        raise ValueError("the report's config names no dataset; pass a bract report.json")
    try:
        return TaskConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the report's config does not describe a task bract can "
                         f"rebuild: {exc}") from None


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load an ``.npz`` of state_dict arrays (``--save-model``) into ``model``.

    Raises ValueError with one line naming the file when it is missing or unreadable
    (whatever its bytes), or when its names or shapes do not fit the model (e.g. saved
    at another image size).
    """
    from bract.privacy.training import load_weights

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist; write one with "
                         "bract simulate --save-model PATH.npz")
    from bract.flower.files import read_npz

    try:
        weights = read_npz(path)
    except ValueError as exc:
        raise ValueError(f"--model: {exc}; pass the .npz written by "
                         "bract simulate --save-model") from None
    try:
        load_weights(model, weights)
    except ValueError as exc:
        raise ValueError(
            f"the weights in {path} do not fit the model the report describes "
            f"({type(model).__name__}): {exc}. Use the model saved by the same run as the "
            "report (same dataset and image size)."
        ) from None


def class_label(class_names: Sequence[str], index: int) -> str:
    """A class's name, or ``"class N"`` when the dataset has no names."""
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


# ------------------------------------------------------------ bract explain
def _class_choice(text: str) -> str | int:
    if text in ("predicted", "true"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'predicted', 'true' or a class number, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a class number is >= 0, got {value}")
    return value


def add_explain_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``bract explain`` to the ``bract`` subparsers ``sub``."""
    p = sub.add_parser(
        "explain",
        help="Grad-CAM heat maps of the global CNN's predictions on test images",
        description=(
            "Rebuild the task from a run's report.json, load the saved global weights "
            "(--save-model) and write a Grad-CAM overlay per chosen central-test image "
            "(gradcam_<index>.png) and a contact sheet (gradcam_grid.png)."
        ),
    )
    p.add_argument("--report", type=Path, required=True, help="the run's report.json")
    p.add_argument("--model", type=Path, default=None,
                   help="the run's saved weights (.npz; default: the report's final model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                       help="central-test-set indices to explain")
    which.add_argument("--count", type=positive_int, default=8,
                       help="explain the first N test images (default 8)")
    p.add_argument("--class", dest="target", type=_class_choice, default="predicted",
                   help="class to explain: predicted (default), true, or a class number")
    p.add_argument("--layer", default=None,
                   help="module name of the feature map (default: the last Conv2d's "
                        "rectified output, e.g. features.6 of ChestCNN)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: gradcam/ next to the report)")
    p.set_defaults(func=_explain_command)
    return p


def _explain_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        paths = explain_run(args, console)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except OSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(f"wrote {len(paths) - 1} overlays and the contact sheet {paths[-1]}")
    return 0


def explain_run(args: argparse.Namespace, console: Any) -> list[Path]:
    """Run ``bract explain`` for parsed ``args``; returns the overlays' paths, then
    the contact sheet's. ValueError (naming the problem) for bad input."""
    from rich.progress import Progress
    from rich.table import Table

    from bract import tasks
    from bract.plots import load_report

    report = load_report(args.report)
    task = task_from_report(report)
    ds = tasks.dataset_for(task)
    if len(ds.input_shape) != 3 or ds.task != "classification":
        raise ValueError(
            f"dataset {task.dataset} is tabular ({ds.task}): Grad-CAM explains a CNN's "
            "predictions on images, and this run's model is not one"
        )
    model_path = args.model
    if model_path is None:
        from bract.records.report import RunReport

        final = RunReport.from_plain(report, str(args.report)).final
        if final is not None and not final.model_trained:
            raise ValueError("no round of this run averaged an update: its model was never "
                             "trained, so there is nothing to explain")
        saved = final.model if final is not None else None
        if not saved:
            raise ValueError("the report names no saved model; pass --model PATH.npz "
                             "(written by bract simulate --save-model)")
        model_path = Path(saved)
        beside = (args.report if args.report.is_dir() else args.report.parent) / model_path.name
        if not model_path.is_absolute() and not model_path.is_file() and beside.is_file():
            model_path = beside  # a relative path from another working directory
    model = tasks.build_model(task)
    load_model_weights(model, model_path)
    n_test = len(ds.x_test)
    indices = list(args.indices) if args.indices is not None else list(
        range(min(args.count, n_test))
    )
    bad = [i for i in indices if not 0 <= i < n_test]
    if bad:
        raise ValueError(f"test index {bad[0]} is out of range: the central test set has "
                         f"{n_test} images (0..{n_test - 1})")
    if isinstance(args.target, int) and args.target >= ds.num_classes:
        raise ValueError(f"--class {args.target} is out of range: the model has "
                         f"{ds.num_classes} classes (0..{ds.num_classes - 1})")
    source = args.report / "report.json" if args.report.is_dir() else args.report
    out = args.out if args.out is not None else source.parent / "gradcam"
    names = tuple(getattr(ds, "class_names", ()) or ())
    images, heats, titles, paths = [], [], [], []
    summary: list[tuple[str, ...]] = []
    layer_used = args.layer
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("Grad-CAM", total=len(indices))
        for start in range(0, len(indices), 32):
            chunk = indices[start : start + 32]
            x = torch.from_numpy(ds.x_test[chunk])
            truth = [int(ds.y_test[i]) for i in chunk]
            target = (truth if args.target == "true" else
                      None if args.target == "predicted" else int(args.target))
            cam = grad_cam(model, x, target=target, layer=args.layer)
            for j, idx in enumerate(chunk):
                pred = int(cam.predicted[j])
                cls = int(cam.classes[j])
                title = (f"test #{idx}: true {class_label(names, truth[j])}, predicted "
                         f"{class_label(names, pred)} (p={cam.probabilities[j, pred]:.2f})")
                if cls != pred:
                    title += f"\nexplaining class {class_label(names, cls)}"
                paths.append(draw_overlay(ds.x_test[idx], cam.heatmaps[j], title,
                                          out / f"gradcam_{idx}.png"))
                images.append(ds.x_test[idx])
                heats.append(cam.heatmaps[j])
                titles.append(f"#{idx} true {class_label(names, truth[j])}\n"
                              f"pred {class_label(names, pred)} p={cam.probabilities[j, pred]:.2f}")
                summary.append((str(idx), class_label(names, truth[j]), class_label(names, pred),
                                f"{cam.probabilities[j, pred]:.2f}", class_label(names, cls)))
                layer_used = cam.layer
                progress.advance(bar)
    paths.append(draw_grid(images, heats, titles, out / "gradcam_grid.png"))
    table = Table(title=f"Grad-CAM at layer {layer_used}", show_edge=False)
    for column in ("test #", "true", "predicted", "p", "explained"):
        table.add_column(column, justify="right" if column in ("test #", "p") else "left")
    for row in summary:
        table.add_row(*row)
    console.print(table)
    return paths
