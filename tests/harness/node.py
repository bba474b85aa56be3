"""Node scripts of the test harness (tests/harness/*.mjs), run with the packages `make
node-deps` puts in .cache/node/. ESM resolves packages from the script's own directory, never
NODE_PATH, so each runs from a copy beside a link to those packages."""

from __future__ import annotations

import shutil
from pathlib import Path

NODE_MODULES = Path(__file__).resolve().parents[2] / ".cache" / "node" / "node_modules"


def available(package: str) -> bool:
    return shutil.which("node") is not None and (NODE_MODULES / package).is_dir()


def prepare(directory: Path, script: Path) -> Path:
    """A copy of `script` in `directory` that resolves the harness's packages."""
    assert shutil.which("node"), "node is missing: apt-get install nodejs"
    copy = directory / script.name
    shutil.copyfile(script, copy)
    link = directory / "node_modules"
    if not link.exists():
        link.symlink_to(NODE_MODULES, target_is_directory=True)
    return copy
