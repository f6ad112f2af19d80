"""Read the Conv3D weights of a weights-only Keras 2 HDF5 file into a PyTorch state dict.

The root attribute ``layer_names`` gives the order; each ``conv3d_N`` group holds ``kernel:0``
``(k1, k2, k3, Cin, Cout)`` and ``bias:0``. Layers without weights are skipped. The PyTorch weight
is ``kernel.transpose(4, 3, 0, 1, 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py  # type: ignore[import-untyped]
import numpy as np
import torch

from pipelines.liver.networks import build


class WeightsFileError(Exception):
    """The HDF5 file does not hold the weights the network expects."""


@dataclass(frozen=True)
class KerasConv:
    name: str
    kernel: np.ndarray
    bias: np.ndarray


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_convs(path: Path) -> tuple[list[KerasConv], dict[str, list[float]]]:
    """Conv3D layers in ``layer_names`` order, and the ``header`` group's datasets (e.g. voxel_size)."""
    convs: list[KerasConv] = []
    header: dict[str, list[float]] = {}
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsFileError(f"{path} is not a readable HDF5 file: {exc}") from exc
    with handle:
        root = handle.get("model_weights", handle)
        if "layer_names" not in root.attrs:
            raise WeightsFileError(f"{path} has no 'layer_names' attribute (not a Keras weights file)")
        for raw in root.attrs["layer_names"]:
            name = _text(raw)
            group = root[name]
            weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
            if not weight_names:
                continue
            if not name.startswith("conv3d"):
                raise WeightsFileError(f"{path}: unexpected layer with weights {name!r}")
            by_suffix = {w.rsplit("/", 1)[-1]: np.asarray(group[w]) for w in weight_names}
            if set(by_suffix) != {"kernel:0", "bias:0"}:
                raise WeightsFileError(f"{path}: layer {name} holds {sorted(by_suffix)}, not kernel and bias")
            convs.append(KerasConv(name, by_suffix["kernel:0"], by_suffix["bias:0"]))
        if "header" in handle:
            for key, dataset in handle["header"].items():
                header[key] = [float(v) for v in np.atleast_1d(np.asarray(dataset))]
    return convs, header


def state_dict_from_keras(kind: str, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """The PyTorch state dict of network ``kind`` from a Keras HDF5 file, checked shape by shape."""
    model = build(kind)
    convs, header = read_convs(path)
    expected = model.conv_shapes()
    if len(convs) != len(expected):
        raise WeightsFileError(
            f"{path} holds {len(convs)} convolutions; the {kind} network has {len(expected)}"
        )
    state: dict[str, torch.Tensor] = {}
    for index, (conv, shape) in enumerate(zip(convs, expected, strict=True)):
        if tuple(conv.kernel.shape) != shape or conv.bias.shape != (shape[-1],):
            raise WeightsFileError(
                f"{path}: layer {conv.name} has kernel {tuple(conv.kernel.shape)} and bias "
                f"{tuple(conv.bias.shape)}; the {kind} network expects {shape} at position {index}"
            )
        kernel = np.ascontiguousarray(conv.kernel.transpose(4, 3, 0, 1, 2), dtype=np.float32)
        state[f"convs.{index}.weight"] = torch.from_numpy(kernel)
        state[f"convs.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv.bias, dtype=np.float32))
    model.load_state_dict(state, strict=True)
    return state, header
