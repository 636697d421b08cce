"""Shared fixtures: a real ``mlflow server`` on 127.0.0.1 that a test can stop and restart.

Why: teams track runs on an MLflow tracking server over HTTP, and the tracker's promise
(training never waits on it; every metric arrives once it answers) only means something
against the real server process. ``mlflow_server`` starts one on a free port with a sqlite
backend and served artifacts in the test's tmp dir (about 10 s on a loaded 2-core machine)
and stops it afterwards; ``server.stop()`` / ``server.start()`` restart it on the same port
and backend, as an operator's restart would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` process (and its uvicorn worker) in a process group of its own."""

    def __init__(self, root: Path, port: int):
        self.root = Path(root)
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.backend = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = self.root / "mlartifacts"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and wait until /health answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--workers", "1"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", self.backend]
        cmd += ["--serve-artifacts", "--artifacts-destination", str(self.artifacts)]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server on port {self.port} did not start:\n{tail}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the server's process group (SIGKILL after 30 s); wait until all of it is gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 30  # the uvicorn worker may outlive its parent briefly
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.1)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A running ``mlflow server`` (sqlite backend, served artifacts) under tmp_path/mlflow."""
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
