"""The seed article's SimpleNet example (section 4.1), corrected, on real data, with myext.

Two bugs of the article are fixed: the optimizer is built from the network instance
(the article called ``SimpleNet.parameters()`` on the class, before any instance existed),
and the loss compares the outputs with the class labels (the article compared them with
the input images). The network is myext's SimpleNet, whose fc1 is a fused Linear+ReLU,
and the loss is myext's cross-entropy.

Data: scikit-learn's bundled handwritten digits (8x8, no download), resized to 28x28.
Run:  python examples/train_simplenet.py
"""

import torch
import torch.optim as optim

import myext
from myext.data import load_digits_dataset
from myext.models import SimpleNet


torch.manual_seed(0)
_, train_images, train_labels, test_images, test_labels = load_digits_dataset()

# Section 4.2 of the article: run on the GPU where there is one.
device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
net = SimpleNet().to(device)
criterion = myext.nn.CrossEntropyLoss()
optimizer = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
train_images, train_labels = train_images.to(device), train_labels.to(device)
test_images, test_labels = test_images.to(device), test_labels.to(device)

for epoch in range(10):
    net.train()
    for batch in torch.randperm(len(train_labels), device=device).split(64):
        optimizer.zero_grad()
        output = net(train_images[batch])
        loss = criterion(output, train_labels[batch])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f}")

net.eval()
with torch.no_grad():
    output = net(test_images)
    loss = criterion(output, test_labels)
    accuracy = (output.argmax(1) == test_labels).float().mean()
print(f"Test loss: {loss.item():.4f}, test accuracy: {accuracy.item():.1%}")
