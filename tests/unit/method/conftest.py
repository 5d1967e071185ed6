"""Fixtures of the method tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def compile_offline(tmp_path):
    """Runs a script that lowers Triton kernels to PTX for an H100/H200 with Triton's bundled
    compiler (no GPU), in a process without TRITON_INTERPRET (the interpreter does not compile);
    skips where this Triton cannot. Asserts the script exits 0 and prints "compiled"."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for CUDA offline: {e}")

    def run(script: str, timeout: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]

    return run
