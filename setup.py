"""Build step that pyproject.toml cannot express: ship examples/ inside the wheel as tinysft/examples.

`tinysft demo`, `tinysft eval`'s forgetting check and the README's example paths need the example
data; a wheel (`pip install .`) would otherwise carry only src/. tinysft.shipped.examples_dir()
finds this copy first, and the checkout's examples/ when running from source.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithExamples(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's examples/
            return
        source = HERE / "examples"
        if source.is_dir():
            shutil.copytree(source, Path(self.build_lib) / "tinysft" / "examples", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithExamples})
