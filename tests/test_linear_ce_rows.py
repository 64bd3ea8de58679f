"""linear_cross_entropy(reduction="none"): per-token losses whose gradients, for any per-token
upstream gradient, match the unfused head + cross-entropy (libraries have shipped this backward
wrong: e.g. scaling every row by the mean of the upstream gradient)."""
import pytest
import torch
import torch.nn.functional as F

from archext import ops


def unfused(h, w, b, t, eps, coef, cap):
    """float64 reference: logits, optional tanh cap, smoothed cross-entropy + z-loss per row."""
    z = F.linear(h, w, b)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, -1)
    valid = t != -100
    tt = t.clamp(min=0)
    nll = lse - z.gather(-1, tt[..., None])[..., 0]
    smooth = lse - z.mean(-1)
    rows = (1 - eps) * nll + eps * smooth + coef * lse ** 2
    return torch.where(valid, rows, torch.zeros_like(rows))


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss_coef=1e-2, softcap=4.0)],
                         ids=["plain", "smoothing-zloss-softcap"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_and_gradients_match_unfused(opts, with_bias):
    g = torch.Generator().manual_seed(0)
    B, S, D, V = 3, 7, 16, 53
    h = torch.randn(B, S, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g).mul_(0.3).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    t = torch.randint(0, V, (B, S), generator=g)
    t[0, :2] = -100
    t[2, -1] = -100
    loss, z = ops.linear_cross_entropy(h, w, t, bias=b, reduction="none", chunk_size=4, **opts)
    assert loss.shape == t.shape and z.shape == t.shape and loss.dtype == torch.float32
    ref_in = [x.detach().double().requires_grad_() for x in (h, w)] + \
        ([b.detach().double().requires_grad_()] if with_bias else [None])
    want = unfused(*ref_in, t, opts.get("label_smoothing", 0.0), opts.get("z_loss_coef", 0.0),
                   opts.get("softcap"))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    assert (loss[t == -100] == 0).all()
    up = torch.randn(B, S, generator=g, dtype=torch.float64) * torch.arange(1, B * S + 1).view(B, S)
    (loss.double() * up).sum().backward()
    (want * up).sum().backward()
    for name, got, ref in (("hidden", h, ref_in[0]), ("weight", w, ref_in[1]), ("bias", b, ref_in[2])):
        if ref is None:
            continue
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=name)
    # The mean over the rows is the "mean" reduction, gradients included.
    h.grad = None
    mean, _ = ops.linear_cross_entropy(h, w, t, bias=b, chunk_size=4, **opts)
    rows, _ = ops.linear_cross_entropy(h, w, t, bias=b, reduction="none", chunk_size=4, **opts)
    torch.testing.assert_close(rows.sum() / (t != -100).sum(), mean)


def test_rows_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([1, -100, 3, 8, 0])
    f = lambda h, w, b: ops.linear_cross_entropy(h, w, t, bias=b, reduction="none", softcap=3.0,  # noqa: E731
                                                 z_loss_coef=0.1, label_smoothing=0.2, chunk_size=2)[0]
    assert torch.autograd.gradcheck(f, (h, w, b))


def test_rows_with_reference_ops_keep_the_target_shape():
    h, w, t = torch.randn(2, 3, 4), torch.randn(6, 4), torch.randint(0, 6, (2, 3))
    with ops.reference_ops():
        ref, _ = ops.linear_cross_entropy(h, w, t, reduction="none")
    got, _ = ops.linear_cross_entropy(h, w, t, reduction="none")
    assert ref.shape == (2, 3)
    torch.testing.assert_close(got, ref)
