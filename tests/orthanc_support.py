"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the end-to-end tests, in a private
network namespace.

Orthanc has no bind-address option: it always listens on 0.0.0.0. So the tests run it inside a network
namespace of its own whose only interface is ``lo``; nothing outside that namespace can reach it, and
its fixed ports cannot collide with anything else on the machine. Everything that talks to it lives in
the same namespace: ``segnode serve`` and DCMTK are started through ``nsenter --net=...`` (``wrap``);
Python clients (dicomweb-client, requests, pynetdicom) run in a thread that joined the namespace with
``setns(2)`` (``call``); a socket keeps the namespace it was created in.

The namespace is held by a small process (``unshare --net``) that exits when its stdin closes, so it
vanishes with the test process even when that process is killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
ORTHANC_DIR = REPO / "orthanc"
ORTHANC_CONFIG = ORTHANC_DIR / "orthanc.json"
ROUTING_SCRIPT = ORTHANC_DIR / "route_to_segnode.lua"
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def need_orthanc() -> Path:
    """Skip unless Orthanc, its DICOMweb plugin, nsenter/unshare and the right to use them are here."""
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY}; make test installs the orthanc package)")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(
            f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; package orthanc-dicomweb)"
        )
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(
                f"{tool} is not installed (util-linux / iproute2); Orthanc runs in a network namespace"
            )
    if os.geteuid() != 0:
        pytest.skip("Orthanc runs in a private network namespace, which needs root (CAP_SYS_ADMIN)")
    return ORTHANC_BINARY


class NetNamespace:
    """A network namespace with only ``lo`` (up), held by a child process for its lifetime."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
        )
        self.path = f"/proc/{self._holder.pid}/ns/net"
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:  # the holder's namespace differs from ours once unshare(2) has run
            if self._holder.poll() is not None:
                raise RuntimeError(f"unshare --net exited with {self._holder.returncode}")
            try:
                if os.readlink(self.path) != own:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the network namespace holder did not start")
            time.sleep(0.01)
        subprocess.run(self.wrap(["ip", "link", "set", "lo", "up"]), check=True)

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace (nsenter execs it: the PID is the command's own)."""
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that joined the namespace; its sockets connect inside it."""
        result: list[T] = []
        error: list[BaseException] = []

        def _inner() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        thread = threading.Thread(target=_inner, name="in-netns", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def namespace_id(self) -> str:
        return os.readlink(self.path)

    def free_port(self) -> int:
        import socket

        def _pick() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])

        return self.call(_pick)

    def close(self) -> None:
        if self._holder.poll() is None and self._holder.stdin is not None:
            self._holder.stdin.close()
            try:
                self._holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()


@dataclass
class OrthancPeer:
    """A DICOM peer Orthanc knows in its DicomModalities (by name)."""

    name: str
    aet: str
    port: int


def orthanc_config(
    *,
    storage: Path,
    http_port: int,
    dicom_port: int,
    segnode: OrthancPeer,
    modality: OrthancPeer,
    stable_age: int = 1,
    aet: str = "ORTHANC",
    base: Path = ORTHANC_CONFIG,
) -> dict[str, Any]:
    """The shipped configuration with this run's ports, folders and peers (all on 127.0.0.1)."""
    config: dict[str, Any] = json.loads(base.read_text(encoding="utf-8"))
    config.update(
        {
            "Name": "segnode-e2e",
            "StorageDirectory": str(storage / "storage"),
            "IndexDirectory": str(storage / "index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": aet,
            "StableAge": stable_age,
            "LuaScripts": [str(ROUTING_SCRIPT)],
            "Plugins": [str(DICOMWEB_PLUGIN)],
        }
    )
    modalities = config["DicomModalities"]
    modalities[segnode.name].update({"AET": segnode.aet, "Host": "127.0.0.1", "Port": segnode.port})
    modalities[modality.name].update({"AET": modality.aet, "Host": "127.0.0.1", "Port": modality.port})
    config["Segnode"].update({"Modality": segnode.name, "AET": segnode.aet})
    return config


PRODUCTION_CONFIG = ORTHANC_DIR / "orthanc-production.json"


def production_config(
    *, storage: Path, http_port: int, dicom_port: int, users: dict[str, str]
) -> dict[str, Any]:
    """orthanc-production.json as shipped, but for this run's ports, folders and passwords; its peers
    keep their (unresolvable) example host names."""
    config: dict[str, Any] = json.loads(PRODUCTION_CONFIG.read_text(encoding="utf-8"))
    config.update(
        {
            "StorageDirectory": str(storage / "storage"),
            "IndexDirectory": str(storage / "index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "RegisteredUsers": dict(users),
            "LuaScripts": [str(ROUTING_SCRIPT)],
            "Plugins": [str(DICOMWEB_PLUGIN)],
        }
    )
    return config


@dataclass
class Orthanc:
    netns: NetNamespace
    folder: Path
    config: dict[str, Any]
    auth: tuple[str, str] | None = None  # HTTP basic credentials for our own REST calls
    ca: Path | None = None  # the certificate to trust when SslEnabled
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    _starts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "orthanc.log"

    @property
    def http_port(self) -> int:
        return int(self.config["HttpPort"])

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    @property
    def aet(self) -> str:
        return str(self.config["DicomAet"])

    @property
    def url(self) -> str:
        scheme = "https" if self.config.get("SslEnabled") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60) -> None:
        """Start (or restart, same storage) and wait until GET /system answers."""
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        self._starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self._starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.netns.wrap([str(ORTHANC_BINARY), "--verbose", str(config_path)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                system = self.get_json("/system", timeout=2)
                if system.get("DicomAet") == self.aet:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Orthanc did not answer /system within {timeout}s:\n{self.log()[-6000:]}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- REST, from inside the namespace -------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        timeout: float = 30,
        auth: tuple[str, str] | bool | None = True,
    ) -> bytes:
        """One REST call from inside the namespace; ``auth=True`` uses ``self.auth``, None/False none."""
        import base64
        import ssl
        import urllib.request

        credentials = self.auth if auth is True else auth or None
        headers = {}
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None

        def _do() -> bytes:
            req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
            with urllib.request.urlopen(req, timeout=timeout, context=context) as answer:
                return bytes(answer.read())

        return self.netns.call(_do)

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def put_modality(self, peer: OrthancPeer) -> None:
        """Point a DicomModalities entry somewhere else at run time (e.g. segnode on a new port)."""
        entry = dict(self.config["DicomModalities"][peer.name])
        entry.update({"AET": peer.aet, "Host": "127.0.0.1", "Port": peer.port})
        self.config["DicomModalities"][peer.name] = entry
        self.request("PUT", f"/modalities/{peer.name}", json.dumps(entry).encode())

    def series_id(self, series_uid: str) -> str | None:
        body = json.dumps({"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}}).encode()
        found = json.loads(self.request("POST", "/tools/find", body))
        return str(found[0]) if found else None

    def forget_series(self, series_uid: str) -> None:
        """Delete a series from Orthanc (a module-scoped Orthanc receives the same real series twice)."""
        sid = self.series_id(series_uid)
        if sid is not None:
            self.request("DELETE", f"/series/{sid}")

    def routing_decision(self, series_uid: str) -> str | None:
        """What route_to_segnode.lua wrote for this series (None until it ran)."""
        import urllib.error

        sid = self.series_id(series_uid)
        if sid is None:
            return None
        try:
            return self.request("GET", f"/series/{sid}/metadata/SegnodeRouting").decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/jobs/{job_id}"))

    def dicomweb(self, auth: tuple[str, str] | None = None) -> Any:
        """A dicomweb-client; call its methods inside ``netns.call`` (sockets are made there)."""
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(*auth) if auth else None
        if session is not None and self.ca is not None:
            session.verify = str(self.ca)
        return DICOMwebClient(url=self.dicomweb_url, session=session)


_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


def storescu(
    netns: NetNamespace,
    files: Sequence[Path],
    *,
    port: int,
    called: str = "ORTHANC",
    calling: str = "MODALITY",
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu from inside the namespace (TCP_NODELAY=1: Debian's DCMTK stalls otherwise)."""
    import pydicom

    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    # -R: propose just the SOP classes of the files (SEG is not in storescu's default list); storescu
    # proposes uncompressed syntaxes unless told otherwise, and cannot decode JPEG 2000
    with warnings.catch_warnings():  # real data with invalid UIDs is sent as it is
        warnings.simplefilter("ignore", UserWarning)
        syntaxes = {
            str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files
        }
    propose = [_STORESCU_PROPOSE[ts] for ts in sorted(syntaxes) if ts in _STORESCU_PROPOSE]
    if len(set(propose)) > 1:
        raise ValueError(f"send one transfer syntax per storescu call, not {sorted(syntaxes)}")
    cmd = [
        "storescu",
        "-R",
        *propose[:1],
        "-aet",
        calling,
        "-aec",
        called,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(
        netns.wrap(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class OrthancSite:
    """Orthanc and the segnode it forwards to, in one private network namespace.

    segnode's DIMSE port is fixed for the site, so Orthanc's DicomModalities entry stays right when a
    test restarts segnode. segnode's destinations: ``orthanc`` (C-STORE to Orthanc; its AE title also
    makes ``sender`` resolve to it) and ``orthanc-web`` (STOW-RS to Orthanc's /dicom-web).
    """

    netns: NetNamespace
    orthanc: Orthanc
    segnode_port: int
    segnode_aet: str = "SEGNODE"

    def destinations(self) -> dict[str, dict[str, Any]]:
        return {
            "orthanc": {
                "type": "dimse",
                "ae_title": self.orthanc.aet,
                "host": "127.0.0.1",
                "port": self.orthanc.dicom_port,
                "description": "Orthanc under test (C-STORE)",
            },
            "orthanc-web": {
                "type": "dicomweb",
                "url": self.orthanc.dicomweb_url,
                "description": "Orthanc under test (STOW-RS)",
            },
        }

    def segnode_env(self, extra_env: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "SEGNODE_NODE__AE_TITLE": self.segnode_aet,
            "SEGNODE_DIMSE__PORT": str(self.segnode_port),
            "SEGNODE_DESTINATIONS": json.dumps(self.destinations()),
        }
        env.update(extra_env or {})
        return env

    def start_segnode(self, storage: Path, extra_env: dict[str, str] | None = None, **kwargs: Any) -> Any:
        """``segnode serve`` inside the namespace (tests.conftest.start_node), Orthanc as destination."""
        from tests.conftest import start_node

        return start_node(
            storage, extra_env=self.segnode_env(extra_env), prefix=self.netns.wrap([]), **kwargs
        )

    def segnode_cli(self, node: Any, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``segnode ARGS`` with ``node``'s environment, inside the namespace (for commands that connect)."""
        from tests.conftest import SEGNODE

        return subprocess.run(
            self.netns.wrap([*SEGNODE, *args]),
            env=node.env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        self.orthanc.stop()
        self.netns.close()


def open_site(folder: Path, *, stable_age: int = 1) -> OrthancSite:
    """A namespace, Orthanc started in it (shipped config, this run's ports) and a port for segnode."""
    need_orthanc()
    netns = NetNamespace()
    try:
        segnode_port = netns.free_port()
        http_port = netns.free_port()
        dicom_port = netns.free_port()
        while len({segnode_port, http_port, dicom_port}) < 3:
            dicom_port = netns.free_port()
        config = orthanc_config(
            storage=folder,
            http_port=http_port,
            dicom_port=dicom_port,
            segnode=OrthancPeer("segnode", "SEGNODE", segnode_port),
            modality=OrthancPeer("modality", "MODALITY", 11113),
            stable_age=stable_age,
        )
        orthanc = Orthanc(netns, folder, config)
        orthanc.start()
    except BaseException:
        netns.close()
        raise
    return OrthancSite(netns, orthanc, segnode_port)
