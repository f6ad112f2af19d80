"""``segnode models install ct-liver``: download pyliverlesionseg 0.3, convert both nets, publish two
bundles (``pyliverlesionseg-liver``, ``pyliverlesionseg-liver-lesion``), then verify them.

Verification re-opens each published bundle (every sha256), builds the torch and onnxruntime backends
from its files and checks that they agree on the parity inputs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from pipelines.bundles.manifest import (
    Architecture,
    BackendFile,
    Code,
    FileRef,
    InputSpec,
    Label,
    Licence,
    Manifest,
    Metric,
    Normalisation,
    OutputSpec,
    Provenance,
    TrainingData,
)
from pipelines.bundles.store import Bundle, open_bundle, publish, sha256_file, staging_dir
from pipelines.liver import BUNDLE_VERSION, LESION_BUNDLE, LIVER_BUNDLE, source
from pipelines.liver.convert import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    PARITY_SHAPES,
    Converted,
    compare,
    convert,
    onnx_session,
    parity_inputs,
    torch_outputs,
)
from pipelines.liver.networks import LesionNet, LiverNet, build

SCT = "SCT"
LIVER_CODE = Code(scheme=SCT, value="10200004", meaning="Liver")
ANATOMICAL_STRUCTURE = Code(scheme=SCT, value="91723000", meaning="Anatomical Structure")
ABNORMAL_STRUCTURE = Code(scheme=SCT, value="49755003", meaning="Morphologically Abnormal Structure")
LESION_CODE = Code(scheme=SCT, value="52988006", meaning="Lesion")  # CID 7151, as dcmqi's examples use

TRAINING = TrainingData(
    description="in-house clinical CT and MR (KU Leuven), trained by the authors; not public",
    public=False,
)
CT_NORM = Normalisation(
    method="ct_clip", description="clip(HU / 1000, -0.2, 0.2) * 2.5 (HU -200..200 -> -0.5..0.5)"
)

# Measured by segnode with bench/liver_accuracy.py (onnxruntime backend, the pipeline's processing).
CHAOS_DICE = {
    "1": 0.8538, "2": 0.8809, "3": 0.8876, "8": 0.8315, "10": 0.7567, "13": 0.8919,
    "15": 0.4625, "20": 0.8309, "21": 0.9142, "22": 0.8705, "32": 0.8816, "33": 0.872,
}  # fmt: skip
LIVER_METRICS = (
    Metric(
        name="dice",
        value=0.9584,
        dataset="TotalSegmentator example CT (example_ct.nii.gz, 3 mm, Apache-2.0)",
        cases=1,
        reference="TotalSegmentator v1 liver (model output, silver standard)",
        notes="the CT ends inside the liver dome (see the body-crop note in pipelines/ct_liver/cropping.py)",
    ),
    Metric(
        name="dice",
        value=round(sum(CHAOS_DICE.values()) / len(CHAOS_DICE), 4),
        dataset="CHAOS T2-SPIR MR, 12 training patients (Q-Net pre-processed copy, CC BY-SA 4.0)",
        cases=len(CHAOS_DICE),
        reference="CHAOS manual liver labels",
        per_case=CHAOS_DICE,
        notes=(
            "mean 0.828, median 0.871; patients 1-3 (the test set) 0.874; patient 15 0.46: the net "
            "misses the inferior half of a large liver; intensities are the copy's normalised values"
        ),
    ),
)
LESION_LIMITATIONS = [
    "segnode has no liver-lesion reference to measure this network against; its outputs are unvalidated",
    "run only inside a liver mask (the pipeline restricts lesions to the liver)",
]


def _notice(bundle: str, weights_member: str, converted: Converted) -> str:
    return f"""{bundle} (segnode model bundle)

The weights in this bundle are the file
  {weights_member}
of the Python package pyliverlesionseg {source.VERSION} (PyPI), by Xikai Tang and Georg Schramm,
KU Leuven (KUL-recon-lab/pyliverlesionseg, {source.SOURCE_URL}),
licensed under the Apache License, Version 2.0 (see LICENSE in this folder).

Modifications by segnode: the network was re-implemented in PyTorch
(pipelines/liver/networks.py); the Keras kernels were transposed to PyTorch's
layout and saved as a PyTorch state dict ({converted.state_dict.name}) and exported to ONNX
({converted.onnx.name}). The values of the weights are unchanged.

Training data (by the authors): in-house clinical CT and MR (KU Leuven), not public.
Reference: X. Tang et al., Whole liver segmentation based on deep learning and manual
adjustment for clinical use in SIRT, Eur J Nucl Med Mol Imaging 47 (2020).
"""


def _backends(converted: Converted, module: str) -> list[BackendFile]:
    return [
        BackendFile(
            name="onnxruntime",
            file=converted.onnx.name,
            sha256=sha256_file(converted.onnx),
            format="onnx",
            opset=OPSET,
            dynamic_spatial=True,
        ),
        BackendFile(
            name="torch",
            file=converted.state_dict.name,
            sha256=sha256_file(converted.state_dict),
            format="torch_state_dict",
            module=module,
            dynamic_spatial=True,
        ),
    ]


def _licence(staging: Path, notice: str, licence_file: Path) -> Licence:
    shutil.copyfile(licence_file, staging / "LICENSE")
    (staging / "NOTICE").write_text(notice, encoding="utf-8")
    return Licence(
        spdx="Apache-2.0",
        text=FileRef(file="LICENSE", sha256=sha256_file(staging / "LICENSE")),
        notice=FileRef(file="NOTICE", sha256=sha256_file(staging / "NOTICE")),
        attribution=(
            "Liver and liver-lesion networks of pyliverlesionseg 0.3 by Xikai Tang and Georg Schramm, "
            "KU Leuven (KUL-recon-lab/pyliverlesionseg), Apache-2.0; converted to PyTorch/ONNX by segnode"
        ),
        authors=list(source.AUTHORS),
        source_url=source.SOURCE_URL,
    )


def _provenance(weights_member: str, converted: Converted) -> Provenance:
    return Provenance(
        package=source.PACKAGE,
        package_version=source.VERSION,
        archive=source.WHEEL,
        archive_sha256=source.WHEEL_SHA256,
        weights_file=weights_member,
        weights_sha256=source.MEMBERS[weights_member],
        converter=(
            f"segnode pipelines.liver.convert (torch {torch.__version__}, "
            f"onnx {onnx.__version__}, opset {OPSET})"
        ),
        conversion_max_abs_diff={"onnxruntime_vs_torch": converted.max_abs_diff},
    )


def liver_manifest(converted: Converted, licence: Licence) -> Manifest:
    net = LiverNet
    return Manifest(
        name=LIVER_BUNDLE,
        version=BUNDLE_VERSION,
        task="segmentation",
        description=(
            "Whole-liver segmentation on CT and MR at 3 mm (pyliverlesionseg 0.3): one centred patch "
            "after a body crop, 1.5 mm resampling, 3x3x3 median and 3 mm resampling"
        ),
        modality=["CT", "MR"],
        architecture=Architecture(
            name="pyliverlesionseg-unet-liver-3mm",
            parameters=converted.parameters,
            description=(
                "3-D U-Net, 4 levels (20/40, 40/80, 80/160, 160/160 features), padding 'same', max-pool 3, "
                "nearest x3 + 3x3x3 mean upsampling, instance norm without affine, LeakyReLU 0.01, sigmoid"
            ),
        ),
        labels=[Label(value=1, name="Liver", category=ANATOMICAL_STRUCTURE, type=LIVER_CODE)],
        input=InputSpec(
            spacing_mm=(3.0, 3.0, 3.0),
            orientation="RAS",
            channels=1,
            patch_size=net.input_patch,
            normalisation={
                "CT": CT_NORM,
                "MR": Normalisation(
                    method="mr_minmax_80",
                    description=(
                        "(clip(v, lo, lo + 0.8 (hi - lo)) - lo) / (0.8 (hi - lo)) - 0.5; "
                        "lo, hi the volume's min and max"
                    ),
                ),
            },
        ),
        output=OutputSpec(
            channels=1,
            activation="sigmoid",
            threshold=0.5,
            patch_size=net.output_patch,
            offset=net.output_offset,
        ),
        backends=_backends(converted, "pipelines.liver.networks:LiverNet"),
        licence=licence,
        training_data=TRAINING,
        metrics=list(LIVER_METRICS),
        limitations=[
            "one patch of 489 x 408 x 408 mm: the body crop must bring the liver into it",
            "post-processing keeps the largest connected component",
        ],
        provenance=_provenance(source.LIVER_WEIGHTS, converted),
    )


def lesion_manifest(converted: Converted, licence: Licence) -> Manifest:
    net = LesionNet
    return Manifest(
        name=LESION_BUNDLE,
        version=BUNDLE_VERSION,
        task="segmentation",
        description=(
            "Liver-lesion segmentation on CT and MR at 1 x 1 x 3 mm inside a (dilated) liver mask "
            "(pyliverlesionseg 0.3), tiled with 92 x 84 x 42 output blocks"
        ),
        modality=["CT", "MR"],
        architecture=Architecture(
            name="pyliverlesionseg-unet-lesion-1x1x3mm",
            parameters=converted.parameters,
            description=(
                "3-D residual U-Net, 4 levels (20/40, 40/80, 80/160, 160/160 features), padding 'valid', "
                "max-pool 2, nearest x2 upsampling, instance norm without affine, LeakyReLU 0.01, sigmoid"
            ),
        ),
        labels=[
            Label(
                value=1,
                name="Liver lesion",
                category=ABNORMAL_STRUCTURE,
                type=LESION_CODE,
                anatomic_region=LIVER_CODE,
            )
        ],
        input=InputSpec(
            spacing_mm=(1.0, 1.0, 3.0),
            orientation="RAS",
            channels=1,
            patch_size=net.input_patch,
            normalisation={
                "CT": Normalisation(
                    method="ct_clip_liver_masked",
                    description="clip(HU / 1000, -0.2, 0.2) * 2.5, -0.5 outside the liver dilated twice",
                ),
                "MR": Normalisation(
                    method="mr_liver_median",
                    description=(
                        "(v - median) * min(0.5 / |min - median|, 0.5 / |max - median|) "
                        "over the liver, -0.5 outside it"
                    ),
                ),
            },
        ),
        output=OutputSpec(
            channels=1,
            activation="sigmoid",
            threshold=0.5,
            patch_size=net.output_patch,
            offset=net.output_offset,
        ),
        backends=_backends(converted, "pipelines.liver.networks:LesionNet"),
        licence=licence,
        training_data=TRAINING,
        metrics=[],
        limitations=LESION_LIMITATIONS,
        provenance=_provenance(source.LESION_WEIGHTS, converted),
    )


def verify_backends(bundle: Bundle, kind: str) -> float:
    """Both backends of a published bundle, built from its files, agree on the parity inputs."""
    inputs = parity_inputs(PARITY_SHAPES[kind], seed=1)
    module = build(kind)
    state = torch.load(bundle.backend_file("torch"), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    reference = torch_outputs(module.eval(), inputs)
    session = onnx_session(bundle.backend_file("onnxruntime"))
    got = [session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]
    return compare(reference, got, f"bundle {bundle.name}")


def install_ct_liver(
    models_dir: Path, cache_dir: Path, log: Callable[[str], None] = lambda _m: None
) -> list[Bundle]:
    wheel = source.fetch_wheel(cache_dir, log)
    bundles: list[Bundle] = []
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".extract-") as tmp:
        extracted = source.extract(wheel, Path(tmp))
        jobs = (
            ("liver", LIVER_BUNDLE, extracted.liver_weights, source.LIVER_WEIGHTS, "liver", liver_manifest),
            (
                "lesion",
                LESION_BUNDLE,
                extracted.lesion_weights,
                source.LESION_WEIGHTS,
                "lesion",
                lesion_manifest,
            ),
        )
        for kind, name, weights, member, stem, make_manifest in jobs:
            log(f"converting {Path(member).name} -> {name} {BUNDLE_VERSION}")
            staging = staging_dir(models_dir, name, BUNDLE_VERSION)
            try:
                converted = convert(kind, weights, staging, stem)
                log(f"  onnxruntime vs torch: max |diff| {converted.max_abs_diff:.2e}")
                licence = _licence(staging, _notice(name, member, converted), extracted.licence)
                bundle = publish(staging, make_manifest(converted, licence), models_dir)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            bundles.append(bundle)
            log(f"  published {bundle.path}")
    shutil.rmtree(models_dir / ".staging", ignore_errors=True)
    for bundle, kind in zip(bundles, ("liver", "lesion"), strict=True):
        verified = open_bundle(bundle.path)
        diff = verify_backends(verified, kind)
        log(
            f"verified {verified.name} {verified.version}: every sha256 matches; "
            f"torch vs onnxruntime {diff:.2e}"
        )
    return bundles
