import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# (TRITON_INTERPRET is read when a kernel is decorated: on a CPU-only machine the Triton
# kernels of saekit.triton_kernels then run in Triton's interpreter; with CUDA, compiled)
torch.set_num_threads(min(2, torch.get_num_threads()))

CUDA_SKIP = "needs CUDA (this torch has none or no GPU is visible)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny matrices: OpenMP costs more than it gives on a
    shared machine); the count is restored after. Per module: ``pytestmark =
    pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Each test taking ``device`` runs on CPU and, when present, on CUDA (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(CUDA_SKIP)
    return torch.device(request.param)


@pytest.fixture
def plugin():
    """The plugin module tests/plugin_rules.py (user-defined rules, an aux loss, a named
    input); everything it registers or imports is undone afterwards. Import it yourself."""
    import sys

    from saekit import plugins
    from saekit.inputs import _KINDS
    from saekit.losses.aux import _AUX
    from saekit.rules.base import _REGISTRY

    before = (dict(_REGISTRY), dict(_AUX), dict(_KINDS))
    loaded, modules, auto = dict(plugins._loaded), set(sys.modules), plugins._auto_done
    yield "plugin_rules"
    for reg, old in zip((_REGISTRY, _AUX, _KINDS), before):
        reg.clear()
        reg.update(old)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    plugins._auto_done = auto
    for name in set(sys.modules) - modules:
        if "plugin_rules" in name:
            del sys.modules[name]
