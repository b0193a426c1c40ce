"""The op layer: every op is a torch.library op (``torch.ops.vlmfast.<op>``) with a fake implementation, runs inside
``torch.compile(fullgraph=True)``, and a differentiable op registers a forward and a backward per backend.

The differentiable case is exercised by a test op written to the template of ``docs/adding_an_op.md`` (two
backends: the torch reference and a backend plugged in from here), until the first real trainable op lands."""

import pytest
import torch
from torch import Tensor

from vlmfast import BackendError, _dispatch
from vlmfast.ops.calibration_bins import calibration_bins
from vlmfast.ops.equal_mass_bins import equal_mass_bins, equal_mass_bins_ref

COMPILE_BACKEND = "aot_eager"  # traces with the fake implementations exactly as inductor does, without codegen


def _inputs(M=2, N=37, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, N, C, generator=g) * 3, torch.randint(0, C, (N,), generator=g)


def test_every_op_is_a_torch_library_op_that_passes_opcheck():
    logits, labels = _inputs()
    labels2 = labels.unsqueeze(0).expand(2, -1)
    torch.library.opcheck(torch.ops.vlmfast.calibration_bins.default, (logits, labels2, 15, True, "torch"))
    torch.library.opcheck(torch.ops.vlmfast.calibration_bins.default, (logits, labels2, 7, False, "cpp"))
    conf = torch.rand(3, 50)
    correct = torch.rand(3, 50) < 0.5
    for backend in ("torch", "cpp"):
        torch.library.opcheck(torch.ops.vlmfast.equal_mass_bins.default, (conf, correct, 10, backend))


@pytest.mark.parametrize("backend", [None, "torch", "cpp"])
def test_calibration_bins_compiles_fullgraph(backend):
    logits, labels = _inputs()

    def f(x, y):
        r = calibration_bins(x, y, 10, return_samples=True, backend=backend, validate_args=False)
        return r.bin_count, r.bin_conf_sum, r.nll_sum, r.brier_sum, r.confidence, r.n_invalid

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    got, want = compiled(logits, labels), f(logits, labels)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # new shapes (dynamic) go through the same graph logic
    logits2, labels2 = _inputs(M=3, N=97, C=11, seed=1)
    for a, b in zip(compiled(logits2, labels2), f(logits2, labels2)):
        assert torch.equal(a, b)


def test_equal_mass_bins_compiles_fullgraph():
    conf = torch.rand(2, 101)
    correct = torch.rand(2, 101) < 0.7

    def f(c, k):
        (count, n_correct, conf_sum), _, _ = equal_mass_bins(c, k, 10)
        return count, n_correct, conf_sum

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    for a, b in zip(compiled(conf, correct), f(conf, correct)):
        assert torch.equal(a, b)


def test_compiled_calibration_counts_invalid_rows_instead_of_syncing():
    logits, labels = _inputs()
    logits[1, 4, 2] = float("nan")
    labels = labels.clone()
    labels[7] = 99  # outside [0, C): left out on every model

    def f(x, y):
        return calibration_bins(x, y, 10, validate_args=False).n_invalid

    assert torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)(logits, labels).tolist() == [1, 2]
    with pytest.raises(ValueError, match="labels: expected values in"):
        calibration_bins(logits, labels, 10)


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the tensor-to-host conversions (item, tolist, bool, int, float) made while active."""

    SYNCS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_one_host_sync_per_call_none_without_validation(backend):
    logits, labels = _inputs()
    with _SyncCounter() as c:
        calibration_bins(logits, labels, 15, backend=backend)
    assert c.count == 1
    with _SyncCounter() as c:
        calibration_bins(logits, labels, 15, backend=backend, validate_args=False)
    assert c.count == 0


# ----------------------------------------------------------------------------------------------------------
# A differentiable op on the template: y = normalize(x) * scale, per backend forward and backward
# ----------------------------------------------------------------------------------------------------------

TEST_OP = "test_scaled_normalize"
CALLS: list[str] = []


def _fwd_ref(x, scale):
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / norm * scale, norm.squeeze(-1)


def _bwd_ref(grad, x, scale, norm):
    n = norm.unsqueeze(-1)
    u = x / n
    gu = grad * scale
    dx = (gu - u * (gu * u).sum(-1, keepdim=True)) / n
    dscale = (grad * u).sum().reshape(scale.shape)
    return dx, dscale


_LIBRARY_OPS: list = []  # torch.library ops live for the process: defined once


def _setup_test_op():
    _dispatch.register_backend(_dispatch.Backend("plugged", "a backend registered by the test", ("cpu",), 25))
    _dispatch.define_op(TEST_OP, device_arg="x", differentiable=True)

    def fwd_torch(x, scale):
        CALLS.append("torch.forward")
        return _fwd_ref(x, scale)

    def bwd_torch(grad, x, scale, norm):
        CALLS.append("torch.backward")
        return _bwd_ref(grad, x, scale, norm)

    def fwd_plugged(x, scale):
        CALLS.append("plugged.forward")
        return _fwd_ref(x.double(), scale.double())[0].to(x.dtype), x.norm(dim=-1)

    def bwd_plugged(grad, x, scale, norm):
        CALLS.append("plugged.backward")
        dx, ds = _bwd_ref(grad.double(), x.double(), scale.double(), norm.double())
        return dx.to(x.dtype), ds.to(scale.dtype)

    _dispatch.register(TEST_OP, "torch", backward=bwd_torch)(fwd_torch)
    _dispatch.register(TEST_OP, "plugged", lambda x, **_: [] if x.dim() == 2 else ["needs 2-D x"],
                       backward=bwd_plugged)(fwd_plugged)
    if _LIBRARY_OPS:
        return
    _LIBRARY_OPS.append(True)

    @torch.library.custom_op("vlmfast_test::scaled_normalize", mutates_args=())
    def op(x: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return _dispatch.select(TEST_OP, backend or None, x=x).forward(x, scale)

    @op.register_fake
    def _(x, scale, backend):
        return torch.empty_like(x), x.new_empty(x.shape[:-1])

    @torch.library.custom_op("vlmfast_test::scaled_normalize_backward", mutates_args=())
    def op_bwd(grad: Tensor, x: Tensor, scale: Tensor, norm: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return _dispatch.select(TEST_OP, backend or None, x=x).backward(grad, x, scale, norm)

    @op_bwd.register_fake
    def _(grad, x, scale, norm, backend):
        return torch.empty_like(x), torch.empty_like(scale)

    def setup_context(ctx, inputs, output):
        x, scale, backend = inputs
        ctx.save_for_backward(x, scale, output[1])
        ctx.backend = backend

    def backward(ctx, grad_y, grad_norm):
        x, scale, norm = ctx.saved_tensors
        dx, dscale = torch.ops.vlmfast_test.scaled_normalize_backward(grad_y.contiguous(), x, scale, norm, ctx.backend)
        return dx, dscale, None

    op.register_autograd(backward, setup_context=setup_context)


def scaled_normalize(x, scale, *, backend=None):
    """The functional: resolves the backend outside compile, so forward and backward run the same one."""
    name = (backend or "") if torch.compiler.is_compiling() else _dispatch.choose(TEST_OP, backend, x=x)
    return torch.ops.vlmfast_test.scaled_normalize(x, scale, name)[0]


@pytest.fixture
def test_op():
    _setup_test_op()
    CALLS.clear()
    yield
    _dispatch.unregister_backend("plugged")  # leave the registries as other tests expect them
    _dispatch._OPS.pop(TEST_OP, None)


@pytest.mark.parametrize("backend", ["torch", "plugged"])
def test_differentiable_op_forward_and_backward_on_the_forced_backend(test_op, backend):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: scaled_normalize(a, s, backend=backend), (x, scale))
    assert f"{backend}.forward" in CALLS and f"{backend}.backward" in CALLS
    assert not any(c.startswith("torch" if backend == "plugged" else "plugged") for c in CALLS)


def test_differentiable_op_default_choice_and_refusal(test_op):
    x = torch.randn(4, 3, requires_grad=True)
    scale = torch.tensor(1.5, requires_grad=True)
    scaled_normalize(x, scale).sum().backward()
    assert CALLS == ["plugged.forward", "plugged.backward"]  # priority 25 beats torch
    with pytest.raises(BackendError, match="plugged: needs 2-D x"):
        scaled_normalize(torch.randn(2, 3, 4), scale, backend="plugged")


def test_differentiable_op_compiles_and_trains(test_op):
    x = torch.randn(6, 5, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)

    def loss_fn(a, s):
        return (scaled_normalize(a, s, backend="torch") ** 3).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=COMPILE_BACKEND)
    loss = compiled(x, scale)
    loss.backward()
    gx, gs = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None
    loss_fn(x, scale).backward()
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gs, scale.grad, atol=1e-6)
    assert "torch.backward" in CALLS
    torch.library.opcheck(torch.ops.vlmfast_test.scaled_normalize.default,
                          (torch.randn(3, 4, requires_grad=True), torch.tensor(2.0, requires_grad=True), "torch"))


# ----------------------------------------------------------------------------------------------------------
# equal_mass_bins, its own op
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, n_bins", [(1, 15), (7, 15), (1000, 15), (1023, 10), (5000, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_mass_radix_sort_matches_torch_sort(N, n_bins, dtype):
    conf = torch.rand(3, N, dtype=dtype)
    conf[:, ::3] = 0.5  # many exact ties: stability decides which tied samples share a group
    conf[1, :5] = 1.0
    correct = torch.rand(3, N) < 0.6
    got, name, note = equal_mass_bins(conf, correct, n_bins, backend="cpp")
    assert name == "cpp" and note is None
    want = equal_mass_bins_ref(conf, correct, n_bins)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=1e-12, rtol=1e-12)
    assert got[0].sum(dim=1).tolist() == [N] * 3


def test_equal_mass_bins_bad_input():
    with pytest.raises(ValueError, match=r"confidence: expected shape \(M, N\)"):
        equal_mass_bins(torch.rand(5), torch.ones(5, dtype=torch.bool), 3)
    with pytest.raises(TypeError, match="confidence: expected float32 or float64"):
        equal_mass_bins(torch.rand(2, 5).half(), torch.ones(2, 5, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"correct: expected shape \(2, 5\)"):
        equal_mass_bins(torch.rand(2, 5), torch.ones(2, 4, dtype=torch.bool), 3)
    with pytest.raises(BackendError, match="forced backend 'triton'"):
        equal_mass_bins(torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool), 3, backend="triton")


def test_every_step_honours_the_forced_backend_or_says_why():
    import vlmfast

    logits, labels = _inputs(M=2, N=200, C=4)
    r = vlmfast.calibration(logits, labels, 10, backend="cpp")
    assert r.backends == {"calibration_bins": "cpp", "equal_mass_bins": "cpp"} and r.notes == ()
    r = vlmfast.calibration(logits, labels, 10, backend="torch")
    assert r.backends == {"calibration_bins": "torch", "equal_mass_bins": "torch"} and r.notes == ()
    r = vlmfast.calibration(logits, labels, 10, backend="triton")  # the interpreter, forced (TRITON_INTERPRET=1)
    assert r.backends == {"calibration_bins": "triton", "equal_mass_bins": "cpp"}
    assert len(r.notes) == 1 and "forced backend 'triton' not used for equal_mass_bins" in r.notes[0]
    assert "no triton implementation of equal_mass_bins" in r.notes[0]
    ref = vlmfast.calibration(logits, labels, 10, backend="torch")
    torch.testing.assert_close(r.ace, ref.ace, atol=1e-6, rtol=0)


def test_forcing_through_the_environment_reaches_every_step(monkeypatch):
    import vlmfast

    logits, labels = _inputs(M=2, N=200, C=4)
    monkeypatch.setenv("VLMFAST_BACKEND", "triton")
    r = vlmfast.calibration(logits, labels, 10, binning="mass")
    assert r.backends == {"calibration_bins": "triton", "equal_mass_bins": "cpp"} and len(r.notes) == 1
    monkeypatch.setenv("VLMFAST_BACKEND", "torch")
    r = vlmfast.calibration(logits, labels, 10)
    assert r.backends == {"calibration_bins": "torch", "equal_mass_bins": "torch"} and r.notes == ()


@pytest.mark.slow
def test_calibration_bins_compiles_with_inductor():
    """The default compiler (codegen included, ~25 s on 2 cores): same numbers as eager."""
    logits, labels = _inputs()

    def f(x, y):
        r = calibration_bins(x, y, 10, validate_args=False)
        return r.bin_count, r.nll_sum * 2

    got = torch.compile(f, fullgraph=True)(logits, labels)
    for a, b in zip(got, f(logits, labels)):
        assert torch.equal(a, b)
