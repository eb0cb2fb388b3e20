"""pln_ref.allocator: glibc malloc thresholds set once per process, with an opt-out."""

import os
import subprocess
import sys

import pytest

CODE = "import pln_ref.allocator as a; print(a.tune_allocator(), a.tune_allocator())"


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_thresholds_applied_once_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({}) == ["True", "True"]


def test_opt_out_and_user_settings_are_respected():
    assert _run({"PLN_REF_MALLOC_TUNE": "0"}) == ["False", "False"]
    assert _run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == ["False", "False"]
