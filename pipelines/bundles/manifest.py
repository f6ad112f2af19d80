"""The ``manifest.yaml`` of a model bundle: a validated description of the model and its files.

A bundle is a folder ``<models>/<name>/<version>/`` holding ``manifest.yaml`` and the files the manifest
names (weights per backend, licence, notice), each with its sha256. The manifest says what the model does
(task, modality, labels coded in SNOMED CT), what it expects (spacing, orientation, normalisation, patch)
and returns (activation, threshold, output block), where it comes from (licence, attribution, training
data, provenance) and how well it did (metrics). Validation is eager and every message names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.yaml"

_NAME = r"^[a-z0-9][a-z0-9._-]{0,99}$"
_VERSION = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

Sha256 = Annotated[str, Field(pattern=_SHA256, description="Lower-case hex SHA-256 of the file.")]
Modality = Literal["CT", "MR", "PT", "US", "CR", "DX", "MG", "NM"]
Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_file_name(value: str) -> str:
    if not _FILE.match(value) or value in (".", ".."):
        raise ValueError(
            "a bundle file is a plain file name in the bundle folder (letters, digits, '.', '_', '-'), "
            f"not {value!r}"
        )
    return value


class Code(_Model):
    """A coded concept, e.g. ``(10200004, SCT, "Liver")``."""

    scheme: str = Field(min_length=1, max_length=16, description="Coding scheme designator, e.g. SCT, DCM.")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class Label(_Model):
    value: int = Field(ge=1, le=65535, description="Label value in the model output (1-based).")
    name: str = Field(min_length=1, max_length=64)
    category: Code = Field(description="Segmented property category (CID 7150).")
    type: Code = Field(description="Segmented property type (CID 7151).")
    anatomic_region: Code | None = Field(
        None, description="Anatomic region (CID 4031), where the type needs one."
    )


class Normalisation(_Model):
    method: str = Field(
        min_length=1, max_length=64, description="Name of the method the pipeline implements."
    )
    description: str = Field(min_length=1)


class InputSpec(_Model):
    spacing_mm: Triple
    orientation: Literal["RAS", "LPS"]
    channels: int = Field(1, ge=1)
    patch_size: IntTriple
    normalisation: dict[str, Normalisation] = Field(description="Per modality.")

    @field_validator("spacing_mm")
    @classmethod
    def _positive(cls, value: Triple) -> Triple:
        if any(v <= 0 for v in value):
            raise ValueError("every spacing must be > 0")
        return value

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: IntTriple) -> IntTriple:
        if any(v < 1 for v in value):
            raise ValueError("every patch size must be >= 1")
        return value


class OutputSpec(_Model):
    channels: int = Field(1, ge=1)
    activation: Literal["sigmoid", "softmax", "none"]
    threshold: float | None = Field(None, gt=0, lt=1)
    patch_size: IntTriple
    offset: IntTriple = Field(description="Input voxel index of output voxel 0, per axis.")


class BackendFile(_Model):
    name: Literal["onnxruntime", "torch"]
    file: str
    sha256: Sha256
    format: Literal["onnx", "torch_state_dict"]
    opset: int | None = Field(None, ge=7)
    module: str | None = Field(
        None, description="For torch: 'pipelines.<module>:<Class>', built without arguments."
    )
    dynamic_spatial: bool = Field(False, description="Whether the spatial input size may vary.")

    @field_validator("file")
    @classmethod
    def _file_name(cls, value: str) -> str:
        return _check_file_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> BackendFile:
        if self.name == "onnxruntime" and self.format != "onnx":
            raise ValueError("the onnxruntime backend takes format 'onnx'")
        if self.name == "torch":
            if self.format != "torch_state_dict":
                raise ValueError("the torch backend takes format 'torch_state_dict'")
            if not self.module or not re.match(r"^pipelines(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*$", self.module):
                raise ValueError(
                    "the torch backend needs module 'pipelines.<module>:<Class>' "
                    "(pipelines never import trainer/)"
                )
        return self


class FileRef(_Model):
    file: str
    sha256: Sha256

    @field_validator("file")
    @classmethod
    def _file_name(cls, value: str) -> str:
        return _check_file_name(value)


class Licence(_Model):
    spdx: str = Field(min_length=1, description="SPDX identifier, e.g. Apache-2.0.")
    text: FileRef = Field(description="The licence text.")
    notice: FileRef | None = Field(None, description="NOTICE file with the attribution.")
    attribution: str = Field(min_length=1)
    authors: list[str] = Field(min_length=1)
    source_url: str = Field(min_length=1)


class TrainingData(_Model):
    description: str = Field(min_length=1)
    public: bool
    licence: str | None = None


class Metric(_Model):
    name: str = Field(min_length=1)
    value: float
    dataset: str = Field(min_length=1)
    cases: int = Field(ge=1)
    reference: str = Field(min_length=1, description="What the prediction was compared with.")
    per_case: dict[str, float] = Field(default_factory=dict)
    notes: str | None = None


class Provenance(_Model):
    package: str
    package_version: str
    archive: str
    archive_sha256: Sha256
    weights_file: str
    weights_sha256: Sha256
    converter: str
    conversion_max_abs_diff: dict[str, float] = Field(default_factory=dict)


class Architecture(_Model):
    name: str = Field(min_length=1)
    parameters: int = Field(ge=1)
    description: str = Field(min_length=1)


class Manifest(_Model):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=_NAME)
    version: str = Field(pattern=_VERSION)
    task: Literal["segmentation"]
    description: str = Field(min_length=1)
    modality: list[Modality] = Field(min_length=1)
    architecture: Architecture
    labels: list[Label] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    backends: list[BackendFile] = Field(min_length=1)
    licence: Licence
    training_data: TrainingData
    metrics: list[Metric] = Field(default_factory=list)
    limitations: list[str] = Field(default_factory=list, description="What users of the model must know.")
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"labels: values must be unique, got {values}")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backends: one entry per backend, got {names}")
        files = self.files()
        if len(set(files)) != len(files):
            raise ValueError(f"every file must be listed once, got {files}")
        if "manifest.yaml" in files:
            raise ValueError("manifest.yaml cannot be one of the bundle's files")
        for modality in self.input.normalisation:
            if modality not in self.modality:
                raise ValueError(f"input.normalisation: {modality!r} is not one of modality {self.modality}")
        for modality in self.modality:
            if modality not in self.input.normalisation:
                raise ValueError(f"input.normalisation: no entry for modality {modality!r}")
        for axis in range(3):
            end = self.output.offset[axis] + self.output.patch_size[axis]
            if end > self.input.patch_size[axis]:
                raise ValueError(
                    f"output: offset + patch_size {end} exceeds input.patch_size "
                    f"{self.input.patch_size[axis]} on axis {axis}"
                )
        return self

    def files(self) -> list[str]:
        """Every file of the bundle besides the manifest."""
        out = [b.file for b in self.backends] + [self.licence.text.file]
        if self.licence.notice is not None:
            out.append(self.licence.notice.file)
        return out

    def expected_hashes(self) -> dict[str, str]:
        out = {b.file: b.sha256 for b in self.backends}
        out[self.licence.text.file] = self.licence.text.sha256
        if self.licence.notice is not None:
            out[self.licence.notice.file] = self.licence.notice.sha256
        return out

    def backend(self, name: str) -> BackendFile | None:
        return next((b for b in self.backends if b.name == name), None)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the field path, e.g. ``labels.0.category.value: ...``."""
    lines = [f"invalid model manifest {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)
