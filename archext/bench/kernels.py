"""Benchmark the archext kernels against PyTorch eager, torch.compile and the memory floor.

    python -m archext.bench                      # = --quick: a few minutes on a 2-core machine
    python -m archext.bench --full               # the target shapes (norms 8192x4096, 1024x4096;
                                                 # activations 8192x14336)
    python -m archext.bench --shape 256x512 --threads 1 --no-compile
    python -m archext.bench --ops glu,act --shape 8192x14336 --no-compile
    python -m archext.bench --markdown --json bench-out/results.json

Ops: the norm family (``--ops norm``: rms_norm, add_rms_norm, layer_norm, add_layer_norm) and the
activation family: the gated ``--ops glu`` (swiglu, geglu, geglu_tanh, reglu: ``act(gate) * up``
on two tensors) and the plain ``--ops act`` (gelu, gelu_tanh, relu, silu). A plain run times
``DEFAULT_OPS`` (the norms, swiglu, geglu and gelu), to stay within a few minutes.

For each op, mode (``fwd``, ``fwd+bwd``), dtype, shape and thread count it times these on the
same inputs, interleaved round by round so that drifting machine load hits them alike:

* ``archext``  the archext op (``archext.ops.*``);
* ``eager``    the PyTorch eager baseline (``F.rms_norm`` / ``F.layer_norm``, with ``x + r`` in
  front for the add variants; ``F.silu(gate) * up`` etc. for the gated activations, ``F.gelu``
  etc. for the plain ones), with PyTorch's autograd in ``fwd+bwd``;
* ``compile``  ``torch.compile`` of the plain composite in ``archext.reference`` (compiled afresh
  for every configuration, since Inductor's CPU code is specialised on the thread count);
* ``liger``    Liger-Kernel's Triton kernel for the op, on CUDA where ``liger_kernel`` imports
  (``archext.bench.liger``: RMSNorm, add + RMSNorm, LayerNorm, SwiGLU, the tanh GeGLU);
* ``floor``    an allocating copy expression that reads and writes exactly the minimum number of
  bytes the op must move (``FLOORS`` below; ``benchmarks/README.md`` explains it);
* ``copy``     the same bytes moved into preallocated buffers (``copy_``, ``out=``;
  ``COPY_FLOORS``): the device copy the GPU targets are set against.

Every time is the median of per-call samples after warm-up. Before anything is timed, archext's
outputs (and, for ``fwd+bwd``, its input gradients) are checked against the eager baseline; an op
that does not match is reported as MISMATCH and not timed, so a broken kernel cannot post a time.

``fwd+bwd`` times ``y = op(...); torch.autograd.grad(y, inputs, grad_y)`` with a fixed,
preallocated ``grad_y`` and every input and parameter requiring grad; only ``y`` is
back-propagated (the add variants' ``h`` gets no gradient). ``--grad-api backward`` times
``y.backward(grad_y)`` instead, with the ``.grad`` fields set to None (untimed) before each call.

Times are wall-clock (``time.perf_counter``) on the CPU and CUDA events on the GPU. On the CPU,
glibc's allocator is left as it is by default, so a large fresh output is page-faulted in on
every call, for archext, the baselines and the ``clone()`` floor alike (what a user's process
pays); ``--malloc reuse`` raises glibc's mmap and trim thresholds so that freed outputs are
reused without faults (see ``common.tune_malloc``), which shows the kernels' own speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import archext
from archext import reference

from . import liger
from .common import (Candidate, Timer, copy_bandwidth, cpu_model, loadavg, measure, summarize,
                     tune_malloc)

# --------------------------------------------------------------------------------------------
# The ops. Every implementation is called as fn(x, r, w, b) and returns a tuple of outputs whose
# first element is y (the add variants return (y, h)). r is None, and b is None for RMSNorm.
# --------------------------------------------------------------------------------------------
RMS_EPS = 1e-6
LN_EPS = 1e-5


def _archext_rms(x, r, w, b):
    return (archext.ops.rms_norm(x, w, RMS_EPS),)


def _archext_add_rms(x, r, w, b):
    return archext.ops.add_rms_norm(x, r, w, RMS_EPS)


def _archext_ln(x, r, w, b):
    return (archext.ops.layer_norm(x, w, b, LN_EPS),)


def _archext_add_ln(x, r, w, b):
    return archext.ops.add_layer_norm(x, r, w, b, LN_EPS)


def _eager_rms(x, r, w, b):
    return (F.rms_norm(x, (x.shape[-1],), w, RMS_EPS),)


def _eager_add_rms(x, r, w, b):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, RMS_EPS), h


def _eager_ln(x, r, w, b):
    return (F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS),)


def _eager_add_ln(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, LN_EPS), h


def _compiled(spec: "OpSpec") -> Callable:
    """A fresh torch.compile of the reference composite, adapted to fn(x, r, w, b)."""
    if spec.reference is not None:
        cref = torch.compile(spec.reference, dynamic=False)
        return lambda x, r, w, b: tuple(cref(x, r, w, b))
    name = spec.name
    cfn = torch.compile(getattr(reference, name), dynamic=False)
    if name == "rms_norm":
        return lambda x, r, w, b: (cfn(x, w, RMS_EPS),)
    if name == "add_rms_norm":
        return lambda x, r, w, b: tuple(cfn(x, r, w, RMS_EPS))
    if name == "layer_norm":
        return lambda x, r, w, b: (cfn(x, w, b, LN_EPS),)
    return lambda x, r, w, b: tuple(cfn(x, r, w, b, LN_EPS))


@dataclass(frozen=True)
class OpSpec:
    name: str
    residual: bool  # takes (x, residual), returns (y, h)
    bias: bool  # has a bias parameter
    archext: Callable
    eager: Callable
    # The activation family: "glu" ops take (gate, up) as (x, r) and return (y,); "act" ops take
    # x alone; neither has a weight. Their float64 and compiled references are `reference`,
    # fn(x, r, w, b) -> tuple over archext.reference (the norms' are looked up by name).
    family: str = "norm"
    reference: Optional[Callable] = None

    @property
    def params(self) -> bool:
        """Has a weight (and maybe a bias) parameter."""
        return self.family == "norm"

    @property
    def second_input(self) -> bool:
        """Takes r: the residual of the add variants, the up of a GLU."""
        return self.residual or self.family == "glu"

    @property
    def floor_key(self):
        return "glu" if self.family == "glu" else self.residual


OPS: dict[str, OpSpec] = {
    "rms_norm": OpSpec("rms_norm", False, False, _archext_rms, _eager_rms),
    "add_rms_norm": OpSpec("add_rms_norm", True, False, _archext_add_rms, _eager_add_rms),
    "layer_norm": OpSpec("layer_norm", False, True, _archext_ln, _eager_ln),
    "add_layer_norm": OpSpec("add_layer_norm", True, True, _archext_add_ln, _eager_add_ln),
}

# The activation family: the gated forms on (gate, up) = (x, r), and the plain activations.
# archext: archext.ops.glu / act; eager: PyTorch's own F.silu(g) * u etc. (with its autograd);
# compile: torch.compile of archext.reference.glu / act (the formulas written out).
_TORCH_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def _glu_spec(name: str, act: str) -> OpSpec:
    f = _TORCH_ACT[act]
    return OpSpec(name, False, False,
                  archext=lambda x, r, w, b: (archext.ops.glu(x, r, act),),
                  eager=lambda x, r, w, b: (f(x) * r,),
                  family="glu", reference=lambda x, r, w, b: (reference.glu(x, r, act),))


def _act_spec(act: str) -> OpSpec:
    f = _TORCH_ACT[act]
    return OpSpec(act, False, False,
                  archext=lambda x, r, w, b: (archext.ops.act(x, act),),
                  eager=lambda x, r, w, b: (f(x),),
                  family="act", reference=lambda x, r, w, b: (reference.act(x, act),))


OPS.update({
    "swiglu": _glu_spec("swiglu", "silu"),
    "geglu": _glu_spec("geglu", "gelu"),
    "geglu_tanh": _glu_spec("geglu_tanh", "gelu_tanh"),
    "reglu": _glu_spec("reglu", "relu"),
    "gelu": _act_spec("gelu"),
    "gelu_tanh": _act_spec("gelu_tanh"),
    "relu": _act_spec("relu"),
    "silu": _act_spec("silu"),
})
# Names that --ops expands.
OP_GROUPS = {
    "norm": ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"],
    "glu": ["swiglu", "geglu", "geglu_tanh", "reglu"],
    "act": ["gelu", "gelu_tanh", "relu", "silu"],
}
OP_GROUPS["activation"] = OP_GROUPS["glu"] + OP_GROUPS["act"]
OP_GROUPS["all"] = list(OPS)
MODES = ("fwd", "fwd+bwd")
# What a plain run times (benchmarks/README.md: a few minutes with --quick on 2 cores).
DEFAULT_OPS = "norm,swiglu,geglu,gelu"

# --------------------------------------------------------------------------------------------
# The memory floor. Minimum traffic of each op, in units of one [rows, width] tensor (n*E bytes,
# E = element size); the parameters (O(width)) and the per-row float32 statistics (O(rows)) are
# left out of both the op's count and the floor's:
#   fwd      rms_norm, layer_norm          read x, write y                          2
#            add_rms_norm, add_layer_norm  read x, r, write y, h                    4
#   fwd+bwd  rms_norm, layer_norm          fwd 2 + bwd read grad_y, x, write dx     5
#            add_rms_norm, add_layer_norm  fwd 4 + bwd read grad_y, h, write dx     7
#   fwd      swiglu, geglu, geglu_tanh, reglu  read gate, up, write y                 3
#   fwd+bwd  swiglu, ...                       fwd 3 + bwd read grad_y, gate, up,
#                                              write grad_gate, grad_up              8
#   (the plain activations gelu, gelu_tanh, relu, silu move what rms_norm does: 2 and 5)
# (the add variants' two input gradients are the same tensor dx, written once). The floor is an
# allocating expression that moves exactly those bytes with PyTorch's copy / add kernels:
#   x.clone() moves 2, torch.add(grad_y, x) moves 3.
# --------------------------------------------------------------------------------------------
FLOORS = {
    # (residual, mode): (expression as printed, tensors moved, fn(x, r, g))
    (False, "fwd"): ("x.clone()", 2, lambda x, r, g: x.clone()),
    (True, "fwd"): ("x.clone(); r.clone()", 4, lambda x, r, g: (x.clone(), r.clone())),
    (False, "fwd+bwd"): (
        "x.clone(); torch.add(grad_y, x)", 5, lambda x, r, g: (x.clone(), torch.add(g, x))),
    (True, "fwd+bwd"): (
        "x.clone(); r.clone(); torch.add(grad_y, x)", 7,
        lambda x, r, g: (x.clone(), r.clone(), torch.add(g, x))),
    # The gated activations, x = gate, r = up.
    ("glu", "fwd"): ("torch.add(gate, up)", 3, lambda x, r, g: torch.add(x, r)),
    ("glu", "fwd+bwd"): (
        "torch.add(gate, up); torch.add(grad_y, gate); up.clone()", 8,
        lambda x, r, g: (torch.add(x, r), torch.add(g, x), r.clone())),
}

# The same bytes moved into preallocated buffers (``copy_`` and ``out=``, no allocation): the
# device copy that the GPU targets are set against. Buffers of the op's output count are made
# once per configuration; fn(x, r, g, bufs).
COPY_FLOORS = {
    (False, "fwd"): ("y.copy_(x)", lambda x, r, g, o: o[0].copy_(x)),
    (True, "fwd"): ("y.copy_(x); h.copy_(r)", lambda x, r, g, o: (o[0].copy_(x), o[1].copy_(r))),
    (False, "fwd+bwd"): (
        "y.copy_(x); torch.add(grad_y, x, out=dx)",
        lambda x, r, g, o: (o[0].copy_(x), torch.add(g, x, out=o[1]))),
    (True, "fwd+bwd"): (
        "y.copy_(x); h.copy_(r); torch.add(grad_y, x, out=dx)",
        lambda x, r, g, o: (o[0].copy_(x), o[1].copy_(r), torch.add(g, x, out=o[2]))),
    ("glu", "fwd"): ("torch.add(gate, up, out=y)", lambda x, r, g, o: torch.add(x, r, out=o[0])),
    ("glu", "fwd+bwd"): (
        "torch.add(gate, up, out=y); torch.add(grad_y, gate, out=dg); du.copy_(up)",
        lambda x, r, g, o: (torch.add(x, r, out=o[0]), torch.add(g, x, out=o[1]), o[2].copy_(r))),
}
COPY_BUFFERS = {(False, "fwd"): 1, (True, "fwd"): 2, (False, "fwd+bwd"): 2, (True, "fwd+bwd"): 3,
                ("glu", "fwd"): 1, ("glu", "fwd+bwd"): 3}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Tolerances of the archext-vs-eager check: (rtol, atol). The eager baselines of the low-precision
# dtypes round their intermediates (the backward of F.rms_norm is a bf16 composite), so theirs
# are loose; a broken kernel is off by O(1), far outside either.
TOLS = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-2, 4e-2), torch.float16: (4e-2, 4e-2)}

PRESETS = {
    # shapes (norms; act_shapes: the activation family, a feed-forward width), threads, dtypes,
    # seconds of samples per implementation, rounds, min samples
    "quick": dict(shapes="1024x4096,2048x4096", act_shapes="1024x14336", threads="1,2",
                  dtypes="float32,bfloat16", min_time=0.15, rounds=3, min_samples=6),
    "full": dict(shapes="8192x4096,1024x4096", act_shapes="8192x14336", threads="1,2",
                 dtypes="float32,bfloat16", min_time=1.0, rounds=5, min_samples=15),
    # --full on a GPU: the issues' GPU targets are for tensors of 256 MB and more (32768 x 8192 is
    # 1 GB in float32, 512 MB in bfloat16; 32768 x 14336 1.9 GB / 940 MB). bfloat16 first: the
    # configurations run dtype by dtype, so a run cut short by a time limit has it whole.
    "full_cuda": dict(shapes="32768x8192", act_shapes="32768x14336",
                      threads="1", dtypes="bfloat16,float32", min_time=0.2, rounds=3,
                      min_samples=10),
}



# --------------------------------------------------------------------------------------------
# Correctness check
# --------------------------------------------------------------------------------------------
def check_close(names: list[str], got: list, want: list, dtype: torch.dtype,
                rows: int) -> Optional[str]:
    """None if every tensor matches, else a message. Row-reduced gradients (dweight, dbias) are
    sums over the rows, so their absolute tolerance scales with sqrt(rows)."""
    rtol, atol = TOLS.get(dtype, TOLS[torch.bfloat16])
    for name, a, e in zip(names, got, want):
        tol_a = atol * math.sqrt(rows) if name in ("dw", "db") else atol
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=tol_a, check_dtype=False)
        except AssertionError as err:
            lines = [ln.strip() for ln in str(err).splitlines()
                     if ln.strip().startswith(("Mismatched", "Greatest absolute"))]
            return f"{name}: " + ", ".join(lines or [str(err).splitlines()[0]])
    return None


def reference_outputs(spec: OpSpec, x, r, w, b, mode: str, g) -> list:
    """The float64 ground truth (archext.reference on float64 copies), in run_outputs' order."""
    def d(t):
        return None if t is None else t.detach().double().requires_grad_(mode == "fwd+bwd")
    X, Rr, W, Bb = d(x), d(r), d(w), d(b)
    if spec.reference is not None:
        outs = spec.reference(X, Rr, W, Bb)
    elif spec.residual:
        fn = getattr(reference, spec.name)
        outs = fn(X, Rr, W, Bb, LN_EPS) if spec.bias else fn(X, Rr, W, RMS_EPS)
    else:
        fn = getattr(reference, spec.name)
        outs = (fn(X, W, Bb, LN_EPS) if spec.bias else fn(X, W, RMS_EPS),)
    if mode == "fwd":
        return [o.detach() for o in outs]
    leaves = [t for t in (X, Rr, W, Bb) if t is not None]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs[0], leaves, g.double()))


def check_impl(spec: OpSpec, names, got, want, x, r, w, b, mode, g, dtype,
               rows) -> tuple[Optional[str], Optional[str]]:
    """(failure, note) of one implementation's outputs `got` against eager's `want`. It passes
    when it matches eager; failing that (the low-precision eager baselines round their
    intermediates: F.layer_norm's bf16 weight and bias gradients are off by several percent),
    when it matches the float64 reference, or is at least as close to it as eager is, tensor by
    tensor."""
    msg = check_close(names, got, want, dtype, rows)
    if msg is None:
        return None, None
    ref = reference_outputs(spec, x, r, w, b, mode, g)
    if check_close(names, got, ref, dtype, rows) is None:
        return None, f"differs from eager ({msg}), matches the float64 reference"
    for name, a, e, t in zip(names, got, want, ref):
        err_a = (a.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        if err_a > 1.25 * err_e + 1e-12 and check_close([name], [a], [t], dtype, rows):
            return (f"{msg}; vs the float64 reference: {name} max error {err_a:.3g}, "
                    f"eager's {err_e:.3g}"), None
    return None, f"differs from eager ({msg}), is as close as eager to the float64 reference"


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def output_names(spec: OpSpec, mode: str) -> list[str]:
    names = ["y", "h"] if spec.residual else ["y"]
    if mode == "fwd+bwd":
        names += (["dx"] + (["dr"] if spec.second_input else []) + (["dw"] if spec.params else [])
                  + (["db"] if spec.bias else []))
    return names


def run_outputs(fn, x, r, w, b, mode: str, g: Optional[torch.Tensor]):
    """Outputs (and, in fwd+bwd, the input gradients) of one call, with their names."""
    if mode == "fwd":
        with torch.no_grad():
            outs = fn(x, r, w, b)
        return ["y", "h"][: len(outs)], list(outs)
    leaves = [t for t in (x, r, w, b) if t is not None]
    outs = fn(x, r, w, b)
    grads = torch.autograd.grad(outs[0], leaves, g)
    names = ["y", "h"][: len(outs)] + [n for n, t in zip(("dx", "dr", "dw", "db"), (x, r, w, b))
                                       if t is not None]
    return names, [o.detach() for o in outs] + list(grads)


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------
def make_inputs(spec: OpSpec, shape, dtype, device, mode: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = rnd(*shape)
    r = rnd(*shape) if spec.second_input else None
    w = rnd(width, scale=0.1, shift=1.0) if spec.params else None
    b = rnd(width, scale=0.1) if spec.bias else None
    g = rnd(*shape) if mode == "fwd+bwd" else None
    if mode == "fwd+bwd":
        for t in (x, r, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, r, w, b, g


def timed_fn(fn, x, r, w, b, mode: str, g, grad_api: str):
    """The callable to time and its untimed per-call preparation."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, r, w, b)
        return call, None
    leaves = [t for t in (x, r, w, b) if t is not None]
    if grad_api == "autograd.grad":
        return (lambda: torch.autograd.grad(fn(x, r, w, b)[0], leaves, g)), None

    def reset():
        for t in leaves:
            t.grad = None

    def call():
        fn(x, r, w, b)[0].backward(g)
    return call, reset


def bench_config(spec: OpSpec, mode: str, dtype, shape, threads: Optional[int], device,
                 args, timer: Timer) -> dict:
    rows = math.prod(shape[:-1])
    esize = torch.empty((), dtype=dtype).element_size()
    floor_expr, floor_units, floor_fn = FLOORS[(spec.floor_key, mode)]
    copy_expr, copy_fn = COPY_FLOORS[(spec.floor_key, mode)]
    nbytes = floor_units * rows * shape[-1] * esize
    rec: dict[str, Any] = dict(
        op=spec.name, mode=mode, dtype=str(dtype).replace("torch.", ""),
        shape="x".join(map(str, shape)), threads=threads, device=str(device),
        min_bytes=nbytes, floor_expr=floor_expr, floor_bytes=nbytes, copy_floor_expr=copy_expr,
        grad_api=args.grad_api, status="ok", notes=[], impls={})
    if threads is not None:
        torch.set_num_threads(threads)
    x, r, w, b, g = make_inputs(spec, shape, dtype, device, mode, args.seed)

    impls: dict[str, Callable] = {"archext": spec.archext, "eager": spec.eager}
    if not args.no_compile:
        torch._dynamo.reset()  # Inductor's CPU kernels are specialised on the thread count
        t0 = time.perf_counter()
        try:
            cfn = _compiled(spec)
            run_outputs(cfn, x, r, w, b, mode, g)  # the one warm call: compiles
            timer.sync()
            impls["compile"] = cfn
        except Exception as e:  # noqa: BLE001  (report, do not crash)
            rec["impls"]["compile"] = dict(error=_why(e))
            rec["notes"].append(f"torch.compile failed: {_why(e)}")
            if args.verbose:
                traceback.print_exc()
        rec["compile_s"] = time.perf_counter() - t0

    # Correctness: archext (and the compiled composite) against eager, before any timing.
    try:
        names, want = run_outputs(spec.eager, x, r, w, b, mode, g)
    except Exception as e:  # noqa: BLE001  (then check against the float64 reference alone)
        names = output_names(spec, mode)
        want = reference_outputs(spec, x, r, w, b, mode, g)
        rec["impls"]["eager"] = dict(error=_why(e))
        rec["notes"].append(f"eager baseline failed ({_why(e)}): archext checked against the "
                            "float64 reference")
        del impls["eager"]
    try:
        _, got = run_outputs(spec.archext, x, r, w, b, mode, g)
        msg, note = check_impl(spec, names, got, want, x, r, w, b, mode, g, dtype, rows)
        if note is not None:
            rec["notes"].append("archext " + note)
        del got
    except Exception as e:  # noqa: BLE001
        msg = f"raised {_why(e)}"
        rec["impls"]["archext"] = dict(error=msg)
        rec["status"] = "error"
    if msg is not None:
        if rec["status"] == "ok":
            rec["status"] = "mismatch"
            rec["impls"]["archext"] = dict(error="MISMATCH vs eager: " + msg)
        rec["notes"].append(f"archext {rec['status']}, not timed: {msg}")
        del impls["archext"]
    if "compile" in impls:
        try:
            _, got = run_outputs(impls["compile"], x, r, w, b, mode, g)
            cmsg, _ = check_impl(spec, names, got, want, x, r, w, b, mode, g, dtype, rows)
            if cmsg is not None:
                rec["notes"].append(f"torch.compile baseline is wrong (timed anyway): {cmsg}")
            del got
        except Exception as e:  # noqa: BLE001
            rec["impls"]["compile"] = dict(error=_why(e))
            rec["notes"].append(f"torch.compile baseline failed: {_why(e)}")
            del impls["compile"]
    lg = liger_candidate(spec, x, r, w, b, mode, g, device, dtype, rows, names, want, rec, args)
    del want

    cands = []
    for name, fn in impls.items():
        call, pre = timed_fn(fn, x, r, w, b, mode, g, args.grad_api)
        cands.append(Candidate(name, call, pre))
    if lg is not None:
        cands.append(lg)
    xd, rd = x.detach(), (r.detach() if r is not None else None)

    def floor_call():
        with torch.no_grad():
            return floor_fn(xd, rd, g)
    cands.append(Candidate("floor", floor_call))
    # The same bytes into preallocated buffers: no allocation, no page faults.
    bufs = [torch.empty_like(xd) for _ in range(COPY_BUFFERS[(spec.floor_key, mode)])]

    def copy_call():
        with torch.no_grad():
            return copy_fn(xd, rd, g, bufs)
    cands.append(Candidate("copy", copy_call))

    measure(timer, cands, args.min_time, args.rounds, args.min_samples)
    for c in cands:
        rec["impls"][c.name] = summarize(c.samples)
        n = len(c.samples)
        rec["impls"][c.name].update(
            page_faults_per_call=round(c.minflt / n, 2),
            preemptions_per_call=round(c.nivcsw / n, 3),
            cpu_util=(round(c.cpu / c.wall / threads, 3)
                      if c.wall > 0 and threads is not None else None))

    # Derived numbers, from the medians.
    def ms(name):
        return rec["impls"].get(name, {}).get("median_ms")
    a, e, c, fl = ms("archext"), ms("eager"), ms("compile"), ms("floor")
    lk, cp = ms("liger"), ms("copy")
    gbs = (lambda t: nbytes / (t * 1e-3) / 1e9 if t else None)
    rec["derived"] = dict(
        archext_gbs=gbs(a), floor_gbs=gbs(fl), eager_gbs=gbs(e), compile_gbs=gbs(c),
        liger_gbs=gbs(lk), copy_gbs=gbs(cp),
        x_floor=(fl / a) if (a and fl) else None,
        x_copy=(cp / a) if (a and cp) else None,
        vs_eager=(e / a) if (a and e) else None,
        vs_compile=(c / a) if (a and c) else None,
        vs_liger=(lk / a) if (a and lk) else None)
    return rec


def liger_candidate(spec: OpSpec, x, r, w, b, mode: str, g, device, dtype, rows, names, want,
                    rec: dict, args) -> Optional[Candidate]:
    """The Liger-Kernel candidate of this configuration, checked against eager like archext, or
    None (with rec["liger"] saying why) where Liger has not got the op or cannot run. The
    tensors Liger writes into (liger.KernelImpl.clobbers) are its own copies, restored from the
    originals before every call, untimed."""
    if getattr(args, "no_liger", False):
        rec["liger"] = "--no-liger"
        return None
    impl, why = liger.kernel_impl(spec.name, device)
    if impl is None:
        rec["liger"] = why
        if device.type == "cuda":
            rec["notes"].append(f"no Liger-Kernel baseline: {why}")
        return None
    rec["liger"] = impl.note or "liger_kernel " + str(liger.version())
    clob = impl.clobbers if mode == "fwd+bwd" else ()
    own = {"x": x, "r": r, "g": g}
    for n in clob:
        t = own[n]
        own[n] = t.detach().clone().requires_grad_(t.requires_grad)
    lx, lr, lg = own["x"], own["r"], own["g"]

    def restore():
        with torch.no_grad():
            for n in clob:
                own[n].copy_({"x": x, "r": r, "g": g}[n])
    try:
        _, got = run_outputs(impl.fn, lx, lr, w, b, mode, lg)
        msg, note = check_impl(spec, names, got, want, x, r, w, b, mode, g, dtype, rows)
        del got
    except Exception as e:  # noqa: BLE001
        rec["impls"]["liger"] = dict(error=_why(e))
        rec["notes"].append(f"Liger-Kernel failed: {_why(e)}")
        if args.verbose:
            traceback.print_exc()
        return None
    if msg is not None:
        rec["notes"].append(f"Liger-Kernel differs from eager (timed anyway): {msg}")
    elif note is not None:
        rec["notes"].append("Liger-Kernel " + note)
    restore()
    call, pre = timed_fn(impl.fn, lx, lr, w, b, mode, lg, args.grad_api)
    if clob:
        pre = (lambda p=pre: (restore(), p and p())) if pre is not None else restore
    return Candidate("liger", call, pre)


# --------------------------------------------------------------------------------------------
# The header: the machine and the copy bandwidth
# --------------------------------------------------------------------------------------------
def machine_info(device, threads: list, timer: Timer, args) -> dict:
    info = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__,
        archext=archext.__version__, archext_cpu_isa=archext._C.cpu_isa(),
        python=platform.python_version(), device=str(device), loadavg_start=loadavg())
    info["liger_kernel"] = liger.version()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["copy_gbs"] = {"d2d": copy_bandwidth(device, timer, 1 << 30)}
    elif not args.no_copy_bw:
        info["copy_gbs"] = {}
        for t in threads:
            torch.set_num_threads(t)
            info["copy_gbs"][str(t)] = copy_bandwidth(device, timer, 256 << 20)
    return info


def header_lines(info: dict) -> list[str]:
    lines = [f"archext {info['archext']} benchmark, {info['date']}",
             f"CPU: {info['cpu']} ({info['cores']} logical cores), archext CPU ISA: "
             f"{info['archext_cpu_isa']}, torch {info['torch']}, Python {info['python']}, "
             f"load average {info['loadavg_start']}"
             + (f" at start, {info['loadavg_end']} at end" if "loadavg_end" in info else ""),
             f"malloc: {info['malloc']}"]
    if (info.get("loadavg_start") or 0) >= 1.0 and info["device"] == "cpu":
        lines.append(f"WARNING: load average {info['loadavg_start']} on {info['cores']} logical "
                     "cores before the run began: other processes are running, the times (the "
                     "multi-threaded ones most) are unreliable")
    if "gpu" in info:
        lines.append(f"GPU: {info['gpu']}; device-to-device copy_ (1 GiB, read + write): "
                     f"{info['copy_gbs']['d2d']:.0f} GB/s; liger_kernel "
                     f"{info.get('liger_kernel') or 'not importable'}")
    elif info.get("copy_gbs"):
        bw = ", ".join(f"{v:.1f} GB/s at {k} thread{'s' if k != '1' else ''}"
                       for k, v in info["copy_gbs"].items())
        lines.append(f"copy_ bandwidth (256 MiB float32 dst.copy_(src), read + write): {bw}")
    return lines


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
COLUMNS = ["op", "mode", "dtype", "shape", "threads", "archext ms", "GB/s", "x floor", "x copy_",
           "eager ms", "compile ms", "liger ms", "vs eager", "vs compile", "vs liger",
           "floor GB/s", "copy_ GB/s"]


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


NOISY = 0.2  # interquartile range over median above which a time is marked "~"
MIN_CPU_UTIL = 0.85  # CPU seconds / (threads x wall seconds) below which a time is marked "~"
NOISE_LEGEND = (
    f"~ marks a time taken while other processes held the cores (the benchmark's threads ran "
    f"under {MIN_CPU_UTIL:.0%} of the wall time) or whose samples spread widely (interquartile "
    f"range over {NOISY:.0%} of the median); on x floor: the archext or the floor time. Rerun "
    "on a quiet machine.")


def noisy(i: Optional[dict]) -> bool:
    if not i or "median_ms" not in i:
        return False
    util = i.get("cpu_util")
    return ((i["q3_ms"] - i["q1_ms"]) > NOISY * i["median_ms"]
            or (util is not None and util < MIN_CPU_UTIL))


def row_cells(rec: dict) -> list[str]:
    d = rec.get("derived", {})
    imp = rec["impls"]

    def ms_or(name):
        i = imp.get(name)
        if i is None:
            return "-"
        if "error" in i:
            return "MISMATCH" if i["error"].startswith("MISMATCH") else "error"
        return _ms(i["median_ms"]) + ("~" if noisy(i) else "")
    def ratio(key, floor):
        v = _f(d.get(key), ".2f")
        if d.get(key) is not None and (noisy(imp.get("archext")) or noisy(imp.get(floor))):
            v += "~"
        return v
    return [rec["op"], rec["mode"], rec["dtype"], rec["shape"],
            "-" if rec["threads"] is None else str(rec["threads"]),
            ms_or("archext"), _f(d.get("archext_gbs"), ".1f"), ratio("x_floor", "floor"),
            ratio("x_copy", "copy"), ms_or("eager"), ms_or("compile"), ms_or("liger"),
            _f(d.get("vs_eager"), ".2f"), _f(d.get("vs_compile"), ".2f"),
            _f(d.get("vs_liger"), ".2f"), _f(d.get("floor_gbs"), ".1f"),
            _f(d.get("copy_gbs"), ".1f")]


def format_text(recs: list[dict]) -> str:
    rows = [COLUMNS] + [row_cells(r) for r in recs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = {0, 1, 2, 3}

    def fmt(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in rows[1:]])


def format_markdown(recs: list[dict]) -> str:
    align = ["---"] * 4 + ["--:"] * (len(COLUMNS) - 4)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(row_cells(r)) + " |" for r in recs]
    return "\n".join(out)


def notes_lines(recs: list[dict]) -> list[str]:
    out = []
    for r in recs:
        for n in r["notes"]:
            out.append(f"{r['op']} {r['mode']} {r['dtype']} {r['shape']} "
                       f"threads={r['threads']}: {n}")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def parse_shape(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {s!r}: expected ROWSxWIDTH, e.g. 1024x4096")
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {s!r}: expected ROWSxWIDTH, e.g. 1024x4096")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archext-bench",
        description="Time the archext ops (fwd, fwd+bwd) against PyTorch eager, "
                    "torch.compile and the memory floor. Default: --quick.",
        epilog="The other benchmarks are subcommands: `archext-bench rope --help` (RoPE), "
               "`archext-bench loss --help` (cross-entropy, attention softmax, fused linear "
               "cross-entropy memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="shapes 1024x4096,2048x4096 (norms), 1024x14336 (activations), "
                             "threads 1,2, float32 and bfloat16, short sampling (the default)")
    preset.add_argument("--full", action="store_true",
                        help="the target shapes 8192x4096,1024x4096 (norms), 8192x14336 "
                             "(activations), longer sampling")
    p.add_argument("--ops", default=DEFAULT_OPS,
                   help="comma-separated ops or groups: " + ", ".join(OPS) + "; groups "
                        + ", ".join(f"{k} ({','.join(v)})" if k != "all" else k
                                    for k, v in OP_GROUPS.items()))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--dtype", default=None,
                   help="comma-separated: float32, bfloat16, float16 (default: from the preset)")
    p.add_argument("--shape", default=None,
                   help="comma-separated ROWSxWIDTH, e.g. 8192x4096,1024x4096, for every op "
                        "(default: the preset's, per family)")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch.set_num_threads values, CPU only (default: preset)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-liger", action="store_true",
                   help="skip the Liger-Kernel baselines (run on CUDA when liger_kernel imports)")
    p.add_argument("--grad-api", default="autograd.grad", choices=["autograd.grad", "backward"],
                   help="how fwd+bwd back-propagates: torch.autograd.grad(y, inputs, grad_y), or "
                        "y.backward(grad_y) into .grad (set to None, untimed, before each call; "
                        "the add variants then pay autograd's copy of dx into a second .grad)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per implementation and configuration (default: preset)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of samples (default: preset)")
    p.add_argument("--malloc", default="default", choices=["reuse", "default"],
                   help="reuse: raise glibc's mmap/trim thresholds so that outputs are not "
                        "page-faulted in on every call; default: leave glibc as it is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    p.add_argument("--markdown", action="store_true",
                   help="print a GitHub markdown table (for benchmarks/RESULTS.md)")
    p.add_argument("--no-copy-bw", action="store_true",
                   help="skip the copy_ bandwidth measurement of the header (CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of compile failures")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    if args.full and args.device == "cuda":
        preset = PRESETS["full_cuda"]
    ops = []
    for o in _csv(args.ops):
        if o not in OPS and o not in OP_GROUPS:
            p.error(f"unknown op {o!r}; choose from {', '.join(OPS)} or a group: "
                    f"{', '.join(OP_GROUPS)}")
        ops += [x for x in OP_GROUPS.get(o, [o]) if x not in ops]
    modes = _csv(args.modes)
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    dtypes = []
    for d in _csv(args.dtype or preset["dtypes"]):
        if d.lower() not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from float32, bfloat16, float16")
        dtypes.append(DTYPES[d.lower()])
    try:
        shapes_of = {  # per family: the norms' shapes, or a feed-forward width for activations
            fam: [parse_shape(s) for s in _csv(args.shape or preset[key])]
            for fam, key in (("norm", "shapes"), ("glu", "act_shapes"), ("act", "act_shapes"))}
        threads = [int(t) for t in _csv(args.threads or preset["threads"])]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if any(t < 1 for t in threads):
        p.error("--threads must be positive")
    args.min_time = preset["min_time"] if args.min_time is None else args.min_time
    args.rounds = max(1, preset["rounds"] if args.rounds is None else args.rounds)
    args.min_samples = preset["min_samples"]

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device visible to torch")
        if not archext._C.built_with_cuda():
            print("archext-bench: archext was built without its CUDA kernels; the archext column "
                  "will show 'error' (rebuild with a CUDA toolkit)", file=sys.stderr)
        device = torch.device("cuda", torch.cuda.current_device())
        thread_list: list[Optional[int]] = [None]  # host threads do not matter for GPU kernels
    else:
        ncpu = os.cpu_count() or 1
        if max(threads) > ncpu:
            print(f"archext-bench: warning: {max(threads)} threads on {ncpu} logical cores",
                  file=sys.stderr)
        thread_list = list(threads)

    malloc = "glibc defaults (--malloc default)" if args.malloc == "default" else tune_malloc()
    timer = Timer(device)
    t_start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    info = machine_info(device, [t for t in thread_list if t is not None], timer, args)
    info["malloc"] = malloc
    for line in header_lines(info):
        print(line, file=sys.stderr)

    recs = []
    configs = [(o, m, d, s, t) for o in ops for m in modes for d in dtypes
               for s in shapes_of[OPS[o].family] for t in thread_list]
    table_order = {c[:4]: i for i, c in enumerate(configs)}
    if device.type == "cuda":
        # dtype by dtype (the preset's first first), so that a run stopped by a time limit has
        # every op of the first dtype; the table keeps the op-major order.
        configs.sort(key=lambda c: dtypes.index(c[2]))
    for i, (o, m, d, s, t) in enumerate(configs, 1):
        label = (f"[{i}/{len(configs)}] {o} {m} {str(d).replace('torch.', '')} "
                 f"{'x'.join(map(str, s))}" + (f" threads={t}" if t is not None else ""))
        t0 = time.perf_counter()
        rec = bench_config(OPS[o], m, d, s, t, device, args, timer)
        recs.append(rec)
        cells = dict(zip(COLUMNS, row_cells(rec)))
        print(f"{label}: archext {cells['archext ms']} ms ({cells['GB/s']} GB/s), x floor "
              f"{cells['x floor']}, x copy_ {cells['x copy_']}, eager {cells['eager ms']} ms, "
              f"compile {cells['compile ms']} ms, liger {cells['liger ms']} ms "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        for n in rec["notes"]:
            print(f"    {n}", file=sys.stderr)
        if args.json:  # after every configuration: a run stopped by a time limit keeps its rows
            _write_json(args.json, info, args, recs, partial=True)
    recs.sort(key=lambda r: table_order[(r["op"], r["mode"], DTYPES[r["dtype"]],
                                         parse_shape(r["shape"]))])
    torch.set_num_threads(saved_threads)
    info["wall_s"] = time.perf_counter() - t_start
    info["loadavg_end"] = loadavg()

    head = header_lines(info)
    notes = notes_lines(recs)
    floors = sorted({(r["op"], r["mode"], r["floor_expr"]) for r in recs},
                    key=lambda k: (ops.index(k[0]), modes.index(k[1])))
    if args.markdown:
        print("\n".join(f"{h}  " for h in head))
        print()
        print(format_markdown(recs))
        if any(noisy(i) for r in recs for i in r["impls"].values()):
            print()
            print(NOISE_LEGEND)
        print()
        print("Floor expressions: " + "; ".join(f"{o} {m}: `{e}`" for o, m, e in floors) + ".")
        copies = sorted({(r["op"], r["mode"], r["copy_floor_expr"]) for r in recs},
                        key=lambda k: (ops.index(k[0]), modes.index(k[1])))
        print()
        print("copy_ expressions (the same bytes into preallocated buffers): "
              + "; ".join(f"{o} {m}: `{e}`" for o, m, e in copies) + ".")
        if notes:
            print()
            print("\n".join(f"- {n}" for n in notes))
    else:
        print("\n".join(head))
        print()
        print(format_text(recs))
        if any(noisy(i) for r in recs for i in r["impls"].values()):
            print(NOISE_LEGEND)
        if notes:
            print()
            print("Notes:")
            print("\n".join(f"  {n}" for n in notes))
    print(f"\n(wall time {info['wall_s']:.0f} s)", file=sys.stderr)

    if args.json:
        _write_json(args.json, info, args, recs, partial=False)
        print(f"wrote {args.json}", file=sys.stderr)
    bad = [r for r in recs if r["status"] != "ok"]
    return 1 if bad else 0


def _write_json(path: str, info: dict, args, recs: list, partial: bool) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=dict(info, partial=partial), args=dict(vars(args)), results=recs), f,
                  indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
