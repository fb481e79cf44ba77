"""Keep the repo's kernels/ folder from shadowing the PyPI package `kernels`.

kernels/ is installed as ftlab.kernels, but whenever the repo root is on sys.path (pytest puts it there for the
tests/ package, `python -m` from the root does, and so does PYTHONPATH=<repo> on the GPU machine) it is also
importable as a top-level `kernels`. transformers >= 5.25 depends on the PyPI package of that name and imports
it; finding the folder instead, it fails with "cannot import name 'CUDAProperties' from 'kernels'".
`import_pypi_kernels()`, called before transformers is imported, loads the installed package under its own name
first, so every later `import kernels` gets it. Where the package is not installed (older transformers), nothing
is loaded: transformers then finds the folder without a version and leaves it alone.
"""
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _is_repo_root(entry: str) -> bool:
    """A sys.path entry holding both ftlab/ and kernels/: this repository's checkout."""
    root = Path(entry or os.curdir)
    return (root / "ftlab" / "__init__.py").is_file() and (root / "kernels" / "__init__.py").is_file()


def import_pypi_kernels() -> None:
    if "kernels" in sys.modules:
        return
    search = [entry for entry in sys.path if not _is_repo_root(entry)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
