"""Segmentation pipelines: series -> volume -> model -> post-processing -> DICOM-SEG/SR."""
