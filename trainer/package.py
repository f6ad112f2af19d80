"""Write a model bundle (``pipelines.bundles`` manifest + files) from an exported model, its plan, the
evaluation summary and the dataset's licence."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    TrainingData,
)
from pipelines.bundles.store import Bundle, publish, sha256_file, staging_dir
from trainer.export import OPSET
from trainer.plan import Plan

ANATOMICAL_STRUCTURE = Code(scheme="SCT", value="91723000", meaning="Anatomical Structure")
# SNOMED CT codes (CID 7151) of the structures a label name stands for (ACDC's names included).
KNOWN_TYPES: dict[str, Code] = {
    "rv": Code(scheme="SCT", value="53085002", meaning="Right ventricle"),
    "right ventricle": Code(scheme="SCT", value="53085002", meaning="Right ventricle"),
    "myo": Code(scheme="SCT", value="49848007", meaning="Left Ventricle Myocardium"),
    "lv myocardium": Code(scheme="SCT", value="49848007", meaning="Left Ventricle Myocardium"),
    "lv": Code(scheme="SCT", value="87878005", meaning="Left ventricle"),
    "left ventricle": Code(scheme="SCT", value="87878005", meaning="Left ventricle"),
    "liver": Code(scheme="SCT", value="10200004", meaning="Liver"),
    "spleen": Code(scheme="SCT", value="78961009", meaning="Spleen"),
    "right kidney": Code(scheme="SCT", value="9846003", meaning="Right kidney"),
    "left kidney": Code(scheme="SCT", value="18639004", meaning="Left kidney"),
}


@dataclass
class LicenceInfo:
    spdx: str
    text: str  # the licence text (or its canonical summary and URL)
    notice: str
    attribution: str
    authors: list[str]
    source_url: str
    training_description: str
    public: bool = True


ACDC_LICENCE = LicenceInfo(
    spdx="CC-BY-NC-SA-4.0",
    text="""Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International (CC BY-NC-SA 4.0)
https://creativecommons.org/licenses/by-nc-sa/4.0/legalcode

This model was trained on the ACDC dataset, which is licensed under CC BY-NC-SA 4.0. The trained
weights are distributed under the same licence:

- Attribution: you must give appropriate credit (see NOTICE), provide a link to the licence and
  indicate if changes were made.
- NonCommercial: you may not use the material for commercial purposes.
- ShareAlike: if you remix, transform or build upon the material, you must distribute your
  contributions under the same licence as the original.
- No additional restrictions: you may not apply legal terms or technological measures that legally
  restrict others from doing anything the licence permits.

The full legal code is at the URL above and governs.

RESEARCH USE ONLY. Not a medical device; not for clinical decisions.
""",
    notice="""mri-cardiac (segnode model bundle)

Segmentation of the right-ventricular cavity (RV), the left-ventricular myocardium (MYO) and the
left-ventricular cavity (LV) on cine short-axis MRI. Trained by segnode with segnode-train on the
ACDC training set (Automated Cardiac Diagnosis Challenge, MICCAI 2017), ED and ES phases of 70
patients (56 for training, 14 held out for validation), from the SSL4MIS/3DCardiac HDF5 copy
(github.com/antares0811/3DCardiac @ 7dcd89c9), converted to the nnU-Net raw layout.

Required citation:
O. Bernard, A. Lalande, C. Zotti, F. Cervenansky, et al., "Deep Learning Techniques for Automatic
MRI Cardiac Multi-structures Segmentation and Diagnosis: Is the Problem Solved?", IEEE Transactions
on Medical Imaging 37(11):2514-2525, 2018.

Data licence: CC BY-NC-SA 4.0 (non-commercial, share-alike). The weights carry the same terms.
Research use only.
""",
    attribution="Trained on ACDC (Bernard et al., IEEE TMI 2018), CC BY-NC-SA 4.0; research use only",
    authors=["O. Bernard", "A. Lalande", "C. Zotti", "F. Cervenansky", "segnode (training)"],
    source_url="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
    training_description=(
        "ACDC training set (MICCAI 2017), ED and ES cine short-axis MRI of 70 patients from the "
        "SSL4MIS/3DCardiac HDF5 copy, intensities min-max normalised per volume, spacing assumed "
        "1.5625 x 1.5625 x 10 mm (lost upstream); patient-level split 56 train / 14 held out"
    ),
)


@dataclass
class PackageSpec:
    name: str
    version: str
    description: str
    modality: str
    licence: LicenceInfo
    limitations: list[str] = field(default_factory=list)
    orientation: str = "LPS"
    dataset_name: str = "held-out patients"


def labels_for(plan: Plan) -> list[Label]:
    out = []
    for name, value in sorted(plan.labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        code = KNOWN_TYPES.get(name.strip().lower())
        if code is None:
            raise ValueError(
                f"no SNOMED CT code known for label {name!r}; add it to trainer.package.KNOWN_TYPES"
            )
        out.append(Label(value=value, name=name, category=ANATOMICAL_STRUCTURE, type=code))
    return out


def metrics_from_summary(
    summary: dict[str, Any], per_case: list[dict[str, str]], dataset: str, reference: str, suffix: str = ""
) -> list[Metric]:
    """Manifest metrics (Dice and HD95 per class, mean Dice) from ``evaluate``'s summary and CSV rows."""
    out = []
    how = f"{summary.get('mode', '?')} window inference"
    if suffix:
        how += ", largest 3D connected component per class (26-connectivity)"
    overall = summary["overall"]
    for cls in summary["classes"]:
        for key, name, col in (
            ("dice_mean", "dice", f"dice_{cls}"),
            ("hd95_mm_mean", "hd95_mm", f"hd95_mm_{cls}"),
        ):
            pc = {}
            for row in per_case:
                try:
                    v = float(row[col])
                except (KeyError, ValueError):
                    continue
                if v == v:  # not NaN
                    pc[row["case"]] = round(v, 4)
            out.append(
                Metric(
                    name=f"{name}_{cls}{suffix}",
                    value=round(float(overall[cls][key]), 4),
                    dataset=dataset,
                    cases=int(overall["cases"]),
                    reference=reference,
                    per_case=pc,
                    notes=f"median {overall[cls][key.replace('mean', 'median')]:.4f}; {how}",
                )
            )
    out.append(
        Metric(
            name=f"dice_mean_foreground{suffix}",
            value=round(float(overall["mean_dice"]), 4),
            dataset=dataset,
            cases=int(overall["cases"]),
            reference=reference,
            notes="mean of the per-class mean Dice over " + ", ".join(summary["classes"]) + f"; {how}",
        )
    )
    return out


def package(
    onnx_path: Path,
    plan: Plan,
    spec: PackageSpec,
    models_root: Path,
    parameters: int,
    metrics: list[Metric],
    extras: dict[str, Path] | None = None,
) -> Bundle:
    """Publish ``models_root/<name>/<version>/`` (atomically, every file hashed and re-verified)."""
    staging = staging_dir(models_root, spec.name, spec.version)
    try:
        shutil.copyfile(onnx_path, staging / "model.onnx")
        (staging / "LICENSE").write_text(spec.licence.text, encoding="utf-8")
        (staging / "NOTICE").write_text(spec.licence.notice, encoding="utf-8")
        for name, path in (extras or {}).items():
            shutil.copyfile(path, staging / name)
        patch = plan.full_patch()
        arch = (
            f"MONAI DynUNet, {plan.dim}D, {len(plan.strides)} levels, filters {plan.filters}, "
            f"strides {plan.strides}, {plan.norm} norm, leaky ReLU; trained with segnode-train"
        )
        if plan.dim == 2:
            arch += (
                f"; applied slice by slice on axes {[a for a in range(3) if a != plan.slice_axis]} "
                f"(input (N, C, H, W), any H, W divisible by "
                f"{int(__import__('math').prod(s[0] for s in plan.strides))})"
            )
        manifest = Manifest(
            name=spec.name,
            version=spec.version,
            task="segmentation",
            description=spec.description,
            modality=[spec.modality],  # type: ignore[list-item]
            architecture=Architecture(
                name=f"DynUNet-{plan.dim}D" if plan.network == "dynunet" else plan.network,
                parameters=parameters,
                description=arch,
            ),
            labels=labels_for(plan),
            input=InputSpec(
                spacing_mm=(plan.spacing[0], plan.spacing[1], plan.spacing[2]),
                orientation=spec.orientation,  # type: ignore[arg-type]
                channels=len(plan.channels),
                patch_size=patch,
                normalisation={
                    spec.modality: Normalisation(
                        method=plan.normalisation["channels"][0]["method"],
                        description=(
                            "z-score over the whole volume of one phase: (x - mean) / std"
                            if plan.normalisation["channels"][0]["method"] == "zscore"
                            else json.dumps(plan.normalisation["channels"][0])
                        ),
                    )
                },
            ),
            output=OutputSpec(
                channels=plan.num_classes, activation="softmax", patch_size=patch, offset=(0, 0, 0)
            ),
            backends=[
                BackendFile(
                    name="onnxruntime",
                    file="model.onnx",
                    sha256=sha256_file(staging / "model.onnx"),
                    format="onnx",
                    opset=OPSET,
                    dynamic_spatial=True,
                )
            ],
            licence=Licence(
                spdx=spec.licence.spdx,
                text=FileRef(file="LICENSE", sha256=sha256_file(staging / "LICENSE")),
                notice=FileRef(file="NOTICE", sha256=sha256_file(staging / "NOTICE")),
                attribution=spec.licence.attribution,
                authors=spec.licence.authors,
                source_url=spec.licence.source_url,
            ),
            training_data=TrainingData(
                description=spec.licence.training_description,
                public=spec.licence.public,
                licence=spec.licence.spdx,
            ),
            metrics=metrics,
            limitations=spec.limitations,
        )
        return publish(staging, manifest, models_root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


CARDIAC_LIMITATIONS = [
    "research use only: not a medical device, not for clinical decisions",
    "CC BY-NC-SA 4.0 (from the ACDC training data): no commercial use; derivatives share alike",
    "trained on ACDC only (one centre, Dijon, 1.5 T and 3 T Siemens); other vendors and protocols "
    "are unvalidated",
    "ACDC spacing and orientation were lost upstream: trained at an assumed 1.5625 mm in-plane; rotation "
    "(+-180 degrees) and flip augmentation make it tolerant of in-plane orientation",
    "the output is raw: the pipeline's post-processing (largest component) is not part of the network",
]
