"""A real `rollout serve` process for the HTTP tests: this checkout's code, on a free loopback
port, its log in a file the tests can read."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, api_key: str | None):
        self.proc, self.url, self.log_path, self.api_key = proc, url, log, api_key

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120.0) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers=self.headers, timeout=timeout,
                             trust_env=False)

    def async_client(self, timeout: float = 120.0, connections: int = 100) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                  trust_env=False,
                                  limits=httpx2.Limits(max_connections=connections,
                                                       max_keepalive_connections=connections))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def env() -> dict:
    """This checkout first on the path (in CI it is also the installed one)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


@contextmanager
def rollout_serve(model: Path, *args: str, api_key: str | None = None, ready_s: float = 180.0):
    port = free_port()
    cmd = [sys.executable, "-m", "rollout.cli", "serve", "--model", str(model), "--port",
           str(port), *args, *(["--api-key", api_key] if api_key else [])]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out,
                                    stderr=subprocess.STDOUT)
        served = Served(proc, f"http://127.0.0.1:{port}", log, api_key)
        try:
            _wait_ready(served, ready_s)
            yield served
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(served: Served, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with served.client(timeout=5) as client:
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                raise RuntimeError(f"rollout serve exited with {served.proc.returncode}:\n"
                                   f"{served.log()[-4000:]}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"rollout serve did not answer /health within {timeout_s:g} s:\n"
                       f"{served.log()[-4000:]}")
