"""One SGD training step of the article's SimpleNet at batch 64 and 256: myext against plain PyTorch.

``myext``: myext.models.SimpleNet (fc1 a fused Linear+ReLU) with myext.cross_entropy.
``eager``: the same net of nn.Linear + ReLU with F.cross_entropy. ``compile``: that
plain net and loss under torch.compile (the optimizer step stays eager).
All three start from the same weights and train on the same batch.
"""

import pytest
import torch
import torch.nn.functional as F

import myext
from myext.models import PlainSimpleNet


@pytest.mark.parametrize("batch", [64, 256])
def test_simplenet_step(run_benchmark, device, provider, batch):
    plain = PlainSimpleNet().to(device)
    images = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if provider.startswith("myext-"):
        backend = provider[len("myext-"):]
        model = myext.models.SimpleNet(backend=backend).to(device)
        model.load_state_dict(plain.state_dict())

        def loss_of(x, y):
            return myext.cross_entropy(model(x), y, backend=backend)
    else:
        model = plain

        def loss_of(x, y):
            return F.cross_entropy(model(x), y)

        if provider == "compile":
            loss_of = torch.compile(loss_of)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(images, labels).backward()
        optimizer.step()

    run_benchmark(step, device, group=f"simplenet train step {device} batch {batch}")
