"""How often pynetdicom's SCU loses a response to its own reactor thread, with and without the guard.

Starts DCMTK ``storescp --fork`` (a fast C-ECHO/C-STORE responder, TCP_NODELAY=1) on a free loopback
port, then runs the same load twice: THREADS associations at once, each sending ECHOES C-ECHOs,
ROUNDS times, with a short DIMSE timeout so a dropped response shows up quickly. "plain" is
pynetdicom as shipped; "guarded" installs ``node.dispatch.reactor_guard.guard_responses`` right
after each association is established (what segnode's dispatcher, demo sender and test SCUs do).
Prints, for each, the responses lost (a send that waited out the DIMSE timeout) and the wall time.

    .venv/bin/python bench/scu_race.py [--threads 8] [--rounds 5] [--echoes 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dispatch.reactor_guard import guard_responses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"storescp exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("storescp did not listen within 20 s")


def _run(port: int, guarded: bool, threads: int, rounds: int, echoes: int) -> tuple[int, float]:
    lost: list[int] = []

    def worker(i: int) -> None:
        ae = AE(ae_title=f"RACE{i}")
        ae.add_requested_context(Verification)
        ae.dimse_timeout = 3
        ae.acse_timeout = ae.network_timeout = 30
        for _ in range(rounds):
            assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
            if not assoc.is_established:
                raise SystemExit("storescp refused the association")
            if guarded:
                guard_responses(assoc)
            for _ in range(echoes):
                if "Status" not in assoc.send_c_echo():
                    lost.append(i)  # the DIMSE timeout ran out; pynetdicom aborted the association
                    break
            if assoc.is_established:
                assoc.release()

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(lost), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--echoes", type=int, default=100)
    args = parser.parse_args()
    tool = shutil.which("storescp")
    if tool is None:
        raise SystemExit("storescp (DCMTK) is not installed: apt-get install dcmtk")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "TCP_NODELAY": "1"}
        proc = subprocess.Popen([tool, "--fork", "-od", out, str(port)], env=env)
        try:
            _wait_for_port(port, proc)
            sys.setswitchinterval(0.0005)  # the GIL hands over as often as on a loaded host
            total = args.threads * args.rounds * args.echoes
            print(f"{args.threads} associations x {args.rounds} rounds x {args.echoes} C-ECHOs: {total}")
            for guarded in (False, True, False, True):
                lost, wall = _run(port, guarded, args.threads, args.rounds, args.echoes)
                label = "guarded" if guarded else "plain  "
                print(f"{label}  responses lost to the reactor: {lost:3d}   wall {wall:5.1f} s")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
