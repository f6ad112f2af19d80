"""PyTorch rebuild of the pretrained liver and liver-lesion networks of ``pyliverlesionseg==0.3``
(Xikai Tang, Georg Schramm, KU Leuven; Apache-2.0) and their conversion into model bundles.

Nothing here is trained: the weights are read from the package's Keras HDF5 files at install time
(``segnode models install ct-liver``) and never committed.
"""

LIVER_BUNDLE = "pyliverlesionseg-liver"
LESION_BUNDLE = "pyliverlesionseg-liver-lesion"
BUNDLE_VERSION = "0.3.0"
INSTALL_TARGET = "ct-liver"
