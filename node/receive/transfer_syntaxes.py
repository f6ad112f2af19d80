"""Transfer syntaxes the SCP accepts, in order of preference (uncompressed first)."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

UNCOMPRESSED: list[UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]

COMPRESSED: list[UID] = [
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# Deflated Image Frame Compression (Sup 244), sent by recent toolkits for SEG/labelmaps.
DEFLATED_IMAGE_FRAME_COMPRESSION = UID("1.2.840.10008.1.2.8.1")
COMPRESSED.append(DEFLATED_IMAGE_FRAME_COMPRESSION)

ACCEPTED_TRANSFER_SYNTAXES: list[UID] = UNCOMPRESSED + COMPRESSED
