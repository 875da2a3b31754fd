"""The package as people install it: the wheel and the sdist, built from this checkout."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import sys
from setuptools import build_meta
out = sys.argv[1]
sdist = build_meta.build_sdist(out)
wheel = build_meta.build_wheel(out)
print("built", sdist, wheel)
"""


def test_the_wheel_and_the_sdist_carry_the_license_and_the_sdist_runs_its_tests(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    (built,) = [line for line in run.stdout.splitlines() if line.startswith("built ")]
    sdist_name, wheel_name = built.split()[1:]

    with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
        names = wheel.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = wheel.read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in text
    assert "Requires-Python: >=3.9" in text
    assert "Programming Language :: Python :: 3.9" in text
    # The development tools are a dependency group, not an extra people could install.
    assert "Provides-Extra: dev" not in text
    for extra in ("django", "flask", "fastapi", "starlette", "otel", "postgres"):
        assert f"Provides-Extra: {extra}" in text
    assert not any(n.startswith("tests/") for n in names)

    with tarfile.open(tmp_path / sdist_name) as sdist:
        files = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/chaos.py",
        "tests/powercut_shim.c",
        "tests/proc_helpers.py",
        "benchmarks/run.py",
        "scripts/dev.py",
    ):
        assert needed in files, needed
    assert not any(".hypothesis" in name or "__pycache__" in name for name in files)
