// Reads DICOM-SEG files the way OHIF does: @cornerstonejs/adapters,
// adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer (dcmjs underneath).
//
//   node read_seg.mjs jobs.json
//
// jobs.json: [{"name", "seg": path, "out": folder, "images": [source image metadata, one per
// referenced image, in the order the label maps are wanted]}]. For each job the decoded label maps
// (one per layer: Cornerstone splits overlapping segments into layers) are written to
// <out>/layer<k>.u8 as the images' pixels one after another (uint8, rows x columns each), and a
// summary is printed as one JSON object keyed by job name on stdout.
import fs from 'node:fs';
import path from 'node:path';
import * as core from '@cornerstonejs/core';
import { adaptersSEG } from '@cornerstonejs/adapters';

const jobs = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const images = new Map();

function metadata(type, imageId) {
  const m = images.get(imageId);
  if (!m) return undefined;
  const iop = m.imageOrientationPatient;
  switch (type) {
    case 'imagePlaneModule':
      return {
        rows: m.rows,
        columns: m.columns,
        frameOfReferenceUID: m.frameOfReferenceUID,
        imageOrientationPatient: iop,
        rowCosines: iop.slice(0, 3),
        columnCosines: iop.slice(3, 6),
        imagePositionPatient: m.imagePositionPatient,
        pixelSpacing: m.pixelSpacing,
        rowPixelSpacing: m.pixelSpacing[0],
        columnPixelSpacing: m.pixelSpacing[1],
        sliceThickness: m.sliceThickness,
      };
    case 'generalSeriesModule':
      return { seriesInstanceUID: m.seriesInstanceUID, studyInstanceUID: m.studyInstanceUID, modality: m.modality };
    case 'generalImageModule':
      return { sopInstanceUID: m.sopInstanceUID };
    case 'sopCommonModule':
      return { sopInstanceUID: m.sopInstanceUID, sopClassUID: m.sopClassUID };
    case 'imagePixelModule':
      return {
        rows: m.rows,
        columns: m.columns,
        samplesPerPixel: 1,
        bitsAllocated: 16,
        bitsStored: 16,
        highBit: 15,
        pixelRepresentation: 1,
        photometricInterpretation: 'MONOCHROME2',
      };
    case 'instance':
      return {
        Rows: m.rows,
        Columns: m.columns,
        SOPInstanceUID: m.sopInstanceUID,
        SOPClassUID: m.sopClassUID,
        SeriesInstanceUID: m.seriesInstanceUID,
        StudyInstanceUID: m.studyInstanceUID,
        FrameOfReferenceUID: m.frameOfReferenceUID,
        Modality: m.modality,
        ImagePositionPatient: m.imagePositionPatient,
        ImageOrientationPatient: iop,
        PixelSpacing: m.pixelSpacing,
      };
    default:
      return undefined;
  }
}

const provider = { get: metadata };
core.metaData.addProvider(metadata, 10000);
// The adapter's own logging goes to stdout; keep stdout for the result.
console.log = (...args) => console.error(...args);
console.info = console.log;

const results = {};
for (const job of jobs) {
  try {
    const imageIds = job.images.map((m, i) => {
      const id = `segnode:${job.name}:${i}`;
      images.set(id, m);
      return id;
    });
    const bytes = fs.readFileSync(job.seg);
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(imageIds, buffer, {
      metadataProvider: provider,
    });
    fs.mkdirSync(job.out, { recursive: true });
    const files = [];
    let bytesPerVoxel = 1;
    result.labelMapImages.forEach((layer, k) => {
      const planes = layer.map((image) =>
        image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData(),
      );
      const file = path.join(job.out, `layer${k}.u8`);
      bytesPerVoxel = planes.length ? planes[0].BYTES_PER_ELEMENT : 1;
      fs.writeFileSync(file, Buffer.concat(planes.map((p) => Buffer.from(p.buffer, p.byteOffset, p.byteLength))));
      files.push(file);
    });
    const segments = [];
    (result.segMetadata?.data ?? []).forEach((segment, index) => {
      if (segment) segments.push({ number: index, label: segment.SegmentLabel ?? null });
    });
    results[job.name] = { overlapping: Boolean(result.overlappingSegments), files, bytesPerVoxel, segments };
  } catch (error) {
    results[job.name] = { error: String(error?.stack ?? error) };
  }
}
process.stdout.write(JSON.stringify(results));
