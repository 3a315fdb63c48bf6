"""The CUDA implementation chooser, exercised with stand-in implementations (no GPU needed),
and the build-facing behaviour of the package."""

import os
import shutil
import subprocess
import sys

import pytest

import mmfast
from mmfast import _backend
from mmfast._backend import Implementation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _impl(name, backend, reasons):
    return Implementation(name, backend, lambda *a: list(reasons), lambda *a: name)


IMPLS = (_impl("cuda-fast", "cuda", ["last dim 7 is not a multiple of 8"]),
         _impl("triton", "triton", []))


def test_first_capable_implementation_runs():
    assert _backend.dispatch("demo", IMPLS, 1) == "triton"
    assert mmfast.last_choice("demo") == "triton"
    assert _backend.dispatch("demo", (_impl("a", "cuda", []),) + IMPLS, 1) == "a"


def test_forced_backend_by_context_manager_and_environment(monkeypatch):
    with mmfast.backend("cuda"):
        with pytest.raises(NotImplementedError) as e:
            _backend.dispatch("demo", IMPLS, 1)
    message = str(e.value)
    assert "cuda-fast: last dim 7 is not a multiple of 8" in message
    assert "triton: not the forced backend 'cuda'" in message
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    assert _backend.dispatch("demo", IMPLS, 1) == "triton"
    monkeypatch.setenv("MMFAST_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="MMFAST_BACKEND"):
        _backend.dispatch("demo", IMPLS, 1)


def test_error_lists_every_reason():
    impls = (_impl("cuda-fast", "cuda", ["reason one", "reason two"]),
             _impl("triton", "triton", ["reason three"]))
    with pytest.raises(NotImplementedError) as e:
        _backend.dispatch("demo", impls, 1)
    for reason in ("reason one", "reason two", "reason three"):
        assert reason in str(e.value)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with mmfast.backend("cutlass"):
            pass


def test_import_without_extension_says_how_to_build(tmp_path):
    """A source tree whose extension is not built fails to import with build instructions."""
    shutil.copytree(os.path.join(ROOT, "mmfast"), tmp_path / "mmfast",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    # Drop the finder of an editable install, which would find the built extension elsewhere.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            "import mmfast")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode != 0
    assert "pip install --no-build-isolation" in out.stderr
