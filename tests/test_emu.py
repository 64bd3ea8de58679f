"""The emulated CUDA execution model (csrc/emu/, archext/testing.py): that it catches the faults
it is there to catch, under every schedule, and the CUDA kernel paths the op tests do not reach
on their own (several launches for > 65535 rows, the shared-memory opt-in, the packed paths
against the scalar ones). The op tests themselves run against the emulated kernels under
`./run.sh test-emu` (ARCHEXT_TEST_BACKEND=cuda_emu)."""
import pathlib
import re

import pytest
import torch

from archext import ops
from archext import reference as ref
from archext import testing
from test_reliability import VECTOR_PATH_SIZES, assert_vector_paths_agree, vector_path_outputs

pytestmark = pytest.mark.skipif(not testing.available(), reason="built without ARCHEXT_CUDA_EMU")

SCHEDULES = testing.SCHEDULES


@pytest.fixture(autouse=True)
def _emu_settings():
    # Whatever the session's backend, each test here chooses its own; restore the session's.
    yield
    env = testing.emu_backend_from_env()
    testing.configure(**(env or {}))


def faulty_sum(kind, threads=256, smem=0, n=None):
    x = torch.rand(n or threads) + 0.5
    return x, torch.ops.archext_testing.emu_faulty_sum(x, kind, threads, smem)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_correct_kernel_passes(schedule):
    testing.configure(schedule, seed=3)
    for threads in (32, 256, 1024):
        x, got = faulty_sum("none", threads)
        torch.testing.assert_close(got[0], x.sum(), rtol=1e-5, atol=0)


# A fault that leaves a wrong result: shared memory reads as NaN until written, so a read before
# the write (no barrier) or past it (off by one) gives NaN; a dropped shuffle step a partial sum.
# The missing barrier shows under every schedule but reverse, where thread 0 (the reader) runs
# last: why the tests run several.
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["missing_barrier", "dropped_shuffle", "off_by_one"])
def test_faults_give_wrong_results(schedule, kind):
    if kind == "missing_barrier" and schedule == "reverse":
        pytest.skip("reverse runs the reader last: the fault does not show")
    testing.configure(schedule, seed=3)
    x, got = faulty_sum(kind)
    assert not torch.isclose(got[0], x.sum(), rtol=1e-3), f"{kind} under {schedule}: {got[0]} == sum"


# A fault the emulation refuses: the error names the kernel, the block, the thread and the line.
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind, match", [
    ("divergent_barrier", r"faulty_sum_kernel<Fault::kDivergentBarrier>.*block \(0, 0, 0\), thread \(\d+, 0, 0\): "
                          r"(exited while \d+ threads wait at __syncthreads \(csrc/emu/faults_emu.cpp:\d+\)"
                          r"|__syncthreads \(csrc/emu/faults_emu.cpp:\d+\) after thread .* exited without reaching it)"),
    ("exited_lane", r"thread \(\d+, 0, 0\).*(exited while lane \d+ of its warp waits for it in __shfl_xor_sync"
                    r"|__shfl_xor_sync \(csrc/emu/faults_emu.cpp:\d+\): lane \d+ of the mask has exited)"),
    ("device_assert", r"thread \(\d+, 0, 0\): device assert failed at csrc/emu/faults_emu.cpp:\d+: v < 0.f"),
    ("over_bound", r"faulty_sum_kernel<Fault::kOverBound>.*thread \(\d+, 0, 0\): a block of 256 threads exceeds "
                   r"the kernel's __launch_bounds__\(F == Fault::kOverBound \? 128 : 1024\) of 128 threads"),
])
def test_faults_raise(schedule, kind, match):
    testing.configure(schedule, seed=3)
    with pytest.raises(RuntimeError, match=match):
        faulty_sum(kind)
    # The runtime is usable again after a failed launch.
    x, got = faulty_sum("none")
    torch.testing.assert_close(got[0], x.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("threads, smem, match", [
    (2048, 0, r"2048 threads per block \(at most 1024"),
    (256, 64 * 1024, r"65536 bytes of dynamic shared memory, over 48 KiB without the opt-in"),
])
def test_launch_checks(threads, smem, match):
    with pytest.raises(RuntimeError, match=match):
        faulty_sum("none", threads, smem, n=max(threads, 256))


def test_schedule_names():
    with pytest.raises(RuntimeError, match="schedule must be forward, reverse, random or warp_ahead"):
        testing.configure("backward")


# ---- CUDA kernel paths beyond the op tests -------------------------------------------------
@pytest.mark.parametrize("schedule", ["forward", "warp_ahead"])
def test_cross_entropy_backward_over_65535_rows(schedule):
    # The backward puts rows on grid.y (at most 65535): several launches.
    n, vocab = 65535 + 300, 8
    logits = torch.randn(n, vocab)
    target = torch.randint(0, vocab, (n,))
    target[::7] = -100
    lse = torch.logsumexp(logits, -1)
    g = torch.rand(n)
    want = torch.ops.archext.cross_entropy_bwd(g, None, logits, target, lse, -100, 0.1, 1e-4, 0.0)
    with testing.emulated_cuda(schedule):
        got = torch.ops.archext.cross_entropy_bwd(g, None, logits, target, lse, -100, 0.1, 1e-4, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_head", [True, False])
def test_qk_norm_rope_past_48_kib_of_shared_memory(per_head):
    # 16 heads of 1024 (64 KiB of float32 per token): the kernels opt in to more shared memory.
    q = torch.randn(1, 3, 16, 1024)
    k = torch.randn(1, 3, 2, 1024)
    wq, wk = torch.randn(1024 if per_head else 16 * 1024), torch.randn(1024 if per_head else 2 * 1024)
    cos, sin = ops.rope_cache(1024, 8)
    want = ops.qk_norm_rope(q, k, wq, wk, cos, sin, eps=1e-6, per_head=per_head)
    with testing.emulated_cuda("reverse"):
        got = ops.qk_norm_rope(q, k, wq, wk, cos, sin, eps=1e-6, per_head=per_head)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_vector_paths_match_scalar():
    # tests/test_reliability.py's GPU test, on the emulated kernels at smaller sizes: the packed
    # RoPE and cross-entropy kernels, the norm forward's rows in registers and the norm
    # backward's register partial sums against the scalar paths (ARCHEXT_CUDA_VECTOR=0).
    runs = {}
    before = testing.set_vector_paths(True)
    try:
        with testing.emulated_cuda("random", seed=5):
            for on in (True, False):
                testing.set_vector_paths(on)
                runs[on] = vector_path_outputs("cpu", **VECTOR_PATH_SIZES["emu"])
    finally:
        testing.set_vector_paths(before)
    assert_vector_paths_agree(runs[True], runs[False])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_family_under_every_schedule(schedule):
    # One call of each kernel family, emulated, against the CPU kernels (which run outside).
    x = torch.randn(37, 1536)
    w = torch.randn(1536)
    logits = torch.randn(9, 1000)
    t = torch.randint(0, 1000, (9,))
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 2, 64)
    cos, sin = ops.rope_cache(64, 16)
    s = torch.randn(2, 3, 7, 9)
    rstd = torch.rand(37) + 0.5

    def calls():
        return [
            ops.layer_norm(x, w, w, 1e-5),
            *torch.ops.archext.rms_norm_bwd(x.flip(1), x, w, rstd, 0.0, None, True),
            ops.swiglu(x, x.flip(0)),
            *torch.ops.archext.rope_fwd(q, k, cos, sin, torch.arange(5), False),
            *torch.ops.archext.cross_entropy_fwd(logits, t, -100, 0.1, 1e-4, 30.0),
            torch.ops.archext.softmax_fwd(s, None, 0.5, 0.0, True, -1),
            *ops.qk_norm_rope(q, k, None, None, cos, sin, eps=1e-6),
        ]

    want = calls()
    with testing.emulated_cuda(schedule, sm_count=3, seed=11):
        got = calls()
    for i, (a, b) in enumerate(zip(got, want)):
        # Sums in another order than the CPU kernels': rounding apart.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output {i}: {m}")


def test_float64_goes_to_the_cpu_kernels():
    # The CUDA kernels have none (as on a GPU); the emulated backend routes it to the CPU's.
    x = torch.randn(4, 33, dtype=torch.float64)
    with testing.emulated_cuda():
        y = ops.rms_norm(x, None, 1e-6)
    torch.testing.assert_close(y, ref.rms_norm(x, None, 1e-6))


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.archext.rope_fwd(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8),
                                        *ops.rope_cache(8, 8), torch.tensor([0, 1, 9]), False),
     r"rope_vec_kernel<float, 4>.*block \(2, 0, 0\), thread \(0, 0, 0\): device assert failed at "
     r"csrc/cuda/rope_cuda.cu:\d+: .*position outside the cos/sin cache"),
    (lambda: ops.qk_norm_rope(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), None, None,
                              *ops.rope_cache(8, 8), position_ids=torch.tensor([0, 1, 9])),
     r"qk_norm_rope_fwd_kernel<float>.*device assert failed at csrc/cuda/qk_norm_rope_cuda.cu:\d+: "
     r".*position outside the cos/sin cache"),
    (lambda: torch.ops.archext.cross_entropy_fwd(torch.randn(3, 5), torch.tensor([0, 5, 1]), -100,
                                                 0.0, 0.0, 0.0),
     r"ce_fwd_kernel<float, 1>.*block \(1, 0, 0\).*device assert failed at "
     r"csrc/cuda/stability_cuda.cu:\d+: .*target out of range"),
])
def test_device_asserts(call, match):
    # Where the CPU kernels check on the host, the CUDA kernels assert on the device: the
    # emulated launch raises, naming the kernel, block, thread and line.
    with testing.emulated_cuda():
        with pytest.raises(RuntimeError, match=match):
            call()


# Plain C++ carries no __launch_bounds__: each bounded kernel states its bounds again as its first
# statement (ARCHEXT_LAUNCH_BOUNDS_CHECK), which the emulation checks at every launch. Here: that
# every bounded kernel of csrc/cuda does, with the very arguments of its bounds.
def _bounded_kernels(src):
    """(bounds' arguments, kernel name, the body's first statement) of each bounded kernel."""
    found = []
    for m in re.finditer(r"__launch_bounds__\(", src):
        i, depth = m.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        name = re.match(r"\s*(\w+)\s*\(", src[i:])
        if name is None:  # prose in a comment
            continue
        j, depth = i + name.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        body = src[src.index("{", j) + 1:]
        found.append((src[m.end():i - 1], name.group(1), body[:body.index(";") + 1].strip()))
    return found


def test_every_bounded_kernel_checks_its_bounds():
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    kernels = [k for f in sorted((root / "cuda").glob("*.cu")) for k in _bounded_kernels(f.read_text())]
    kernels += _bounded_kernels((root / "emu" / "faults_emu.cpp").read_text())
    assert len(kernels) >= 10
    for bounds, name, first in kernels:
        assert first == f"ARCHEXT_LAUNCH_BOUNDS_CHECK({bounds});", (
            f"{name}: __launch_bounds__({bounds}) but its first statement is {first!r}")
