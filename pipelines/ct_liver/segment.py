"""Liver, then lesions inside it, on a RAS-canonical volume: the code path shared by the pipeline
(DICOM) and the accuracy tests (NIfTI)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipelines.ct_liver import processing
from pipelines.ct_liver.models import LiverNetworks
from pipelines.ct_liver.processing import BoolArray, PatchPredictor


@dataclass
class Segmentation:
    liver: BoolArray  # RAS canonical, the input's shape
    lesions: BoolArray | None  # restricted to the liver; None when the lesion net was not run
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lesion_blocks_run: int = 0
    lesion_blocks_skipped: int = 0


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now


def segment_liver(
    image: npt.NDArray[np.generic],
    voxel: Sequence[float],
    modality: str,
    liver_net: PatchPredictor,
    timings: dict[str, float] | None = None,
) -> tuple[BoolArray, list[str]]:
    clock = _Clock(timings if timings is not None else {})
    liver_input = processing.preprocess_liver(image, voxel, modality)
    clock.lap("liver_preprocess")
    probability = processing.predict_liver(liver_input.network_input, liver_net)
    clock.lap("liver_net")
    liver = processing.postprocess_liver(probability, liver_input)
    clock.lap("liver_postprocess")
    return liver, list(liver_input.notes)


def segment_lesions(
    image: npt.NDArray[np.generic],
    voxel: Sequence[float],
    modality: str,
    liver: BoolArray,
    lesion_net: PatchPredictor,
    timings: dict[str, float] | None = None,
) -> tuple[BoolArray, int, int]:
    """Lesions restricted to ``liver``; also the number of 92 x 84 x 42 blocks run and skipped."""
    clock = _Clock(timings if timings is not None else {})
    lesion_input = processing.preprocess_lesions(image, voxel, modality, liver)
    clock.lap("lesion_preprocess")
    probability, run, skipped = processing.predict_lesions(lesion_input, lesion_net)
    clock.lap("lesion_net")
    lesions = processing.postprocess_lesions(probability, lesion_input) & liver
    clock.lap("lesion_postprocess")
    return lesions, run, skipped


def segment(
    image: npt.NDArray[np.generic],
    voxel: Sequence[float],
    modality: str,
    networks: LiverNetworks,
    lesions: bool = True,
) -> Segmentation:
    """The liver (largest component) and, with ``lesions``, the lesions inside it. Each network's
    runtime exists only during its own stage."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with networks.open("liver") as liver_net:
        timings["liver_open"] = round(time.perf_counter() - started, 3)
        liver, notes = segment_liver(image, voxel, modality, liver_net, timings)
    result = Segmentation(liver=liver, lesions=None, timings=timings, notes=notes)
    if lesions and liver.any():
        started = time.perf_counter()
        with networks.open("lesion") as lesion_net:
            timings["lesion_open"] = round(time.perf_counter() - started, 3)
            found, run, skipped = segment_lesions(image, voxel, modality, liver, lesion_net, timings)
        result.lesions = found
        result.lesion_blocks_run, result.lesion_blocks_skipped = run, skipped
    return result
