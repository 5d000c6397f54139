"""Every dependency imports together. A break like pyarrow 26 refusing numpy 1.x fails here."""

import importlib
import subprocess
import sys

import pytest

MODULES = [
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "pyarrow.parquet",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "tritonclient.grpc",
    "tritonclient.grpc.aio",
    "tritonclient.http",
    "tritonclient.http.aio",
    "pytriton",
    "fairlearn.metrics",
    "sklearn",
    "scipy.stats",
    "matplotlib",
    "tqdm",
    "mlflow",
    "faiss",
    "fastapi",
    "uvicorn",
    "croniter",
    "yaml",
]


@pytest.mark.parametrize("name", MODULES)
def test_dependency_imports(name):
    importlib.import_module(name)


def test_numpy_is_1x_for_the_triton_python_stub():
    import numpy

    assert numpy.__version__.startswith("1."), "the Triton Python backend stub needs numpy < 2"


def test_locust_imports_in_its_own_process():
    # Importing locust monkey-patches the whole interpreter with gevent; keep it out of pytest's.
    subprocess.run([sys.executable, "-c", "import locust, locust.env"], check=True, timeout=120)
