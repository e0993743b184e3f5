"""The built wheel, installed into a fresh virtual environment, works from a folder outside the checkout.

The new environment gets tinysft from the wheel only (``pip install --no-deps``); its dependencies
come from this interpreter's site-packages through a .pth line, so no network is needed. Nothing of
the checkout is on its path: PYTHONPATH is dropped and the commands run in a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(bin folder of the fresh venv, its environment, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # PYTHONPATH (src/ in the tests) would show pip the checkout's tinysft as already installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TINYSFT_EXAMPLES", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600, env=env, cwd=tmp)
    wheel = next((tmp / "dist").glob("tinysft-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600, env=env, cwd=tmp)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, transformers, ...) from this interpreter; after the venv's own site-packages,
    # and without processing this site's .pth files, so an editable tinysft here stays invisible there.
    (site / "zz_tinysft_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", env, work


def run(installed: tuple[Path, dict[str, str], Path], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    bin_dir, env, work = installed
    return subprocess.run([str(bin_dir / "tinysft"), *args], capture_output=True, text=True, cwd=work, env=env,
                          timeout=timeout)


def test_version_and_models_from_the_wheel(installed: tuple[Path, dict[str, str], Path]) -> None:
    proc = run(installed, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("tinysft "), proc.stderr
    bin_dir, env, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import tinysft, tinysft.shipped as s; "
                            "print(tinysft.__file__); print(s.examples_dir())"],
                           capture_output=True, text=True, cwd=work, env=env, check=True).stdout.split()
    assert str(ROOT) not in where[0], where  # the wheel's copy, not the checkout
    assert Path(where[1], "polite-helper", "config-quick.yaml").is_file()
    assert Path(where[1], "general-knowledge", "forgetting.jsonl").is_file()
    proc = run(installed, "models")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout


@pytest.mark.integration  # trains the real embedded model (see docs/benchmarks.md for how long it takes)
def test_demo_quick_from_the_wheel(installed: tuple[Path, dict[str, str], Path]) -> None:
    proc = run(installed, "demo", "--quick", "--out", "runs/demo", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = installed[2] / "runs" / "demo" / "report.md"
    assert report.is_file() and "Demo finished" in proc.stdout
    assert "before / after" in report.read_text()  # the shipped seed data and prompts were found and used
