"""``segnode demo``: the whole loop on one machine, end to end.

``lits``: fetch the LiTS case shipped in a PyPI package; ``wrap``: a voxel array with a NIfTI affine
as a DICOM CT series; ``peer``: the local receiving "PACS" (a pynetdicom C-STORE SCP); ``send``: a
C-STORE SCU that times each response; ``timeline``: the per-stage timeline from the audit trail;
``preview``: a PNG of the SEG over the source; ``run``: the demo itself.
"""
