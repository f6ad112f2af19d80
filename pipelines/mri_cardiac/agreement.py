"""Agreement of the mri-cardiac model with the Sunnybrook manual contours.

Runs the pipeline's own segmentation path (``load_cine`` -> ``segment_phases``: resampling,
normalisation, network, largest components) on the time points that carry contours, and reports per
contoured image the Dice of the LV cavity (endocardial contour) and of the LV myocardium (between
endo- and epicardial contours, where both were drawn), plus the LV cavity and myocardium volumes over
the contoured slices from both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.mri_cardiac import sunnybrook
from pipelines.mri_cardiac.function import voxel_volume_ml
from pipelines.mri_cardiac.labels import Structure
from pipelines.mri_cardiac.model import BackendName, open_model
from pipelines.mri_cardiac.pipeline import load_cine, segment_phases


@dataclass
class CaseAgreement:
    case: str
    model: str
    agreement: sunnybrook.Agreement
    # per contoured time point: (reference, model) ml over the contoured slices
    lv_ml: dict[int, tuple[float, float]] = field(default_factory=dict)
    myo_ml: dict[int, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        return {
            "case": self.case,
            "model": self.model,
            "images": len(self.agreement.images),
            "lv_dice_mean": round(self.agreement.lv_dice, 4),
            "myo_dice_mean": round(self.agreement.myo_dice, 4),
            "lv_ml_reference_vs_model": {
                t + 1: (round(a, 1), round(b, 1)) for t, (a, b) in self.lv_ml.items()
            },
            "myo_ml_reference_vs_model": {
                t + 1: (round(a, 1), round(b, 1)) for t, (a, b) in self.myo_ml.items()
            },
            "seconds": round(self.seconds, 1),
        }


def sunnybrook_agreement(
    case_dir: Path,
    models_dir: Path,
    *,
    backend: BackendName | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> CaseAgreement:
    started = time.perf_counter()
    volume = load_cine(sorted((case_dir / "dicom").glob("*.dcm")), min_phases=2, min_slices=3)
    images = sunnybrook.read_case(case_dir)
    where = sunnybrook.locate(volume, images)
    times = sorted({t for t, _ in where.values()})
    with open_model(models_dir, backend, device, threads) as model:
        labels = segment_phases(model, volume, times)
        values = model.spec.values
        name = f"{model.bundle.name} {model.bundle.version}"
    stack = np.zeros(volume.voxels.shape, dtype=np.uint8)
    for t, phase in labels.items():
        stack[t] = phase
    lv, myo = values[Structure.LV], values[Structure.MYO]
    result = sunnybrook.agreement(volume, stack, images, lv_value=lv, myo_value=myo)
    voxel_ml = voxel_volume_ml(volume.spacing)
    shape = (int(volume.voxels.shape[-2]), int(volume.voxels.shape[-1]))
    out = CaseAgreement(case=case_dir.name, model=name, agreement=result)
    for t in times:
        contoured = [i for i in images if where[i.image_number][0] == t]
        ref_lv = model_lv = ref_myo = model_myo = 0.0
        with_epi = all(i.outer is not None for i in contoured)
        for image in contoured:
            k = where[image.image_number][1]
            cavity, myocardium = sunnybrook.reference_labels(image, shape)
            ref_lv += float(cavity.sum()) * voxel_ml
            model_lv += float((stack[t, k] == lv).sum()) * voxel_ml
            if myocardium is not None:
                ref_myo += float(myocardium.sum()) * voxel_ml
                model_myo += float((stack[t, k] == myo).sum()) * voxel_ml
        out.lv_ml[t] = (ref_lv, model_lv)
        if with_epi:
            out.myo_ml[t] = (ref_myo, model_myo)
    out.seconds = time.perf_counter() - started
    return out
