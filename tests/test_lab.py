"""JupyterLab as a person opens it, through its REST and kernel APIs.

The ``demo_checkout`` fixture (conftest) is a throw-away checkout holding
what ``make demo`` leaves for the first stages (generate, extractive compression,
truncation: the demo's own cell ids, a small toy pool), then JupyterLab serves it the way
``make lab`` does (:func:`cdlib.lab.command`). The test checks that a ``.py`` notebook's
default viewer is jupytext's notebook, that the server hands it out as a notebook, and
that 00_explore, run cell by cell in a kernel started in ``notebooks/`` as JupyterLab
starts it, runs with its default parameters on the demo's traces.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from cdlib import lab

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, root: Path, tmp: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        prefix = tmp / "prefix"  # an environment prefix of its own, so the test leaves .venv alone
        installed = lab.install_settings(prefix=prefix, root=REPO)
        cmd = lab.command(root, port=self.port, token=TOKEN, open_browser=False) + [
            f"--LabApp.app_settings_dir={lab.app_settings_dir(prefix)}",
            f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
            f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        ]
        assert installed.exists()
        self.log = open(tmp / "lab.log", "w")
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
        self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:  # wait on the server answering, not on a fixed sleep
            try:
                self.get("/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp / "lab.log").read_text()[-3000:])
                time.sleep(0.5)

    def request(self, path: str, method: str = "GET", body: dict | None = None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def get(self, path: str):
        return self.request(path)

    def run_cells(self, kernel_id: str, sources: list[str], timeout: float = 300) -> list[dict]:
        """Execute each source in the kernel over its websocket; return one reply per cell
        (status, the error if any, and the cell's text output)."""
        import websocket

        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?token={TOKEN}", timeout=timeout)
        replies = []
        try:
            for src in sources:
                msg_id = uuid.uuid4().hex
                ws.send(json.dumps({
                    "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                               "session": uuid.uuid4().hex, "version": "5.3"},
                    "parent_header": {}, "metadata": {}, "channel": "shell",
                    "content": {"code": src, "silent": False, "store_history": True, "user_expressions": {},
                                "allow_stdin": False, "stop_on_error": True}}))
                # the reply comes on the shell channel, the output on iopub: no order between them, so a
                # cell is done when both its reply and iopub's "idle" (sent after all its output) have come
                text, reply, idle = [], None, False
                while reply is None or not idle:
                    m = json.loads(ws.recv())
                    if m.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    if m["msg_type"] == "stream":
                        text.append(m["content"]["text"])
                    elif m["msg_type"] == "status" and m["content"].get("execution_state") == "idle":
                        idle = True
                    elif m["msg_type"] == "execute_reply":
                        reply = dict(m["content"])
                reply["text"] = "".join(text)
                replies.append(reply)
                if reply["status"] != "ok":
                    break
        finally:
            ws.close()
        return replies

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def served(demo_checkout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    root = demo_checkout
    server = Lab(root, tmp)
    yield server, root
    server.close()


def test_py_notebooks_open_as_notebooks(served):
    server, _ = served
    settings = server.get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    # the override becomes the schema's default, which the front end applies unless a user setting says otherwise
    assert settings["schema"]["properties"]["defaultViewers"]["default"]["python"] == "Jupytext Notebook"
    assert "defaultViewers" not in settings["settings"]
    # the viewer named there exists: jupytext's lab extension is installed and enabled
    page = urllib.request.urlopen(f"{server.base}/lab?token={TOKEN}", timeout=60).read().decode()
    assert "jupyterlab-jupytext" in page
    model = server.get("/api/contents/notebooks/00_explore.py?type=notebook&content=1")
    assert model["type"] == "notebook" and len(model["content"]["cells"]) > 5
    tags = [c["metadata"].get("tags", []) for c in model["content"]["cells"]]
    assert sum("parameters" in t for t in tags) == 1


def test_explore_runs_with_its_defaults_from_notebooks_dir(served):
    """00_explore, opened as a person opens it (kernel in notebooks/), shows the demo's traces."""
    server, root = served
    session = server.request("/api/sessions", "POST", {
        "path": "notebooks/00_explore.py", "type": "notebook", "name": "00_explore.py",
        "kernel": {"name": "python3"}})
    kernel = session["kernel"]["id"]
    cells = server.get("/api/contents/notebooks/00_explore.py?type=notebook&content=1")["content"]["cells"]
    sources = ["import os; print('cwd=' + os.getcwd())"] + [c["source"] for c in cells if c["cell_type"] == "code"]
    # no widgets front end here: the browser cell falls back to the static example
    replies = server.run_cells(kernel, sources)
    failed = [r for r in replies if r["status"] != "ok"]
    assert not failed, failed[0].get("ename", "") + ": " + failed[0].get("evalue", "") + "\n" + "\n".join(
        failed[0].get("traceback", []))[-3000:]
    assert len(replies) == len(sources)
    assert replies[0]["text"].strip() == f"cwd={root / 'notebooks'}"  # JupyterLab's kernel starts there ...
    assert f"working directory: {root}" in "".join(r["text"] for r in replies)  # ... and the notebook moves to the root
    metrics = json.loads((root / "outputs/scratch/explore/metrics.json").read_text())
    assert metrics, "explore wrote no metrics"
    assert (root / "outputs/scratch/explore/fig2_lengths.png").stat().st_size > 1000
    server.request(f"/api/sessions/{session['id']}", "DELETE")


def test_project_root_is_found_from_any_folder_inside(tmp_path):
    from cdlib.notebook import project_root

    assert project_root(REPO / "notebooks") == REPO
    assert project_root(REPO / "cdlib" / "data") == REPO
    assert project_root(tmp_path) is None  # outside a checkout: the working directory stays
