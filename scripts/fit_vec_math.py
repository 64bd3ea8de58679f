"""Reproduces the coefficients of the vectorised erf, fast erf and tanh in csrc/cpu/vec.h.

    .venv/bin/python scripts/fit_vec_math.py

Every fit is a minimax fit (Lawson's iteratively reweighted least squares, on a dense Chebyshev
grid, against mpmath at 30 digits) of the error that matters for a float32 result:

* verf, |x| < 1:        erf(x) = x P(x^2), P of degree 6               relative error of erf
* verf, 1 <= |x| <= 4:  erf(x) = 1 - exp(-x^2) Q(|x| - 1), Q of degree 8, Q ~ erfc(x) exp(x^2),
                        absolute error of erf (weight exp(-x^2)); beyond 4 erf rounds to 1
* vtanh, |x| < 0.625:   tanh(x) = x + x^3 P(x^2), P of degree 4         relative error of tanh
                        (beyond, tanh = 1 - 2 / (exp(2|x|) + 1), exact but for exp's rounding)
* verf_fast, |x| < 4:   erf(x) = x P(x^2) / Q(x^2), degrees 6 / 5, Q(0) = 1, relative error: the
                        Sanathanan-Koerner iteration (least squares of f Q - P weighted by 1 / Q of
                        the previous step) with Lawson's reweighting

The polynomial fits reproduce Cephes' erff and tanhf coefficients to about 7 digits. For the
rational fit it also prints the error of its float32 evaluation (Horner with FMA, emulated), in
ulps, which tests/test_activation.py bounds on every ISA. The exp kernel is Cephes' expf, whose
coefficients are the published ones.
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 30


def fit_rational(s, f, w, deg_p: int, deg_q: int, iters: int = 60, lawson: int = 40):
    """p, q (q[0] = 1) minimising max |w (f - P(s) / Q(s))|, and that maximum."""
    q_prev = np.ones_like(s)
    u = np.full(len(s), 1.0 / len(s))
    for it in range(iters):
        a = np.concatenate([-np.stack([s ** k for k in range(deg_p + 1)], 1),
                            np.stack([f * s ** k for k in range(1, deg_q + 1)], 1)], 1)
        sc = w / np.abs(q_prev) * np.sqrt(u)
        c, *_ = np.linalg.lstsq(a * sc[:, None], -f * sc, rcond=None)
        p, q = c[: deg_p + 1], np.concatenate([[1.0], c[deg_p + 1:]])
        big_q = sum(q[k] * s ** k for k in range(deg_q + 1))
        err = np.abs(w * (f - sum(p[k] * s ** k for k in range(deg_p + 1)) / big_q))
        q_prev = big_q
        if it >= iters - lawson:
            u = u * err
            u /= u.sum()
    return p, q, err.max()


def horner_f32(c, s):
    """Horner in float32 with a fused multiply-add per step (emulated in float64)."""
    s = s.astype(np.float32).astype(np.float64)
    r = np.full_like(s, np.float32(c[-1]))
    for k in range(len(c) - 2, -1, -1):
        r = (r * s + np.float64(np.float32(c[k]))).astype(np.float32).astype(np.float64)
    return r.astype(np.float32)


def lawson(basis: np.ndarray, f: np.ndarray, w: np.ndarray, iters: int = 300):
    """Coefficients c minimising max |w (f - basis @ c)|, and that maximum."""
    u = np.full(len(f), 1.0 / len(f))
    for _ in range(iters):
        sc = w * np.sqrt(u)
        c, *_ = np.linalg.lstsq(basis * sc[:, None], f * sc, rcond=None)
        e = np.abs(w * (f - basis @ c))
        u = u * e
        u /= u.sum()
    return c, e.max()


def grid(lo: float, hi: float, n: int = 4000) -> np.ndarray:
    return np.cos(np.linspace(0, np.pi, n)) * (hi - lo) / 2 + (hi + lo) / 2


def show(name: str, c, err: float) -> None:
    print(f"{name}: max error {err:.3g}, coefficients from the constant term up:")
    print("  " + ", ".join(f"{v:.9e}f" for v in c))


def fit_polynomials() -> None:
    xs = grid(0.0, 1.0)
    xs = xs[xs > 1e-4]
    f = np.array([float(mp.erf(mp.mpf(x)) / x) for x in xs])
    c, e = lawson(np.stack([xs ** (2 * k) for k in range(7)], 1), f, 1 / f)
    show("verf |x| < 1, P(x^2) (relative)", c, e)

    xs = grid(1.0, 4.0)
    q = np.array([float(mp.erfc(mp.mpf(x)) * mp.exp(mp.mpf(x) ** 2)) for x in xs])
    c, e = lawson(np.stack([(xs - 1) ** k for k in range(9)], 1), q, np.exp(-xs ** 2))
    show("verf 1 <= |x| <= 4, Q(|x| - 1) (absolute, of erf)", c, e)

    xs = grid(0.0, 0.625)
    xs = xs[xs > 1e-4]
    t = np.array([float(mp.tanh(mp.mpf(x))) for x in xs])
    f = np.array([float((mp.tanh(mp.mpf(x)) - x) / x ** 3) for x in xs])
    c, e = lawson(np.stack([xs ** (2 * k) for k in range(5)], 1), f, xs ** 3 / t)
    show("vtanh |x| < 0.625, P(x^2) (relative)", c, e)


def fit_odd_rational(name: str, fn, limit: float, deg_p: int, deg_q: int) -> None:
    xs = np.unique(np.concatenate([np.linspace(0, limit, 8000)[1:],
                                   limit * np.sin(np.linspace(0, np.pi / 2, 4000))[1:]]))
    vals = np.array([float(fn(mp.mpf(x))) for x in xs])
    p, q, e = fit_rational(xs ** 2, vals / xs, xs / vals, deg_p, deg_q)
    x32 = xs.astype(np.float32)
    s32 = (x32 * x32).astype(np.float32)
    y = (x32 * horner_f32(p, s32) / horner_f32(q, s32)).astype(np.float32)
    ref = np.array([float(fn(mp.mpf(float(v)))) for v in x32])
    ulps = np.abs(y.astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32))
    print(f"{name}, |x| <= {limit}: fit relative error {e:.2e}, float32 evaluation "
          f"{ulps.max():.2f} ulp (at x = {xs[ulps.argmax()]:.4f})")
    print("  P: " + ", ".join(f"{v:.9e}f" for v in p))
    print("  Q: " + ", ".join(f"{v:.9e}f" for v in q))


def main() -> None:
    fit_polynomials()
    fit_odd_rational("verf_fast", mp.erf, 4.0, 6, 5)


if __name__ == "__main__":
    main()
