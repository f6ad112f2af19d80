"""mri-cardiac: cine short-axis MRI -> 3D+t volume -> RV / LV myocardium / LV cavity per phase ->
ED (largest LV cavity) and ES (smallest) -> one DICOM-SEG per phase (segments RV, LV myocardium, LV
cavity, coded as the model's manifest codes them) and one TID 1500 SR with LV and RV end-diastolic and
end-systolic volumes, stroke volumes, ejection fractions and the LV myocardial mass.

Input: the files of one cine series holding every phase, or (``request.series_files`` gathered by a
study-level rule) several series of one study, e.g. one per slice location; they must form one stack.

Parameters (``PipelineRequest.parameters``):

- ``phases``: ``all`` (default: every phase is segmented, ED/ES picked from the LV cavity volumes) or
  ``ed_es`` (the middle third of the slices is segmented at every phase to pick ED and ES, then only
  those two phases in full);
- ``ed_phase`` / ``es_phase``: 0-based time points that override the choice;
- ``backend`` (``onnxruntime`` default on CPU, ``torch`` where the bundle has it), ``threads``,
  ``overlap`` (sliding window, default 0.5), ``tta`` (in-plane flips, default false);
- ``min_phases`` (default 5), ``min_slices`` (default 3).

Refusals (``PipelineError.reason``): ``unsupported_modality`` (not MR), ``not_cine`` (one time point),
``too_few_phases``, ``too_few_slices``, ``model_missing``, ``model_invalid``, ``model_incompatible``,
``backend_unavailable``, ``invalid_parameter``, ``no_left_ventricle``, ``no_contraction``,
``source_uid_missing``, and whatever ``pipelines.volume`` and ``pipelines.outputs`` raise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from pipelines.base import PipelineError, PipelineOutput, PipelineRequest
from pipelines.bundles.warm import WarmCache, bundle_key
from pipelines.mri_cardiac.function import (
    CardiacFunction,
    cardiac_function,
    clean_labels,
    phase_volumes,
    voxel_volume_ml,
)
from pipelines.mri_cardiac.labels import SEGMENT_ORDER, Structure
from pipelines.mri_cardiac.model import BACKENDS, BUNDLE_NAME, BackendName, CardiacModel, open_model
from pipelines.mri_cardiac.report import PhaseSeg, write_function_report
from pipelines.outputs import Algorithm, OutputIdentity, SegmentSpec, write_seg
from pipelines.volume import DEFAULT_SPACING_TOLERANCE, Volume, plan_series
from pipelines.volume.loader import build_volume

PIPELINE_NAME = "mri-cardiac"
SR_FILE = "mri-cardiac-sr.dcm"
DEFAULT_MIN_PHASES = 5
LabelArray = npt.NDArray[np.uint8]


def seg_file(phase_name: str) -> str:
    return f"mri-cardiac-seg-{phase_name.lower()}.dcm"


@dataclass(frozen=True)
class Parameters:
    phases: str  # "all" | "ed_es"
    ed_phase: int | None
    es_phase: int | None
    backend: BackendName | None
    threads: int | None
    overlap: float
    tta: bool
    min_phases: int
    min_slices: int


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise PipelineError("invalid_parameter", f"parameter {key} must be true or false, not {value!r}")


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PipelineError(
            "invalid_parameter", f"parameter {key} must be an integer >= {low}, not {value!r}"
        )
    return value


def parse_parameters(raw: Mapping[str, Any]) -> Parameters:
    known = {
        "phases",
        "ed_phase",
        "es_phase",
        "backend",
        "threads",
        "overlap",
        "tta",
        "min_phases",
        "min_slices",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PipelineError(
            "invalid_parameter",
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        )
    phases = str(raw.get("phases", "all"))
    if phases not in ("all", "ed_es"):
        raise PipelineError("invalid_parameter", f"phases must be 'all' or 'ed_es', not {phases!r}")
    backend = raw.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise PipelineError(
            "invalid_parameter", f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
        )
    try:
        overlap = float(raw.get("overlap", 0.5))
    except (TypeError, ValueError):
        raise PipelineError(
            "invalid_parameter", f"overlap must be a number, not {raw.get('overlap')!r}"
        ) from None
    if not 0.0 <= overlap < 1.0:
        raise PipelineError("invalid_parameter", f"overlap must be in [0, 1), not {overlap}")
    ed, es = raw.get("ed_phase"), raw.get("es_phase")
    if ed is not None and es is not None and str(ed) == str(es):
        raise PipelineError("invalid_parameter", f"ed_phase and es_phase are both {ed}")
    return Parameters(
        phases=phases,
        ed_phase=None if ed is None else _int(ed, "ed_phase", 0),
        es_phase=None if es is None else _int(es, "es_phase", 0),
        backend=backend,
        threads=None if raw.get("threads") is None else _int(raw["threads"], "threads", 1),
        overlap=overlap,
        tta=_bool(raw.get("tta", False), "tta"),
        min_phases=_int(raw.get("min_phases", DEFAULT_MIN_PHASES), "min_phases", 2),
        min_slices=_int(raw.get("min_slices", 3), "min_slices", 1),
    )


def _modality(path: Path) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:
        return "MR"
    return str(header.get("Modality", "") or "unknown")


def load_cine(files: Sequence[Path], min_phases: int, min_slices: int) -> Volume:
    """The 3D+t volume of a cine short-axis series (or of one study's series gathered into one stack).
    The cine checks run on the headers, before any pixel is read."""
    if files:  # a CT or other series is named as such, not by what its geometry would give
        modalities = sorted({_modality(Path(files[0])), _modality(Path(files[-1]))})
        if modalities != ["MR"]:
            raise PipelineError(
                "unsupported_modality",
                f"mri-cardiac takes MR cine series, this one is {'/'.join(modalities)!r}",
            )
    plan = plan_series(files, multi_series=True)
    if plan.modality != "MR":
        raise PipelineError(
            "unsupported_modality",
            f"mri-cardiac takes MR cine series, this one is {plan.modality or 'unknown'!r}",
        )
    if len(plan.phases) > 1:
        raise PipelineError(
            "not_cine",
            f"the series holds {len(plan.phases)} separate acquisitions "
            f"({', '.join(plan.phase_labels)}), not the time points of one cine",
        )
    phase = plan.phases[0]
    if len(phase.times) == 1:
        positions = len(set(int(i) for i in plan.position_ids))
        raise PipelineError(
            "not_cine",
            f"one image per slice position ({positions} positions): a cine series has several time points "
            "at every position",
        )
    if len(phase.times) < min_phases:
        raise PipelineError(
            "too_few_phases",
            f"{len(phase.times)} time points; ED and ES need a cine of at least {min_phases} phases",
        )
    volume = build_volume(plan, phase, min_slices, DEFAULT_SPACING_TOLERANCE)
    return volume


def source_headers(volume: Volume, t: int) -> list[Dataset]:
    """Headers of time point ``t``'s slices in volume order, with the loader's UIDs."""
    headers: list[Dataset] = []
    for frame in volume.sources[t]:
        header = pydicom.dcmread(frame.path, stop_before_pixels=True)
        header.SOPClassUID = frame.sop_class_uid
        header.SOPInstanceUID = frame.sop_instance_uid
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not str(header.get(keyword, "") or "").strip():
                raise PipelineError(
                    "source_uid_missing", f"{frame.path.name} has an empty {keyword}; a SEG must reference it"
                )
        headers.append(header)
    return headers


def segment_phases(
    model: CardiacModel, volume: Volume, phases: Sequence[int], slices: slice | None = None
) -> dict[int, LabelArray]:
    """Cleaned label maps (slice, row, column) of the given time points (only ``slices`` when given)."""
    values = model.spec.values
    out = {}
    for t in phases:
        out[t] = clean_labels(model.segment(volume.voxels[t], volume.spacing, slices), values)
    return out


def screen_ed_es(model: CardiacModel, volume: Volume) -> tuple[int, int]:
    """ED/ES from the middle third of the slices at every time point (the ``ed_es`` mode)."""
    n = volume.n_slices
    third = max(1, n // 3)
    middle = slice((n - third) // 2, (n - third) // 2 + third)
    labels = segment_phases(model, volume, range(volume.n_times), middle)
    lv = model.spec.values[Structure.LV]
    areas = [int((labels[t] == lv).sum()) for t in range(volume.n_times)]
    if max(areas) == 0:
        raise PipelineError("no_left_ventricle", "no LV cavity was found in the middle slices of any phase")
    ed, es = int(np.argmax(areas)), int(np.argmin(areas))
    if ed == es:
        raise PipelineError("no_contraction", "the LV cavity does not change over the cycle")
    return ed, es


def _by_series(headers: Sequence[Dataset]) -> list[list[int]]:
    """Indices of ``headers`` grouped by SeriesInstanceUID, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, header in enumerate(headers):
        groups.setdefault(str(header.SeriesInstanceUID), []).append(index)
    return list(groups.values())


def write_outputs(
    volume: Volume,
    labels: Mapping[int, LabelArray],
    function: CardiacFunction,
    values: Mapping[Structure, int],
    specs: Mapping[Structure, SegmentSpec],
    *,
    algorithm: Algorithm,
    identity: OutputIdentity,
    output_dir: Path,
    notes: list[str],
) -> list[Path]:
    """One SEG per chosen phase (segments in ``SEGMENT_ORDER``; one per source series and phase where
    the slices come from several series) and the SR referencing them."""
    output_dir.mkdir(parents=True, exist_ok=True)
    voxel_ml = voxel_volume_ml(volume.spacing)
    written: list[PhaseSeg] = []
    files = []
    instance = 0
    for name, t in (("ED", function.ed_phase), ("ES", function.es_phase)):
        headers = source_headers(volume, t)
        masks = np.stack([labels[t] == values[s] for s in SEGMENT_ORDER])
        when = f" (trigger time {volume.trigger_times[t]:.0f} ms)" if volume.trigger_times else ""
        groups = _by_series(headers)
        if len(groups) > 1:
            notes.append(f"{name}: the slices come from {len(groups)} series, one SEG each")
        for part, indices in enumerate(groups, start=1):
            instance += 1
            suffix = "" if len(groups) == 1 else f"-{part}"
            seg = write_seg(
                [headers[i] for i in indices],
                masks[:, indices],
                [specs[s] for s in SEGMENT_ORDER],
                algorithm=algorithm,
                identity=identity,
                out_path=output_dir / seg_file(name + suffix),
                series_description="segnode mri-cardiac segmentation",
                series_key="seg",
                instance_key=f"seg-{name}{suffix}",
                instance_number=instance,
                content_label=name,
                content_description=f"{name}: time point {t + 1} of {volume.n_times}{when}",
            )
            notes.extend(n for n in seg.notes if n not in notes)
            volumes = {
                s: float(masks[number, indices].sum()) * voxel_ml for number, s in enumerate(SEGMENT_ORDER)
            }
            header = pydicom.dcmread(seg.path, stop_before_pixels=True)
            written.append(PhaseSeg(name, header, [headers[i] for i in indices], volumes))
            files.append(seg.path)
    sr = write_function_report(
        written, function, algorithm=algorithm, identity=identity, out_path=output_dir / SR_FILE
    )
    notes.extend(n for n in sr.notes if n not in notes)
    files.append(sr.path)
    return files


class MriCardiacPipeline:
    """The pipeline; it keeps the last model it opened (one per worker process, not one per job)."""

    name = PIPELINE_NAME

    def __init__(self) -> None:
        self._models: WarmCache[CardiacModel] = WarmCache(close=lambda model: model.close())

    def run(self, request: PipelineRequest) -> PipelineOutput:
        started = time.perf_counter()
        params = parse_parameters(request.parameters)
        timings: dict[str, float] = {}
        notes: list[str] = []

        t0 = time.perf_counter()
        volume = load_cine(request.series_files, params.min_phases, params.min_slices)
        notes.extend(volume.notes)
        for key, value in (("ed_phase", params.ed_phase), ("es_phase", params.es_phase)):
            if value is not None and value >= volume.n_times:
                raise PipelineError(
                    "invalid_parameter", f"{key} {value} is beyond the {volume.n_times} time points"
                )
        timings["load_volume"] = round(time.perf_counter() - t0, 3)

        t0 = time.perf_counter()
        cache_key = (
            *bundle_key(request.models_dir, BUNDLE_NAME),
            params.backend,
            request.device,
            params.threads,
            params.overlap,
            params.tta,
        )
        model, warm = self._models.get(
            cache_key,
            lambda: open_model(
                request.models_dir, params.backend, request.device, params.threads, params.overlap, params.tta
            ),
        )
        before = dict(model.stage_seconds)
        timings["load_models"] = round(time.perf_counter() - t0, 3)
        notes.extend(model.notes)
        t0 = time.perf_counter()
        ed_given, es_given = params.ed_phase, params.es_phase
        if params.phases == "all":
            chosen: Sequence[int] = range(volume.n_times)
        else:
            ed, es = params.ed_phase, params.es_phase
            if ed is None or es is None:
                screened = screen_ed_es(model, volume)
                ed = screened[0] if ed is None else ed
                es = screened[1] if es is None else es
                if ed == es:  # one given, the screen picked the same phase for the other
                    raise PipelineError("invalid_parameter", f"ED and ES would both be time point {ed + 1}")
                # with both screened, the full volumes order the two phases
                if params.ed_phase is not None or params.es_phase is not None:
                    ed_given, es_given = ed, es
                notes.append(
                    f"ED/ES screened on the middle slices: time points {screened[0] + 1}/{screened[1] + 1}"
                )
            chosen = sorted({ed, es})
        labels = segment_phases(model, volume, chosen)
        timings["segment"] = round(time.perf_counter() - t0, 3)
        # the network's share of it (``*_net``: what benchmarks count as inference)
        for stage, seconds in model.stage_seconds.items():
            timings[f"segment_{stage}"] = round(seconds - before[stage], 3)
        spec, bundle = model.spec, model.bundle
        backend_name = f"{model.backend.name}"

        voxel_ml = voxel_volume_ml(volume.spacing)
        per_phase = [phase_volumes(labels[t], spec.values, voxel_ml, t) for t in sorted(labels)]
        function = cardiac_function(per_phase, ed_given, es_given)
        if function.lv_edv_ml < function.lv_esv_ml:
            notes.append("the LV volume at the given ED phase is smaller than at the given ES phase")

        algorithm = Algorithm(
            name=f"{bundle.manifest.architecture.name} ({bundle.name}, segnode mri-cardiac)",
            version=bundle.version,
            parameters={"backend": backend_name, "phases": params.phases},
        )
        first = volume.sources[0][0]
        identity = OutputIdentity(
            source_series_uid=volume.series_instance_uid or first.sop_instance_uid,
            pipeline=PIPELINE_NAME,
            model_version=f"{bundle.name}={bundle.version}",
            rule_version=request.rule_version,
        )
        t0 = time.perf_counter()
        files = write_outputs(
            volume,
            labels,
            function,
            spec.values,
            {s: spec.labels[s].spec for s in SEGMENT_ORDER},
            algorithm=algorithm,
            identity=identity,
            output_dir=request.output_dir,
            notes=notes,
        )
        timings["write_outputs"] = round(time.perf_counter() - t0, 3)
        timings["total"] = round(time.perf_counter() - started, 3)
        measurements: dict[str, Any] = {
            **function.as_dict(),
            "phases_segmented": len(labels),
            "time_points": volume.n_times,
            "slices": volume.n_slices,
            "lv_volume_curve_ml": [round(v.lv_ml, 2) for v in per_phase] if len(per_phase) > 2 else [],
            "backend": backend_name,
            "model_warm": warm,  # opened by an earlier job of this worker
            "models": {bundle.name: bundle.version},
        }
        return PipelineOutput(files=files, measurements=measurements, timings=timings, notes=notes)
