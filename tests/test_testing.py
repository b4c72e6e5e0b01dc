"""myext.testing on a user's own ops: what it passes, and that each check catches what it is for."""

import pytest
import torch

from myext import testing
from myext.testing import Sample


class CustomActivation(torch.autograd.Function):
    """The article's CustomActivation pattern (question 8.2), filled in: x * sigmoid(x)."""

    @staticmethod
    def forward(ctx, input):
        output = input * torch.sigmoid(input)
        ctx.save_for_backward(input)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        s = torch.sigmoid(input)
        grad_input = grad_output * (s + input * s * (1 - s))
        return grad_input


class WrongBackward(CustomActivation):
    @staticmethod
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        return grad_output * torch.sigmoid(input)  # forgets the x * s * (1 - s) term


def silu_reference(input):
    return input * torch.sigmoid(input)


def samples():
    return [Sample((torch.randn(4, 6, dtype=torch.float64, requires_grad=True),), name="4x6"),
            Sample((torch.randn(33, dtype=torch.float64, requires_grad=True) * 5,), name="33, scale 5")]


def failed(report):
    return {(r.check, r.dtype) for r in report if not r.passed}


class EveryModeActivation(CustomActivation):
    """CustomActivation in the setup_context form with a jvp: every autograd mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        return input * torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, input_t):
        input, = ctx.saved_tensors
        s = torch.sigmoid(input)
        return input_t * (s + input * s * (1 - s))


class SilentZeroTangent(EveryModeActivation):
    """A jvp that answers zero, as a Function that forgets its tangent does."""

    @staticmethod
    def jvp(ctx, input_t):
        return torch.zeros_like(input_t)


def test_a_correct_function_passes_every_check():
    report = testing.check(CustomActivation.apply, silu_reference, samples())
    report.assert_ok()
    # No registered op runs and none is expected: opcheck and "ops ran" do not apply.
    assert {r.check for r in report} == set(testing.CHECKS) - {"opcheck", "ops ran"}
    assert {r.dtype for r in report if r.check == "vs reference"} == {"float64", "float32", "bfloat16"}
    assert "gradcheck" in str(report) and "FAIL" not in str(report)
    # The article's pattern has no jvp and no setup_context: PyTorch refuses forward
    # AD and torch.func with errors of its own, and the report says so.
    assert set(report.refused()) == {"forward AD", "forward over reverse", "torch.func"}
    assert "refused" in str(report)


def test_a_function_with_every_mode_refuses_none():
    # Not "compile": dynamo cannot trace a Function that defines jvp (myext keeps a
    # class without it for torch.compile).
    checks = [c for c in testing.CHECKS if c != "compile"]
    report = testing.check(EveryModeActivation.apply, silu_reference, samples(), checks=checks)
    report.assert_ok()
    assert report.refused() == []


def test_a_silent_zero_tangent_fails_not_refused():
    report = testing.check(SilentZeroTangent.apply, None, samples(), checks=["forward AD", "torch.func"])
    assert failed(report) == {("forward AD", "float64"), ("torch.func", "float64")}
    assert report.refused() == []


def test_a_backward_that_differs_on_its_second_pass_is_caught():
    class Drifts(EveryModeActivation):
        calls = 0

        @staticmethod
        def backward(ctx, grad_output):
            Drifts.calls += 1
            input, = ctx.saved_tensors
            s = torch.sigmoid(input)
            return grad_output * (s + input * s * (1 - s)) * (1 + 1e-15 * Drifts.calls)

    report = testing.check(Drifts.apply, None, samples(), checks=["reentrant"])
    assert failed(report) == {("reentrant", "float64")}


def test_a_wrong_backward_is_caught():
    report = testing.check(WrongBackward.apply, silu_reference, samples())
    assert not report.ok
    # gradgradcheck differentiates the backward as written, which is consistent with itself.
    assert {("gradcheck", "float64"), ("vs reference", "float64")} <= failed(report)
    with pytest.raises(AssertionError, match="gradcheck"):
        report.assert_ok()


def test_gradcheck_fast_mode_passes_a_correct_backward_and_catches_a_wrong_one():
    checks = ["gradcheck", "gradgradcheck"]
    report = testing.check(CustomActivation.apply, None, samples(), checks=checks, gradcheck_fast_mode=True)
    report.assert_ok()
    assert {r.detail for r in report} == {"fast mode"}
    wrong = testing.check(WrongBackward.apply, None, samples(), checks=checks, gradcheck_fast_mode=True)
    assert ("gradcheck", "float64") in failed(wrong)


def test_low_precision_accumulation_is_caught():
    def sum_in_bfloat16(x):
        # Accumulates in the input's dtype: fine in float64, far off in bfloat16.
        total = torch.zeros((), dtype=x.dtype)
        for value in x.unbind():
            total = total + value
        return total

    # A bfloat16 running sum stalls at 256, where adding 1.05 rounds back to 256.
    x = (1 + 0.1 * torch.rand(1000, dtype=torch.float64)).requires_grad_()
    report = testing.check(sum_in_bfloat16, torch.sum, [Sample((x,))], checks=["vs reference"])
    assert ("vs reference", "bfloat16") in failed(report)
    assert ("vs reference", "float64") not in failed(report)


def test_a_changed_input_is_caught():
    def scales_in_place(x, weight):
        weight.mul_(2)  # changes the caller's tensor
        return x * weight

    sample = Sample((torch.randn(5, dtype=torch.float64, requires_grad=True), torch.rand(5, dtype=torch.float64)))
    report = testing.check(scales_in_place, None, [sample], checks=["inputs unchanged"])
    assert failed(report) == {("inputs unchanged", "float64")}


def test_a_graph_break_is_caught():
    def probes_the_dispatcher(x):
        # A torch.* call that returns no tensor: torch.compile cannot put it in a graph.
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm", "CPU")
        return x * 2 if has_kernel else x

    report = testing.check(probes_the_dispatcher, None, samples()[:1], checks=["compile"])
    assert failed(report) == {("compile", "float64")}


@torch.library.custom_op("myext_test::scale", mutates_args=())
def scale_op(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


@scale_op.register_fake
def _(x, factor):
    return torch.empty_like(x)


scale_op.register_autograd(lambda ctx, grad: (grad * ctx.factor, None),
                           setup_context=lambda ctx, inputs, output: setattr(ctx, "factor", inputs[1]))


@torch.library.custom_op("myext_test::bad_fake", mutates_args=())
def bad_fake_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@bad_fake_op.register_fake
def _(x):
    return x.new_empty(x.shape[:-1])  # the wrong shape


def test_a_registered_op_is_opchecked():
    sample = Sample((torch.randn(3, 4, dtype=torch.float64, requires_grad=True), 1.5))
    checks = [c for c in testing.CHECKS if c not in testing.MODE_CHECKS]
    report = testing.check(scale_op, lambda x, factor: x * factor, [sample], checks=checks,
                           expected_ops=["myext_test::scale"])
    report.assert_ok()
    opcheck = next(r for r in report if r.check == "opcheck")
    assert "myext_test::scale" in opcheck.detail


def test_a_custom_op_without_forward_ad_fails_forward_ad():
    # register_autograd gives a custom op reverse mode only, and forward-mode AD then
    # returns no tangent at all, without an error: a wrong derivative, not a refusal.
    sample = Sample((torch.randn(3, 4, dtype=torch.float64, requires_grad=True), 1.5))
    report = testing.check(scale_op, None, [sample], checks=["forward AD"])
    assert failed(report) == {("forward AD", "float64")}


def test_a_wrong_fake_kernel_is_caught():
    sample = Sample((torch.randn(3, 4, dtype=torch.float64),))
    report = testing.check(lambda x: bad_fake_op(x) * 2, None, [sample], checks=["opcheck"])
    assert failed(report) == {("opcheck", "float64")}


def test_an_op_that_did_not_run_is_caught():
    report = testing.check(CustomActivation.apply, None, samples()[:1], checks=["ops ran"],
                           expected_ops=["myext_test::scale"])
    assert failed(report) == {("ops ran", "float64")}


def test_a_module_and_its_parameters():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3).double()
    sample = Sample((torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))
    report = testing.check(linear, torch.nn.Linear(5, 3).double().requires_grad_(False).train(), [sample],
                           checks=["gradcheck", "inputs unchanged", "no_grad"])
    report.assert_ok()
    # gradcheck covers the parameters too: a module whose weight gradient is wrong fails it.
    wrong = torch.nn.Linear(5, 3).double()
    wrong.weight.register_hook(lambda grad: grad * 2)
    assert failed(testing.check(wrong, None, [sample], checks=["gradcheck"])) == {("gradcheck", "float64")}
