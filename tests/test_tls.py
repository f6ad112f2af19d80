"""DIMSE over TLS, with mutual authentication when a CA is configured."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.db.models import Instance
from tests.conftest import RunningNode, dcmtk_env, need_tool, start_node
from tests.dimse_peers import associate, scu_ae
from tests.factories import SeriesSpec, ct_series, write_series


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([need_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=segnode test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    for name in ("server", "client", "rogue"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", "-extfile", "san.ext", cwd=d)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "rogue.csr", "-signkey", "rogue.key", "-days", "2", "-out", "rogue.crt", cwd=d
    )
    return d


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path) -> Iterator[RunningNode]:
    running = start_node(
        tmp_path / "st",
        extra_env={
            "SEGNODE_DIMSE__TLS__ENABLED": "true",
            "SEGNODE_DIMSE__TLS__CERTIFICATE": str(pki / "server.crt"),
            "SEGNODE_DIMSE__TLS__KEY": str(pki / "server.key"),
            "SEGNODE_DIMSE__TLS__CA": str(pki / "ca.crt"),
        },
    )
    yield running
    running.stop()


def _client_ctx(pki: Path, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def _count(node: RunningNode) -> int:
    with node.sessions()() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_mutual_tls_accepts_trusted_client(tls_node: RunningNode, pki: Path) -> None:
    ae = scu_ae("TLSSCU")
    assoc = associate(
        ae,
        tls_node.dimse_port,
        ae_title=tls_node.ae_title,
        tls_args=(_client_ctx(pki, "client"), "localhost"),
    )
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in ct_series(SeriesSpec(n=3))]
    assoc.release()
    assert statuses == [0, 0, 0]
    assert _count(tls_node) == 3


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_mutual_tls_refuses_client_without_trusted_certificate(
    tls_node: RunningNode, pki: Path, cert: str | None
) -> None:
    ae = scu_ae("TLSSCU")
    assoc = associate(
        ae,
        tls_node.dimse_port,
        ae_title=tls_node.ae_title,
        tls_args=(_client_ctx(pki, cert), "localhost"),
    )
    if assoc.is_established:  # TLS 1.3 reports a refused client certificate after the handshake
        rsp = assoc.send_c_store(ct_series(SeriesSpec(n=1))[0])
        assert "Status" not in rsp or int(rsp.Status) != 0
        assoc.abort()
    assert _count(tls_node) == 0


def test_plain_tcp_client_cannot_store_on_tls_port(tls_node: RunningNode) -> None:
    ae = scu_ae("PLAIN")
    ae.acse_timeout = 5
    assoc = associate(ae, tls_node.dimse_port, ae_title=tls_node.ae_title)
    assert not assoc.is_established
    assert _count(tls_node) == 0


def test_dcmtk_storescu_over_tls(tls_node: RunningNode, pki: Path, tmp_path: Path) -> None:
    paths = write_series(ct_series(SeriesSpec(n=2)), tmp_path / "in")
    cmd = [
        need_tool("storescu"), "-aet", "DCMTKTLS", "-aec", tls_node.ae_title,
        "+tls", str(pki / "client.key"), str(pki / "client.crt"), "-ic", "+cf", str(pki / "ca.crt"),
        "127.0.0.1", str(tls_node.dimse_port), *map(str, paths),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    if "unrecognized option" in proc.stderr.lower() or (
        "+tls" in proc.stderr and "unknown" in proc.stderr.lower()
    ):
        pytest.skip("this DCMTK build has no TLS support")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _count(tls_node) == 2
