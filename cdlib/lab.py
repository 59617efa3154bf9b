"""JupyterLab as this project opens it: ``make lab`` (= ``python -m cdlib.lab``).

* The percent-format ``.py`` notebooks open as notebooks on a double-click: the
  project's settings file ``jupyter/compress-distill.json`` makes jupytext's
  "Jupytext Notebook" the default viewer of Python files. It is installed as an
  application-level override (``<prefix>/share/jupyter/lab/settings/overrides.d/``),
  which leaves a user's own ``overrides.json`` and user settings alone.
* The server's root is the repository, so ``outputs/`` is browsable beside
  ``notebooks/``; the browser opens on ``notebooks/``. Kernels start in the
  notebook's folder, and every notebook's validation cell moves to the repository
  root (:func:`cdlib.notebook.enter_project_root`), so its default paths
  (``outputs/demo/...``, what ``make demo`` leaves) resolve.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cdlib.notebook import project_root

SETTINGS_NAME = "compress-distill.json"


def settings_file(root: str | Path | None = None) -> Path:
    """The project's JupyterLab settings overrides (``jupyter/compress-distill.json``)."""
    base = Path(root) if root is not None else project_root(Path(__file__).parent)
    if base is None:
        raise FileNotFoundError("cdlib.lab: no compress-distill checkout found above cdlib/; pass root=")
    return base / "jupyter" / SETTINGS_NAME


def app_settings_dir(prefix: str | Path = sys.prefix) -> Path:
    """JupyterLab's application settings directory of the environment at ``prefix``."""
    return Path(prefix) / "share" / "jupyter" / "lab" / "settings"


def install_settings(prefix: str | Path = sys.prefix, root: str | Path | None = None) -> Path:
    """Copy the project's overrides into ``<app settings>/overrides.d/``; return the installed path."""
    target = app_settings_dir(prefix) / "overrides.d" / SETTINGS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(settings_file(root), target)
    return target


def command(root: str | Path, port: int | None = None, token: str | None = None,
            open_browser: bool = True) -> list[str]:
    """The ``jupyter lab`` command line serving ``root`` and opening on ``notebooks/``."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}",
           "--LabApp.default_url=/lab/tree/notebooks"]
    if port is not None:
        cmd += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    if not open_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root; JupyterLab refuses it otherwise
        cmd.append("--ServerApp.allow_root=True")
    return cmd


def main(argv: list[str] | None = None) -> None:
    """Install the settings and start JupyterLab on this checkout (extra arguments go to jupyter lab)."""
    root = project_root(Path(__file__).parent) or Path.cwd()
    print(f"cdlib.lab: settings -> {install_settings(root=root)}", flush=True)
    cmd = command(root) + list(sys.argv[1:] if argv is None else argv)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
