"""The package installs, imports, and says plainly what it can and cannot run here."""
import os
import subprocess
import sys

import dpkern


def test_cuda_available_is_consistent():
    reason = dpkern.cuda_unavailable_reason()
    assert dpkern.cuda_available() == (reason is None)
    if reason is not None:
        assert "extension" in reason or "GPU" in reason


def test_kernels_install_as_dpkern_kernels():
    import dpkern.kernels.rownorm as k
    assert hasattr(k, "rownorm_sq_fwd")


def test_import_without_the_extension():
    """Simulate an install with DPKERN_SKIP_CUDA=1: _C missing must not break import."""
    code = ("import sys; sys.modules['dpkern._C'] = None\n"
            "import dpkern\n"
            "assert not dpkern.cuda_available()\n"
            "assert 'without its CUDA extension' in dpkern.cuda_unavailable_reason()\n"
            "import torch\n"
            "try:\n    dpkern.rownorm_sq(torch.ones(2, 2), backend='cuda')\n"
            "except RuntimeError as e:\n    assert 'without its CUDA extension' in str(e); print('ok')\n")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
