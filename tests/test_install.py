"""The package as users get it: a wheel (not the editable checkout) installed into a fresh
virtual environment finds its shipped data, its dashboard page and its commands.

The fresh environment borrows the heavy dependencies (torch, sglang, ...) from the test
environment through a `.pth` line, which adds their folder to `sys.path` without running
that folder's own `.pth` files, so the editable install of the checkout stays invisible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from pathlib import Path
import lragent_sglang
from lragent_sglang.adapters.cli import DEFAULT_DATA
from lragent_sglang.agents.models import smollm2_role_adapters
from lragent_sglang.agents.tools import Toolbox, parse_tool_call
from lragent_sglang.server.dashboard import page
assert Path(lragent_sglang.__file__).is_relative_to(sys.prefix), lragent_sglang.__file__
assert DEFAULT_DATA.is_file() and DEFAULT_DATA.is_relative_to(sys.prefix), DEFAULT_DATA
for path in smollm2_role_adapters().values():
    assert (path / "adapter_model.safetensors").is_file() and path.is_relative_to(sys.prefix), path
tools = Toolbox()
print(tools.run(parse_tool_call("TOOL: calculator(14 * 3)")))
print(tools.run(parse_tool_call("TOOL: lookup(Eiffel Tower)")))
print("<title>LRAgent radix cache</title>" in page())
"""


def run(*cmd: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_wheel_in_a_fresh_venv_finds_its_data_and_commands(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "artifacts", "build", "*.egg-info", "__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", tmp_path / "dist", src, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("lragent_sglang-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lragent_sglang/data/roles/train.jsonl", "lragent_sglang/data/docs/eiffel_tower.md",
            "lragent_sglang/server/dashboard.html", "lragent_sglang/kernels/decode.py",
            "lragent_sglang/radix/tree.py", "lragent_sglang/data/adapters/smollm2-135m-instruct/README.md",
            "lragent_sglang/data/adapters/smollm2-135m-instruct/action/adapter_model.safetensors"} <= names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    out = run(venv / "bin" / "python", "-c", PROBE, cwd=tmp_path).splitlines()
    assert out[0] == "42"
    assert "Eiffel Tower" in out[1] and "1889" in out[1]
    assert out[2] == "True"
    assert "joint-basis" in run(venv / "bin" / "lragent-adapters", "--help", cwd=tmp_path)
    assert "--lragent-scheme" in run(venv / "bin" / "lragent-serve", "--help", cwd=tmp_path)
