"""highdicom's standard tables, loaded ahead of the first SEG or SR.

highdicom reads its IOD, module and attribute maps (JSON, about 0.4 s) the first time a SEG or SR is
built and keeps them; a worker process that calls :func:`preload_tables` while it waits for work takes
that cost off its first job.
"""

from __future__ import annotations


def preload_tables() -> None:
    from highdicom import _standard_utils as standard  # private, but the loaders are plain lru_caches

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, name, None)
        if callable(loader):
            loader()
