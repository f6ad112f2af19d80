"""ct-liver: DICOM series -> volume -> liver net -> lesion net inside the liver -> one DICOM-SEG with two
segments (Liver; Liver lesion) and one TID 1500 SR with their volumes (ml) and the lesion count.

Parameters (``PipelineRequest.parameters``):

- ``backend``: ``onnxruntime`` (default on CPU) or ``torch`` (default on a GPU);
- ``threads``: intra-op threads of the backend (default: the physical cores);
- ``lesions``: run the lesion net (default: true on CT, false on MR, where it is unvalidated);
- ``phase``: which phase of a multi-phase series (an index, ``first``, ``last`` or a label);
- ``substitute_missing_uids``: when source instances have an empty Study or Series Instance UID (seen
  only in files read from disk: the node refuses such instances on receipt), derive stand-ins so that a
  SEG can still be written, and say so in the notes (default true); false refuses instead.

Refusals (``PipelineError.reason``): ``unsupported_modality`` (not CT or MR), ``unsupported_series``
(cine), ``model_missing`` (run ``segnode models install ct-liver``), ``model_invalid`` (a bundle file
missing or altered), ``model_incompatible``, ``backend_unavailable``, ``invalid_parameter``, ``no_body``
(nothing to crop to), ``no_liver``, ``liver_too_small``, ``source_uid_missing``, and whatever
``pipelines.volume`` and ``pipelines.outputs`` raise.

Where the method deviates from pyliverlesionseg 0.3 (see ``cropping.py`` and ``processing.py``): the
CT body crop keeps up to the patch's full height above the hips instead of stopping 70 mm above the
lowest lung base; the MR body crop no longer cuts into the body along y (the original's voxel-sized
edge detector cut up to 35 mm of body wall off tightly framed MR); lesion blocks whose output holds no liver
are not run; lesions are restricted to the liver. Everything else follows
``../shared/models/pyliverlesionseg.md``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipelines.base import PipelineError, PipelineOutput, PipelineRequest
from pipelines.bundles.warm import WarmCache, bundle_key
from pipelines.ct_liver.models import BACKENDS, BackendName, LiverNetworks, open_networks
from pipelines.ct_liver.orientation import to_ras
from pipelines.ct_liver.processing import ProcessingError, count_components
from pipelines.ct_liver.segment import segment
from pipelines.liver import LESION_BUNDLE, LIVER_BUNDLE
from pipelines.outputs import (
    LIVER,
    LIVER_LESION,
    Algorithm,
    OutputIdentity,
    SegmentMeasurement,
    derive_uid,
    write_measurement_report,
    write_seg,
)
from pipelines.volume import Volume, load_volume, plan_series

PIPELINE_NAME = "ct-liver"
SEG_FILE = "ct-liver-seg.dcm"
SR_FILE = "ct-liver-sr.dcm"
SUPPORTED_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class Parameters:
    backend: BackendName | None
    threads: int | None
    lesions: bool | None
    phase: int | str | None
    substitute_missing_uids: bool


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise PipelineError("invalid_parameter", f"parameter {key} must be true or false, not {value!r}")


def parse_parameters(raw: Mapping[str, Any]) -> Parameters:
    known = {"backend", "threads", "lesions", "phase", "substitute_missing_uids"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PipelineError(
            "invalid_parameter",
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        )
    backend = raw.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise PipelineError(
            "invalid_parameter", f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
        )
    threads = raw.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PipelineError("invalid_parameter", f"threads must be a positive integer, not {threads!r}")
    lesions = raw.get("lesions")
    phase = raw.get("phase")
    if phase is not None and not isinstance(phase, int | str):
        raise PipelineError("invalid_parameter", f"phase must be an index or a label, not {phase!r}")
    return Parameters(
        backend=backend,
        threads=threads,
        lesions=None if lesions is None else _bool(lesions, "lesions"),
        phase=phase,
        substitute_missing_uids=_bool(raw.get("substitute_missing_uids", True), "substitute_missing_uids"),
    )


def _source_headers(volume: Volume, substitute: bool, notes: list[str]) -> list[Dataset]:
    """Headers of the slices in volume order, with the UIDs the volume loader settled on."""
    headers: list[Dataset] = []
    for frame in volume.slice_sources:
        header = pydicom.dcmread(frame.path, stop_before_pixels=True)
        header.SOPClassUID = frame.sop_class_uid
        header.SOPInstanceUID = frame.sop_instance_uid
        headers.append(header)
    instance_uids = sorted(frame.sop_instance_uid for frame in volume.slice_sources)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if all(str(h.get(keyword, "") or "").strip() for h in headers):
            continue
        if not substitute:
            raise PipelineError(
                "source_uid_missing",
                f"source instances have an empty {keyword}; a SEG must reference it "
                "(set parameter substitute_missing_uids=true to derive a stand-in)",
            )
        stand_in = derive_uid("substitute", keyword, *instance_uids)
        for item in headers:
            setattr(item, keyword, stand_in)
        notes.append(
            f"source {keyword} is empty: the results carry the derived stand-in {stand_in} and will not "
            "file into the source's study/series in an archive"
        )
    return headers


class CtLiverPipeline:
    """The pipeline; it keeps its verified bundles (and on a GPU the networks' runtimes) between the jobs
    of one worker process."""

    name = PIPELINE_NAME

    def __init__(self) -> None:
        self._networks: WarmCache[LiverNetworks] = WarmCache(close=lambda networks: networks.close())

    def run(self, request: PipelineRequest) -> PipelineOutput:
        started = time.perf_counter()
        params = parse_parameters(request.parameters)
        timings: dict[str, float] = {}
        notes: list[str] = []

        t = time.perf_counter()
        plan = plan_series(request.series_files)
        modality = plan.modality
        if modality not in SUPPORTED_MODALITIES:
            raise PipelineError(
                "unsupported_modality",
                f"ct-liver takes CT or MR series, this one is {modality or 'unknown'!r}",
            )
        cache_key = (
            *bundle_key(request.models_dir, LIVER_BUNDLE, LESION_BUNDLE),
            params.backend,
            request.device,
            params.threads,
        )
        networks, warm = self._networks.get(
            cache_key,
            lambda: open_networks(request.models_dir, params.backend, request.device, params.threads),
        )
        timings["load_models"] = round(time.perf_counter() - t, 3)
        return self._run(request, params, networks, warm, modality, timings, notes, started)

    def _run(
        self,
        request: PipelineRequest,
        params: Parameters,
        networks: LiverNetworks,
        warm: bool,
        modality: str,
        timings: dict[str, float],
        notes: list[str],
        started: float,
    ) -> PipelineOutput:
        t = time.perf_counter()
        volume = load_volume(request.series_files, phase=params.phase)
        if volume.is_cine:
            raise PipelineError("unsupported_series", "ct-liver takes a 3-D series, not a cine (4-D) one")
        notes.extend(volume.notes)
        reoriented = to_ras(volume.voxels, volume.affine)
        timings["load_volume"] = round(time.perf_counter() - t, 3)

        run_lesions = params.lesions if params.lesions is not None else modality == "CT"
        if not run_lesions:
            notes.append(
                f"lesion net not run on {modality}" + (" (unvalidated on MR)" if modality == "MR" else "")
            )
        try:
            result = segment(reoriented.image, reoriented.voxel, modality, networks, run_lesions)
        except ProcessingError as exc:
            raise PipelineError(exc.reason, str(exc)) from None
        timings.update(result.timings)
        notes.extend(result.notes)
        if not result.liver.any():
            raise PipelineError("no_liver", "the liver net found no liver in this series")

        liver = reoriented.back(result.liver)
        masks = [liver]
        segments = [LIVER]
        if result.lesions is not None:
            masks.append(reoriented.back(result.lesions))
            segments.append(LIVER_LESION)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        liver_ml = float(liver.sum()) * voxel_ml
        measurements: dict[str, Any] = {
            "modality": modality,
            "backend": networks.backend,
            "models_warm": warm,  # opened by an earlier job of this worker
            "liver_volume_ml": round(liver_ml, 2),
            "liver_voxels": int(liver.sum()),
            "models": {
                networks.liver_bundle.name: networks.liver_bundle.version,
                networks.lesion_bundle.name: networks.lesion_bundle.version,
            },
        }
        sr_items = [SegmentMeasurement(segment_number=1, volume_ml=liver_ml)]
        if result.lesions is not None:
            lesions = masks[1]
            count, sizes = count_components(lesions)
            lesion_ml = float(lesions.sum()) * voxel_ml
            measurements |= {
                "lesion_volume_ml": round(lesion_ml, 2),
                "lesion_count": count,
                "lesion_volumes_ml": [round(s * voxel_ml, 3) for s in sizes],
                "lesion_blocks_run": result.lesion_blocks_run,
                "lesion_blocks_skipped": result.lesion_blocks_skipped,
            }
            sr_items.append(SegmentMeasurement(segment_number=2, volume_ml=lesion_ml, lesion_count=count))

        t = time.perf_counter()
        files = self._write(request, params, networks, volume, masks, segments, sr_items, notes)
        timings["write_outputs"] = round(time.perf_counter() - t, 3)
        timings["total"] = round(time.perf_counter() - started, 3)
        return PipelineOutput(files=files, measurements=measurements, timings=timings, notes=notes)

    def _write(
        self,
        request: PipelineRequest,
        params: Parameters,
        networks: LiverNetworks,
        volume: Volume,
        masks: Sequence[np.ndarray[Any, Any]],
        segments: Sequence[Any],
        sr_items: Sequence[SegmentMeasurement],
        notes: list[str],
    ) -> list[Path]:
        headers = _source_headers(volume, params.substitute_missing_uids, notes)
        liver_b, lesion_b = networks.liver_bundle, networks.lesion_bundle
        identity = OutputIdentity(
            source_series_uid=str(headers[0].SeriesInstanceUID),
            pipeline=PIPELINE_NAME,
            model_version=f"{liver_b.name}={liver_b.version};{lesion_b.name}={lesion_b.version}",
            rule_version=request.rule_version,
        )
        algorithm = Algorithm(
            name="pyliverlesionseg liver + liver lesion (segnode ct-liver)",
            version=liver_b.version,
            parameters={"backend": networks.backend, "liver": liver_b.name, "lesion": lesion_b.name},
        )
        request.output_dir.mkdir(parents=True, exist_ok=True)
        seg = write_seg(
            headers,
            np.stack(masks),
            segments,
            algorithm=algorithm,
            identity=identity,
            out_path=request.output_dir / SEG_FILE,
            series_description="segnode ct-liver segmentation",
            content_label="LIVER",
        )
        notes.extend(seg.notes)
        sr = write_measurement_report(
            seg.path,
            headers,
            sr_items,
            algorithm=algorithm,
            identity=identity,
            out_path=request.output_dir / SR_FILE,
            series_description="segnode ct-liver measurements",
        )
        notes.extend(n for n in sr.notes if n not in notes)
        return [seg.path, sr.path]
