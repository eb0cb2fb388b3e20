import os

# Small matrices + a shared CPU: multi-threaded BLAS only adds contention in tests.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "validation" / "benchmarks"


@pytest.fixture(scope="session")
def bench_script():
    """name -> the module ``validation/benchmarks/<name>.py``, executed with that folder on
    sys.path (the scripts import each other, e.g. ``bench_speed``)."""
    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            sys.path.remove(str(BENCHMARKS))
        return mod

    return load
