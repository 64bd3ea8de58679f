"""Shared fixtures: devices, CPU ISAs, fresh-but-reproducible random seeds."""
import collections
import os
import time
import zlib

import pytest
import torch

import archext
from archext import _C
from archext import testing as emu_testing

# Inputs are drawn fresh each run; the seed is printed in the header so a failure can be
# replayed with ARCHEXT_TEST_SEED=<seed>.
SEED = int(os.environ.get("ARCHEXT_TEST_SEED", int(time.time()) % 100_000))

DEVICES = ["cpu"] + (["cuda"] if archext.cuda_available() else [])
_ORDER = ["default", "avx2", "avx512", "avx512_bf16"]
ISAS = _ORDER[: _ORDER.index(_C.best_cpu_isa()) + 1]

# ARCHEXT_TEST_BACKEND=cuda_emu: the ops on CPU tensors run the CUDA kernels, emulated
# (archext/testing.py; ARCHEXT_EMU_SCHEDULE, ARCHEXT_EMU_SM_COUNT, ARCHEXT_EMU_SEED) for the
# whole session. The CPU ISAs do not matter to them: one; the tests of the CPU kernels' own
# machinery (CPU_KERNEL_TESTS) are deselected.
EMU = emu_testing.emu_backend_from_env()
if EMU is not None:
    ISAS = ISAS[:1]
# (The *_cpu tests check the CPU kernels' host-side messages; the CUDA kernels' device asserts
# are tests/test_emu.py's.)
CPU_KERNEL_TESTS = ("test_vec_math", "prefault", "streaming_stores", "test_set_cpu_isa",
                    "test_many_python_threads", "across_threads", "test_huge_",
                    "out_of_range_cpu", "out_of_cache_cpu", "same_bits_as_two_passes")

# Cases run by the property tests (tests/test_fuzz.py), per op family: reported in the summary.
FUZZ_CASES: collections.Counter = collections.Counter()


def pytest_report_header(config):
    info = archext.build_info()
    backend = f" backend=cuda_emu{EMU}" if EMU is not None else ""
    return [f"archext: seed={SEED} devices={DEVICES} cpu_isas={ISAS} build={info}{backend}"]


def pytest_sessionstart(session):
    if EMU is not None:
        session.config._archext_emu = emu_testing.emulated_cuda(**EMU)
        session.config._archext_emu.__enter__()


def pytest_sessionfinish(session):
    ctx = getattr(session.config, "_archext_emu", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)


def pytest_collection_modifyitems(config, items):
    if EMU is None:
        return
    keep = [it for it in items if not any(p in it.name for p in CPU_KERNEL_TESTS)]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test with the CPU kernels forced to one ISA (all that this CPU supports)."""
    before = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)


def pytest_terminal_summary(terminalreporter):
    # Also under -q, where the header is not shown: the seed that replays this run.
    terminalreporter.write_line(f"archext: inputs drawn with ARCHEXT_TEST_SEED={SEED}")
    if EMU is not None:
        terminalreporter.write_line(
            f"archext: CUDA kernels emulated (ARCHEXT_TEST_BACKEND=cuda_emu), schedule "
            f"{EMU['schedule']}, ARCHEXT_EMU_SEED={EMU['seed']}, {EMU['sm_count']} SMs")
    if FUZZ_CASES:
        per = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_CASES.items()))
        terminalreporter.write_line(
            f"archext: {sum(FUZZ_CASES.values())} fuzz cases ran "
            f"(ARCHEXT_FUZZ_EXAMPLES={os.environ.get('ARCHEXT_FUZZ_EXAMPLES', 'default')}): {per}")
