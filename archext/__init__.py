"""archext: fast, exact kernels for the building blocks of modern language models."""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # registers the archext:: ops with the dispatcher
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "archext: the native extension archext._C is not built. Build it with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a "
        f"checkout). Cause: {e}"
    ) from e

from . import ops  # noqa: E402  (registers autograd and fake kernels)
from . import nn  # noqa: E402

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a GPU is visible."""
    return _C.built_with_cuda() and torch.cuda.is_available()


def build_info() -> dict:
    """What this build contains, and why a CUDA tensor would be refused."""
    return {
        "cuda_kernels": _C.built_with_cuda(),
        "cuda_device": torch.cuda.is_available(),
        "cpu_isa": _C.cpu_isa(),
        "best_cpu_isa": _C.best_cpu_isa(),
        "torch": torch.__version__,
    }


if not _C.built_with_cuda():
    import warnings as _w

    if torch.cuda.is_available():
        _w.warn(
            "archext was built without its CUDA kernels (ARCHEXT_CUDA=0, or no CUDA toolkit at "
            "build time): archext ops on CUDA tensors will raise 'no kernel for CUDA'. Rebuild "
            "with a CUDA toolkit on the PATH to use the GPU.",
            stacklevel=2,
        )
