"""The two networks of the ct-liver pipeline, from their installed bundles, on a chosen backend.

``open_networks`` verifies every sha256 of both bundles and that the manifests describe what this
pipeline's pre- and post-processing implement (spacing, patch geometry, normalisation methods,
threshold); otherwise the pipeline refuses with ``model_missing`` / ``model_invalid`` /
``model_incompatible``. Each network's runtime is then created only while it is used
(``with networks.open("liver") as net: ...``): on CPU the liver net's full patch needs about 6 GB and a
lesion block about 3.5 GB, and holding both sessions at once would add them up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipelines.base import PipelineError
from pipelines.bundles import Bundle, BundleError, load_bundle
from pipelines.ct_liver.processing import (
    LESION_PATCH,
    LESION_SPACING,
    LIVER_PATCH,
    LIVER_SPACING,
    FloatArray,
    PatchGeometry,
)
from pipelines.inference.backend import Backend
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.factory import create_backend
from pipelines.inference.geometry import OutputGeometry
from pipelines.liver import INSTALL_TARGET, LESION_BUNDLE, LIVER_BUNDLE

BackendName = Literal["onnxruntime", "torch"]
BACKENDS: tuple[BackendName, ...] = ("onnxruntime", "torch")
NORMALISATIONS = {
    LIVER_BUNDLE: {"CT": "ct_clip", "MR": "mr_minmax_80"},
    LESION_BUNDLE: {"CT": "ct_clip_liver_masked", "MR": "mr_liver_median"},
}


NetworkKind = Literal["liver", "lesion"]


class Network:
    """One opened network: call it with an input patch ``(X, Y, Z)`` for its probability block.

    A ``kept`` network (``LiverNetworks.keep_loaded``) stays open when its ``with`` block ends; its
    ``LiverNetworks`` closes it."""

    def __init__(self, backend: Backend) -> None:
        self._backend: Backend | None = backend
        self.name = backend.name
        self.kept = False

    def __call__(self, patch: FloatArray) -> FloatArray:
        if self._backend is None:
            raise RuntimeError(f"network {self.name} is closed")
        batch = np.ascontiguousarray(patch[np.newaxis, np.newaxis], dtype=np.float32)
        # copied: a backend may hand out a buffer it reuses on the next call
        out: FloatArray = np.array(self._backend.predict(batch)[0, 0], dtype=np.float32, copy=True)
        return out

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None  # the last reference: the runtime and its memory go

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self.kept:
            self.close()


@dataclass
class LiverNetworks:
    """Both verified bundles; ``open`` creates a network's runtime. With ``keep_loaded`` (the default on
    a GPU) each runtime is created once and kept until ``close``; on the CPU each is created for its
    step and released after it (about 6 + 3.5 GB of onnxruntime arenas would otherwise stay resident)."""

    liver_bundle: Bundle
    lesion_bundle: Bundle
    backend_kind: BackendName
    device: str
    threads: int | None
    keep_loaded: bool = False
    _kept: dict[str, Network] = field(default_factory=dict)

    def close(self) -> None:
        for network in self._kept.values():
            network.close()
        self._kept.clear()

    @property
    def backend(self) -> str:
        """e.g. onnxruntime-cpu, torch-cuda."""
        return f"{self.backend_kind}-{self.device.split(':')[0]}"

    def open(self, kind: NetworkKind) -> Network:
        kept = self._kept.get(kind)
        if kept is not None:
            return kept
        network = self._create(kind)
        if self.keep_loaded:
            network.kept = True
            self._kept[kind] = network
        return network

    def _create(self, kind: NetworkKind) -> Network:
        bundle, geometry = (
            (self.liver_bundle, LIVER_PATCH) if kind == "liver" else (self.lesion_bundle, LESION_PATCH)
        )
        name, device = self.backend_kind, self.device
        try:
            path = bundle.backend_file(name)
            if name == "onnxruntime":
                providers: list[str] | Literal["auto"] = (
                    ["CPUExecutionProvider"] if device == "cpu" else "auto"
                )
                backend = create_backend(
                    name,
                    onnx_path=path,
                    device=device,
                    providers=providers,
                    intra_op_threads=self.threads,
                    geometry=_geometry(geometry),
                )
            else:
                if self.threads:
                    torch.set_num_threads(self.threads)
                backend = create_backend(
                    name, module=_module(bundle), device=device, geometry=_geometry(geometry)
                )
        except BundleError as exc:
            raise PipelineError("model_incompatible", exc.message) from None
        except (BackendUnavailable, InferenceError) as exc:
            raise PipelineError("backend_unavailable", f"{name} on {device}: {exc}") from None
        return Network(backend)


def default_backend(device: str) -> BackendName:
    """onnxruntime on CPU, torch on a GPU."""
    return "onnxruntime" if device == "cpu" else "torch"


def _load(models_dir: Path, name: str) -> Bundle:
    try:
        return load_bundle(models_dir, name)
    except BundleError as exc:
        if exc.reason == "bundle_missing":
            raise PipelineError(
                "model_missing", f"{exc.message}; install it with 'segnode models install {INSTALL_TARGET}'"
            ) from None
        raise PipelineError(
            "model_invalid", f"{exc.message}; reinstall with 'segnode models install {INSTALL_TARGET}'"
        ) from None


def check_compatible(bundle: Bundle, spacing: tuple[float, float, float], geometry: PatchGeometry) -> None:
    m = bundle.manifest
    problems = []
    if tuple(m.input.spacing_mm) != spacing:
        problems.append(f"input.spacing_mm {m.input.spacing_mm} (pipeline: {spacing})")
    if m.input.orientation != "RAS":
        problems.append(f"input.orientation {m.input.orientation} (pipeline: RAS)")
    if tuple(m.input.patch_size) != geometry.input_patch:
        problems.append(f"input.patch_size {m.input.patch_size} (pipeline: {geometry.input_patch})")
    if tuple(m.output.patch_size) != geometry.output_patch or tuple(m.output.offset) != geometry.offset:
        problems.append(f"output patch/offset {m.output.patch_size}/{m.output.offset}")
    if m.output.activation != "sigmoid" or m.output.threshold != 0.5:
        problems.append(
            f"output {m.output.activation} threshold {m.output.threshold} (pipeline: sigmoid 0.5)"
        )
    methods = {k: v.method for k, v in m.input.normalisation.items()}
    if methods != NORMALISATIONS[bundle.name]:
        problems.append(f"input.normalisation {methods} (pipeline: {NORMALISATIONS[bundle.name]})")
    if problems:
        raise PipelineError(
            "model_incompatible",
            f"bundle {bundle.name} {bundle.version} does not match the ct-liver pipeline: "
            + "; ".join(problems),
        )


def _geometry(geometry: PatchGeometry) -> OutputGeometry:
    after = tuple(
        i - o - f
        for i, o, f in zip(geometry.input_patch, geometry.output_patch, geometry.offset, strict=True)
    )
    return OutputGeometry(crop_before=geometry.offset, crop_after=after)


def _module(bundle: Bundle) -> torch.nn.Module:
    entry = bundle.manifest.backend("torch")
    assert entry is not None and entry.module is not None  # validated by the manifest
    module_name, _, attr = entry.module.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    module: torch.nn.Module = cls()
    state = torch.load(bundle.backend_file("torch"), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def open_networks(
    models_dir: Path, backend: BackendName | None = None, device: str = "cpu", threads: int | None = None
) -> LiverNetworks:
    """Both networks from ``models_dir`` on ``backend`` (default: onnxruntime on CPU, torch on GPU)."""
    name = backend or default_backend(device)
    if name not in BACKENDS:
        raise PipelineError(
            "invalid_parameter", f"backend must be one of {', '.join(BACKENDS)}, not {name!r}"
        )
    liver_bundle = _load(models_dir, LIVER_BUNDLE)
    lesion_bundle = _load(models_dir, LESION_BUNDLE)
    check_compatible(liver_bundle, LIVER_SPACING, LIVER_PATCH)
    check_compatible(lesion_bundle, LESION_SPACING, LESION_PATCH)
    for bundle in (liver_bundle, lesion_bundle):
        try:
            bundle.backend_file(name)
        except BundleError as exc:
            raise PipelineError("model_incompatible", exc.message) from None
    return LiverNetworks(liver_bundle, lesion_bundle, name, device, threads, keep_loaded=device != "cpu")
