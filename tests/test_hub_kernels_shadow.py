"""The checkout's ``kernels/`` folder must not pass for the Hugging Face Hub package ``kernels``.

transformers >= 5.25 depends on the Hub package ``kernels`` and imports it when the model code loads
(``transformers.integrations.hub_kernels``). With a checkout's root on ``sys.path`` (``python -m`` or pytest started
there) the folder ``kernels/`` (installed as ``sparse_hf.kernels``) would be found first and every import of
transformers' modeling code would fail (CI on a clean clone, 2026-12-03). These run a fresh interpreter in the
repository root, where ``python -c`` puts the current directory first on ``sys.path``."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_is_the_hub_package_or_an_empty_stand_in():
    out = run_in_root("import kernels; print(kernels.__file__); print(hasattr(kernels, 'sparse_decode_attention'))")
    assert out.returncode == 0, out.stderr
    path, ours = out.stdout.split()
    assert ours == "False"
    if hub_kernels_installed():
        assert path != "None" and not os.path.abspath(path).startswith(os.path.join(ROOT, "kernels")), path
    else:
        assert path == "None"          # transformers' check reads a package without __file__ as not installed


def test_transformers_model_code_and_our_kernels_import_from_the_root():
    out = run_in_root("import transformers.modeling_utils, sparse_hf.kernels as k, sparse_hf, os; "
                      "print(os.path.abspath(k.__file__)); print(k.sparse_decode_attention.__name__)")
    assert out.returncode == 0, out.stderr
    path, name = out.stdout.split()
    assert os.path.dirname(path) == os.path.join(ROOT, "kernels") or "sparse_hf" in path, path
    assert name == "sparse_decode_attention"


@pytest.mark.skipif(not hub_kernels_installed(), reason="the Hub package 'kernels' is not installed")
def test_hub_kernels_names_transformers_wants_resolve():
    out = run_in_root("from kernels import __name__ as n; import kernels; print(n, hasattr(kernels, '__path__'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kernels", "True"]
