"""myext.nn modules behave like the torch.nn modules they replace."""

import io
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import myext
from myext.nn import CrossEntropyLoss, FusedLinearReLU

CPU_BACKENDS = [b for b in myext.available_backends("cpu") if b != "triton"]


def plain_pair(in_features=6, out_features=4, bias=True):
    """A FusedLinearReLU and the nn.Linear (+ ReLU) it replaces, with the same weights."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    fused = FusedLinearReLU(in_features, out_features, bias=bias)
    fused.load_state_dict(linear.state_dict())
    return fused, linear


def saved_and_loaded(obj, weights_only=True):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


# ------------------------------------------------------------------ FusedLinearReLU

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_initialisation_is_nn_linears(bias):
    torch.manual_seed(3)
    linear = nn.Linear(20, 7, bias=bias)
    torch.manual_seed(3)
    fused = FusedLinearReLU(20, 7, bias=bias)
    assert list(fused.state_dict()) == list(linear.state_dict())
    for key, value in linear.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    torch.manual_seed(4)
    fused.reset_parameters()
    torch.manual_seed(4)
    linear.reset_parameters()
    assert torch.equal(fused.weight, linear.weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 3, 6)], ids=str)
def test_matches_linear_then_relu(backend, bias, shape):
    fused, linear = plain_pair(bias=bias)
    fused.backend = backend
    x = torch.randn(shape, requires_grad=True)
    out = fused(x)
    out_ref = F.relu(linear(x))
    torch.testing.assert_close(out, out_ref)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *fused.parameters()], grad)
    grads_ref = torch.autograd.grad(out_ref, [x, *linear.parameters()], grad)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_repr():
    assert repr(FusedLinearReLU(784, 128)) == "FusedLinearReLU(in_features=784, out_features=128, bias=True)"
    assert repr(FusedLinearReLU(3, 2, bias=False, backend="cpp")) == (
        "FusedLinearReLU(in_features=3, out_features=2, bias=False, backend='cpp')")
    assert repr(nn.Linear(784, 128)).replace("Linear", "FusedLinearReLU") == repr(FusedLinearReLU(784, 128))


def test_constructor_device_and_dtype():
    fused = FusedLinearReLU(5, 3, device="meta", dtype=torch.float64)
    assert fused.weight.device.type == "meta" and fused.bias.dtype == torch.float64


def test_state_dict_round_trip_with_nn_linear():
    fused, linear = plain_pair()
    with torch.no_grad():
        fused.weight.mul_(2)
    linear.load_state_dict(fused.state_dict())  # and back, strict
    assert torch.equal(linear.weight, fused.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        FusedLinearReLU(6, 4).load_state_dict({"weight": torch.zeros(4, 6)})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_to_and_half(dtype):
    fused, linear = plain_pair()
    fused = fused.half() if dtype == torch.float16 else fused.to(dtype)
    linear = linear.to(dtype)
    assert fused.weight.dtype == fused.bias.dtype == dtype
    assert isinstance(fused.weight, nn.Parameter)
    x = torch.randn(5, 6, dtype=dtype)
    out = fused(x)
    assert out.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float64 else {}
    torch.testing.assert_close(out, F.relu(linear(x)), **tol)


def test_torch_save_and_load():
    fused = FusedLinearReLU(6, 4, backend="torch")
    x = torch.randn(3, 6)
    loaded = saved_and_loaded(fused, weights_only=False)
    assert loaded.backend == "torch"
    torch.testing.assert_close(loaded(x), fused(x))
    state = saved_and_loaded(fused.state_dict())
    fresh = FusedLinearReLU(6, 4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), fused(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear_shares_parameters(bias):
    linear = nn.Linear(6, 4, bias=bias).eval()
    fused = FusedLinearReLU.from_linear(linear, backend="torch")
    assert fused.weight is linear.weight and fused.bias is linear.bias
    assert not fused.training and fused.backend == "torch"
    assert fused.weight.device == linear.weight.device
    x = torch.randn(3, 6)
    torch.testing.assert_close(fused(x), F.relu(linear(x)))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        FusedLinearReLU.from_linear(nn.Conv1d(3, 3, 1))

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="expects an nn.Linear"):
        FusedLinearReLU.from_linear(Scaled(3, 3))
    with pytest.raises(ValueError, match="initialised"):
        FusedLinearReLU.from_linear(nn.LazyLinear(3))


# ------------------------------------------------------------------ CrossEntropyLoss

CE_CONFIGS = [
    dict(),
    dict(weight=torch.rand(5) + 0.5),
    dict(ignore_index=2, reduction="sum"),
    dict(reduction="none", label_smoothing=0.2),
    dict(weight=torch.rand(5) + 0.5, ignore_index=0, label_smoothing=0.1),
]


# PyTorch rejects ignore_index with probability targets, so those pairs are not compared.
CE_CASES = [pytest.param(config, kind, id=f"{kind}-{','.join(config) or 'default'}")
            for kind in ("indices", "probabilities", "spatial") for config in CE_CONFIGS
            if not (kind == "probabilities" and "ignore_index" in config)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("config,target_kind", CE_CASES)
def test_cross_entropy_loss_matches_torch(backend, config, target_kind):
    if target_kind == "spatial":
        logits, target = torch.randn(4, 5, 3, requires_grad=True), torch.randint(0, 5, (4, 3))
    else:
        logits = torch.randn(7, 5, requires_grad=True)
        target = torch.randint(0, 5, (7,)) if target_kind == "indices" else torch.softmax(torch.randn(7, 5), 1)
    ours, ref = CrossEntropyLoss(**config, backend=backend), nn.CrossEntropyLoss(**config)
    loss, loss_ref = ours(logits, target), ref(logits, target)
    torch.testing.assert_close(loss, loss_ref)
    grad = torch.randn_like(loss)
    torch.testing.assert_close(torch.autograd.grad(loss, logits, grad)[0],
                               torch.autograd.grad(loss_ref, logits, grad)[0])


def test_cross_entropy_loss_module_surface():
    assert isinstance(CrossEntropyLoss(), nn.CrossEntropyLoss)
    assert repr(CrossEntropyLoss()) == repr(nn.CrossEntropyLoss()) == "CrossEntropyLoss()"
    assert repr(CrossEntropyLoss(backend="cpp")) == "CrossEntropyLoss(backend='cpp')"
    weight = torch.rand(5)
    ours, ref = CrossEntropyLoss(weight, ignore_index=1), nn.CrossEntropyLoss(weight, ignore_index=1)
    assert dict(ours.named_buffers()).keys() == dict(ref.named_buffers()).keys() == {"weight"}
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert ours.weight is weight  # a buffer, as in torch, not a copy
    assert list(CrossEntropyLoss().state_dict()) == []
    # Same positional order as nn.CrossEntropyLoss: weight, size_average, ignore_index, reduce, reduction, ...
    positional = CrossEntropyLoss(weight, None, 3, None, "sum", 0.25)
    assert (positional.ignore_index, positional.reduction, positional.label_smoothing) == (3, "sum", 0.25)


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True)])
def test_cross_entropy_loss_deprecated_arguments(size_average, reduce):
    with pytest.warns(UserWarning):
        ours = CrossEntropyLoss(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        ref = nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert ours.reduction == ref.reduction
    logits, target = torch.randn(4, 3), torch.randint(0, 3, (4,))
    torch.testing.assert_close(ours(logits, target), ref(logits, target))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cross_entropy_loss_to_and_half(dtype):
    ours = CrossEntropyLoss(torch.rand(5) + 0.5)
    ours = ours.half() if dtype == torch.float16 else ours.to(dtype)
    assert ours.weight.dtype == dtype
    logits, target = torch.randn(6, 5, dtype=dtype), torch.randint(0, 5, (6,))
    loss = ours(logits, target)
    assert loss.dtype == dtype
    ref = F.cross_entropy(logits.double(), target, weight=ours.weight.double())
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)


def test_cross_entropy_loss_save_load_and_from_torch():
    weight = torch.rand(5) + 0.5
    ours = CrossEntropyLoss(weight, reduction="sum", label_smoothing=0.1, backend="torch")
    loaded = saved_and_loaded(ours, weights_only=False)
    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    torch.testing.assert_close(loaded(logits, target), ours(logits, target))
    assert loaded.backend == "torch"
    fresh = CrossEntropyLoss(torch.ones(5))
    fresh.load_state_dict(saved_and_loaded(nn.CrossEntropyLoss(weight).state_dict()))
    assert torch.equal(fresh.weight, weight)

    torch_loss = nn.CrossEntropyLoss(weight, ignore_index=1, reduction="none", label_smoothing=0.3).eval()
    converted = CrossEntropyLoss.from_torch(torch_loss, backend="cpp")
    assert converted.weight is torch_loss.weight and not converted.training
    torch.testing.assert_close(converted(logits, target), torch_loss(logits, target))
    with pytest.raises(TypeError, match="expects an nn.CrossEntropyLoss"):
        CrossEntropyLoss.from_torch(nn.NLLLoss())


# ------------------------------------------------------------------ DistributedDataParallel

def _ddp_check(rank, world_size):
    """DDP over FusedLinearReLU + CrossEntropyLoss on this rank's share of the batch gives
    every rank the gradient of the mean over ranks, as plain PyTorch computes it."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = nn.Sequential(FusedLinearReLU(6, 5), nn.Linear(5, 3))
    model.load_state_dict({k.replace("2.", "1."): v for k, v in reference.state_dict().items()})
    ddp = nn.parallel.DistributedDataParallel(model)
    x_all, y_all = torch.randn(8, 6), torch.randint(0, 3, (8,))

    loss = CrossEntropyLoss()(ddp(x_all[rank::world_size]), y_all[rank::world_size])
    loss.backward()

    ref_loss = sum(F.cross_entropy(reference(x_all[r::world_size]), y_all[r::world_size])
                   for r in range(world_size)) / world_size
    ref_loss.backward()
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)

    torch.optim.SGD(ddp.parameters(), lr=0.5).step()
    gathered = [torch.empty_like(model[0].weight) for _ in range(world_size)]
    dist.all_gather(gathered, model[0].weight.detach())
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def _ddp_worker(rank, world_size, init_file):
    # A forked child must not enter the parent's OpenMP pool (the DataLoader workers' rule).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # In a function of its own, so that DDP is gone before its process group: a DDP
        # object outliving destroy_process_group can hang in its destructor.
        _ddp_check(rank, world_size)
    finally:
        dist.destroy_process_group()


DDP_TIMEOUT_S = 120


def test_distributed_data_parallel(tmp_path):
    # DDP's constructor imports torch._dynamo (seconds): import it once here, and fork the
    # ranks (where the platform can) so that they inherit it instead of importing it again.
    import torch._dynamo  # noqa: F401

    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ranks = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=False,
                               start_method=start_method)
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish within {DDP_TIMEOUT_S} s")


def test_cross_entropy_loss_inplace_backward():
    logits_source = torch.randn(6, 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    criterion = myext.nn.CrossEntropyLoss(label_smoothing=0.1, backend="cpp", inplace_backward=True)
    assert "inplace_backward=True" in repr(criterion)
    criterion(logits_source * 2.0, target).backward()
    reference = logits_source.detach().requires_grad_()
    F.cross_entropy(reference * 2.0, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(logits_source.grad, reference.grad)


# ------------------------------------------------------------------ LinearCrossEntropyLoss

needs_torch_module = pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"),
                                        reason="this torch has no nn.LinearCrossEntropyLoss")


@needs_torch_module
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("config", [{}, {"bias": True}, {"bias": True, "reduction": "none", "ignore_index": 2},
                                    {"reduction": "sum", "label_smoothing": 0.2, "weighted": True}],
                         ids=["default", "bias", "none-ignore", "sum-smoothed-weighted"])
def test_linear_cross_entropy_loss_matches_torch(backend, config):
    config = dict(config)
    if config.pop("weighted", False):
        config["weight"] = torch.rand(7) + 0.5
    torch.manual_seed(0)
    ref = nn.LinearCrossEntropyLoss(6, 7, **config)
    ours = myext.nn.LinearCrossEntropyLoss(6, 7, **config, backend=backend)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x, target = torch.randn(9, 6, requires_grad=True), torch.randint(0, 7, (9,))
    loss, loss_ref = ours(x, target), ref(x, target)
    torch.testing.assert_close(loss, loss_ref)
    grad = torch.randn_like(loss)
    wrt, wrt_ref = (x, *ours.parameters()), (x, *ref.parameters())
    for g, g_ref in zip(torch.autograd.grad(loss, wrt, grad), torch.autograd.grad(loss_ref, wrt_ref, grad)):
        torch.testing.assert_close(g, g_ref)


@needs_torch_module
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("probabilities", [False, True], ids=["class", "prob"])
def test_a_k_dimensional_head_matches_torch(backend, probabilities):
    torch.manual_seed(0)
    config = dict(out_features=(2, 3), bias=True, reduction="none", label_smoothing=0.1, dtype=torch.float64)
    ref = nn.LinearCrossEntropyLoss(6, 7, **config)
    ours = myext.nn.LinearCrossEntropyLoss(6, 7, **config, backend=backend)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    assert "out_features=(2, 3)" in repr(ours)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = (torch.randn(5, 7, 2, 3, dtype=torch.float64).softmax(1) if probabilities
              else torch.randint(0, 7, (5, 2, 3)))
    loss, loss_ref = ours(x, target), ref(x, target)
    assert loss.shape == loss_ref.shape == (5, 2, 3)
    torch.testing.assert_close(loss, loss_ref)
    grad = torch.randn_like(loss)
    wrt, wrt_ref = (x, *ours.parameters()), (x, *ref.parameters())
    for g, g_ref in zip(torch.autograd.grad(loss, wrt, grad), torch.autograd.grad(loss_ref, wrt_ref, grad)):
        torch.testing.assert_close(g, g_ref)
    for reduction in ("mean", "sum"):
        ours.reduction = ref.reduction = reduction
        torch.testing.assert_close(ours(x, target), ref(x, target))


@needs_torch_module
def test_linear_cross_entropy_loss_surface_and_checkpoints():
    weight = torch.rand(5) + 0.5
    ours = myext.nn.LinearCrossEntropyLoss(4, 5, bias=True, weight=weight, dtype=torch.float64)
    ref = nn.LinearCrossEntropyLoss(4, 5, bias=True, weight=weight, dtype=torch.float64)
    assert ours.weight is weight and ours.linear.weight.dtype == torch.float64
    assert dict(ours.named_buffers()).keys() == dict(ref.named_buffers()).keys() == {"weight"}
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "linear.weight", "linear.bias"]
    ref.load_state_dict(saved_and_loaded(ours.state_dict()))
    assert torch.equal(ref.linear.weight, ours.linear.weight)
    assert repr(myext.nn.LinearCrossEntropyLoss(4, 5, softcap=30.0)) == (
        "LinearCrossEntropyLoss(\n  in_features=4, num_classes=5, bias=False, reduction=mean, ignore_index=None, "
        "label_smoothing=0.0, softcap=30.0\n  (linear): Linear(in_features=4, out_features=5, bias=False)\n)")
    with pytest.raises(ValueError, match="out_features must be"):
        myext.nn.LinearCrossEntropyLoss(4, 5, out_features=(2, 0))
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        myext.nn.LinearCrossEntropyLoss(4, 5, weight=torch.ones(3))
    # What PyTorch's constructor refuses, and the options the function would refuse.
    with pytest.raises(RuntimeError, match="label_smoothing"):
        nn.LinearCrossEntropyLoss(4, 5, label_smoothing=2.0)
    for bad in [dict(label_smoothing=2.0), dict(label_smoothing=-0.1), dict(reduction="average"),
                dict(softcap=0.0), dict(lse_square_scale=-1.0), dict(chunk_size=0), dict(accum_dtype="bf16")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            myext.nn.LinearCrossEntropyLoss(4, 5, **bad)

    # accum_dtype reaches the function, which checks it against the input's dtype at the call.
    summed_in_bf16 = myext.nn.LinearCrossEntropyLoss(4, 5, dtype=torch.bfloat16, accum_dtype=torch.bfloat16,
                                                     chunk_size=2)
    assert "accum_dtype=torch.bfloat16" in repr(summed_in_bf16)
    x, target = torch.randn(6, 4, dtype=torch.bfloat16), torch.randint(0, 5, (6,))
    summed_in_bf16(x, target).backward()
    expected = summed_in_bf16.linear.weight.detach().clone().requires_grad_()
    myext.linear_cross_entropy(x, expected, target, chunk_size=2, accum_dtype=torch.bfloat16).backward()
    assert torch.equal(summed_in_bf16.linear.weight.grad, expected.grad)
    with pytest.raises(ValueError, match="accum_dtype must be None"):
        summed_in_bf16.float()(x.float(), target)

    torch_loss = nn.LinearCrossEntropyLoss(4, 5, bias=True, reduction="sum", label_smoothing=0.1).eval()
    converted = myext.nn.LinearCrossEntropyLoss.from_torch(torch_loss, backend="cpp")
    assert converted.linear is torch_loss.linear and not converted.training
    x, target = torch.randn(3, 2, 4), torch.randint(0, 5, (3, 2))
    torch.testing.assert_close(converted(x, target), torch_loss(x.reshape(6, 4), target.reshape(6)))
    with pytest.raises(TypeError, match="expects an nn.LinearCrossEntropyLoss"):
        myext.nn.LinearCrossEntropyLoss.from_torch(nn.CrossEntropyLoss())
