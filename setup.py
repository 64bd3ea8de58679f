"""Build archext._C: the CPU kernels always, the CUDA kernels when a toolkit and a CUDA build
of torch are present (no GPU needed to compile them).

Environment switches:
  ARCHEXT_CUDA=auto|0|1     build the CUDA kernels: auto (default) when possible, 0 never, 1 or fail
  ARCHEXT_CUDA_EMU=auto|0|1 also compile csrc/cuda/*.cu as host C++ for the emulated CUDA
                            execution model (csrc/emu/; the tests run every CUDA kernel on the CPU
                            through it, archext/testing.py): auto (default) on Linux x86-64, where
                            its fiber switch is written; no nvcc needed
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0+PTX": A100, H100/H200, PTX for newer)
  MAX_JOBS                  parallel compile jobs (ninja)
  ARCHEXT_DEBUG=1           -O0 -g host and -G device code
  ARCHEXT_SANITIZE=1        AddressSanitizer + UBSan on the C++ sources, -O1 -g, CPU only (with
                            ARCHEXT_CUDA=0; run with LD_PRELOAD=libasan: scripts/sanitize.sh)

Install with `pip install --no-build-isolation .` so the extension is built against the torch
that will import it; develop with `python setup.py build_ext --inplace` (incremental, ninja).
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    # torch guesses CUDA_HOME from `which nvcc`; with an nvcc wrapper in /usr/local/bin it guesses
    # /usr/local, where libcudart is not. Prefer the toolkit's own directory.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        libs = [os.path.join(home, d, "libcudart.so") for d in ("lib64", "lib")]
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and any(map(os.path.exists, libs)):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_version(cuda_home: str):
    """The toolkit's release, e.g. "13.0", from `nvcc --version`; None if it cannot be read."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def want_cuda() -> bool:
    mode = os.environ.get("ARCHEXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ARCHEXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    why_not = None
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        why_not = f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
    else:
        # torch refuses to build an extension with a toolkit of another major version than its own.
        toolkit = nvcc_version(cpp_extension.CUDA_HOME)
        if toolkit is None or toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
            why_not = (f"the toolkit at {cpp_extension.CUDA_HOME} is CUDA {toolkit}, torch was built "
                       f"with CUDA {torch.version.cuda} (the major versions must match)")
    if why_not is None:
        return True
    if mode == "1":
        sys.exit(f"ARCHEXT_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    print(f"archext: building the CPU kernels only: {why_not}", file=sys.stderr)
    return False


def want_cuda_emu() -> bool:
    mode = os.environ.get("ARCHEXT_CUDA_EMU", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ARCHEXT_CUDA_EMU must be auto, 0 or 1, got {mode!r}")
    import platform

    # The fiber switch (csrc/emu/emu_runtime.cpp) is x86-64 assembly in GCC/Clang syntax.
    supported = sys.platform.startswith("linux") and platform.machine() == "x86_64"
    if mode == "1" and not supported:
        sys.exit(f"ARCHEXT_CUDA_EMU=1 needs Linux x86-64, this is {sys.platform} {platform.machine()}")
    return mode == "1" or (mode == "auto" and supported)


def cuda_wheel_includes() -> list[str]:
    # torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a bare toolkit may lack them,
    # the nvidia-* wheels that come with a CUDA torch ship them.
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))]


def extension():
    with_cuda = want_cuda()
    with_emu = want_cuda_emu()
    debug = os.environ.get("ARCHEXT_DEBUG", "0") == "1"
    sanitize = os.environ.get("ARCHEXT_SANITIZE", "0") == "1"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Sanitized: -O1 -g (readable reports, a faster build; scripts/sanitize.sh).
    cxx = ["-O0", "-g"] if debug else (["-O1", "-g"] if sanitize else ["-O3"])
    # at::parallel_for runs serially in an extension built without OpenMP.
    cxx += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-Wno-maybe-uninitialized", "-fvisibility=hidden"]
    # No silent FMA contraction (GCC's default): the vector and scalar paths, and the two passes
    # of a kernel that recompute one value, must round alike (PyTorch builds its CPU kernels so
    # too). Without it, LayerNorm's gradient at width 1 (exactly 0) came out as r * one rounding.
    cxx += ["-ffp-contract=off"]
    ldflags = ["-fopenmp"]
    if sanitize:
        # -fno-wrapv: Python's CFLAGS carry -fwrapv, which defines signed overflow and so turns
        # off UBSan's check of it (the 32-bit index overflow this build is meant to catch).
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=undefined", "-fno-wrapv"]
        ldflags += ["-fsanitize=address,undefined"]
        if with_cuda:
            sys.exit("ARCHEXT_SANITIZE=1 instruments the CPU kernels only: build with ARCHEXT_CUDA=0")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG"] if not debug else ["-O0", "-G", "-g"]
    # A register spill to local memory fails the build (CI compiles every kernel): none spills
    # now, and a change that adds one must show it is worth it.
    if not debug:
        nvcc += ["-Xptxas=--warn-on-spills,--warning-as-error"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    if with_emu:
        sources += sorted(glob.glob("csrc/emu/*.cpp"))
        define_macros.append(("ARCHEXT_WITH_CUDA_EMU", None))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += cuda_wheel_includes()
        define_macros.append(("ARCHEXT_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
    print(f"archext: CUDA kernels {'on' if with_cuda else 'off'}, emulated {'on' if with_emu else 'off'}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'}")
    return ext_cls(
        name="archext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=ldflags,
    )


setup(
    name="archext",
    version="0.1.0",
    description="Fast, exact kernels for the building blocks of modern language models",
    packages=find_packages(include=["archext", "archext.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.4"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["archext-bench=archext.bench:main", "archext = archext.cli:main"]},
    zip_safe=False,
)
