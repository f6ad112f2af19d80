"""Real DIMSE peers for tests: DCMTK command-line tools and pynetdicom SCUs."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts

from node.dispatch.reactor_guard import guard_responses
from node.receive.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES
from tests.conftest import RunningNode, dcmtk_env, need_tool


def storescu(
    node: RunningNode,
    paths: Sequence[Path],
    *,
    calling: str = "TESTSCU",
    called: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    tool = need_tool("storescu")
    cmd = [
        tool,
        "-aet",
        calling,
        "-aec",
        called or node.ae_title,
        *extra,
        "127.0.0.1",
        str(node.dimse_port),
        *map(str, paths),
    ]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def echoscu(node: RunningNode, *, calling: str = "TESTSCU", called: str | None = None) -> int:
    tool = need_tool("echoscu")
    proc = subprocess.run(
        [tool, "-aet", calling, "-aec", called or node.ae_title, "127.0.0.1", str(node.dimse_port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode


def scu_ae(calling: str = "PYSCU", transfer_syntaxes: Sequence[str] | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ts = list(transfer_syntaxes or ACCEPTED_TRANSFER_SYNTAXES[:3])
    for cx in StoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax, ts)
    return ae


def associate(ae: AE, port: int, *, ae_title: str, **assoc_kw: Any) -> Association:
    """``ae.associate`` on 127.0.0.1 with pynetdicom's reactor kept off the C-STORE responses
    (``node.dispatch.reactor_guard``: without it a fast answer is sometimes dropped and the send
    waits out the DIMSE timeout)."""
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, **assoc_kw)
    guard_responses(assoc)
    return assoc


def send_datasets(
    node: RunningNode, datasets: Sequence[Dataset | Path], *, calling: str = "PYSCU", **assoc_kw: Any
) -> list[int]:
    """One association; returns the status of every C-STORE in order."""
    ae = scu_ae(calling)
    assoc = associate(ae, node.dimse_port, ae_title=node.ae_title, **assoc_kw)
    assert assoc.is_established, "association not established"
    statuses = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses
