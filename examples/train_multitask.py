"""The seed article's multi-task example (question 8.3), corrected, on real data, with myext.

Two bugs of the article are fixed: the training data exists (the article used an
undefined ``train_dataset``), and each head's loss compares its output with that head's
class labels (the article compared them with the input images). The network is myext's
MultiTaskNet: a shared fc1 (a fused Linear+ReLU) and two heads, here the digit (fc2,
10 classes) and its parity (fc3, 2 classes). The losses are summed, as in the article.

Data: scikit-learn's bundled handwritten digits (8x8, no download), resized to 28x28.
Run:  python examples/train_multitask.py
"""

import torch
import torch.optim as optim

import myext
from myext.data import load_digits_dataset
from myext.models import MultiTaskNet


torch.manual_seed(0)
_, train_images, train_digits, test_images, test_digits = load_digits_dataset()
train_parity, test_parity = train_digits % 2, test_digits % 2

net = MultiTaskNet(num_classes1=10, num_classes2=2)
criterion = myext.nn.CrossEntropyLoss()
optimizer = optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

for epoch in range(10):
    net.train()
    for batch in torch.randperm(len(train_digits)).split(64):
        optimizer.zero_grad()
        output1, output2 = net(train_images[batch])
        loss1 = criterion(output1, train_digits[batch])
        loss2 = criterion(output2, train_parity[batch])
        loss = loss1 + loss2  # what myext.models.multitask_loss computes
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f} (digit {loss1.item():.4f}, parity {loss2.item():.4f})")

net.eval()
with torch.no_grad():
    output1, output2 = net(test_images)
digit_accuracy = (output1.argmax(1) == test_digits).float().mean()
parity_accuracy = (output2.argmax(1) == test_parity).float().mean()
print(f"Test accuracy: digit {digit_accuracy.item():.1%}, parity {parity_accuracy.item():.1%}")
