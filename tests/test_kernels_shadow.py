import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys
sys.path[:0] = {path!r}
spec = importlib.util.spec_from_file_location("shadow", {module!r})
shadow = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shadow)
shadow.import_pypi_kernels()
import kernels
print(kernels.__file__)
"""


def _imported_kernels(path: list[str]) -> str:
    # a fresh interpreter without site-packages (-S), so that sys.path is only what the test gives (this one already
    # holds whatever `kernels` the conftest loaded, and the machine may have the PyPI package installed)
    probe = PROBE.format(path=path, module=str(REPO / "ftlab" / "_kernels_shadow.py"))
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True)
    return out.stdout.strip()


def test_installed_kernels_package_wins_over_the_repo_folder(tmp_path):
    # the repo root first on sys.path (as pytest and `python -m` from the root put it), an installed package after
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    assert _imported_kernels([str(REPO), str(tmp_path)]) == str(tmp_path / "kernels" / "__init__.py")


def test_without_an_installed_package_nothing_is_loaded(tmp_path):
    # only the repo's folder: left to plain import rules (transformers without the dependency skips it)
    assert _imported_kernels([str(REPO), str(tmp_path)]) == str(REPO / "kernels" / "__init__.py")
