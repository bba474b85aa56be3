"""The package build generates agentproxy.v1 from proto/ first (see proto/generate.py), so that
package discovery finds it; everything else is in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "proto"))
from generate import generate  # noqa: E402

generate()
setup()
