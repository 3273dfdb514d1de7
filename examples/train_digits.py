"""Train a deep plain MLP on scikit-learn's digits, before and after resify adds shortcuts.

    python examples/train_digits.py            # 48 layers, 10 epochs: about half a minute on one CPU core
    python examples/train_digits.py --depth 100 --epochs 30 --watch docs/watch_digits.png

A plain 48-layer MLP barely learns: its gradient vanishes on the way back to the first layers.
The same network with a shortcut around every hidden layer (``resify.apply``; the linear output
layer gets none) trains to above 95%.
``gate='rezero'`` starts every residual branch at zero, which keeps very deep nets stable.

``--watch PATH`` trains both under ``resify.watch`` (every ``--every`` steps), prints when each
one's verdict changed and in which layers, and draws both heatmaps side by side into PATH.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import resify

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--depth", type=int, default=48, help="Linear layers (default 48)")
parser.add_argument("--epochs", type=int, default=10, help="default 10")
parser.add_argument("--watch", metavar="PATH", help="record the gradient flow while training; draw it into PATH")
parser.add_argument("--every", type=int, default=10, help="with --watch: record every N-th step (default 10)")
args = parser.parse_args()
DEPTH, WIDTH, EPOCHS = args.depth, 64, args.epochs
torch.manual_seed(0)
torch.set_num_threads(1)

# 1,797 8×8 digit images, 64 features each; a stratified 75/25 split, standardised
x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
scaler = StandardScaler().fit(x_train)
x_train, x_test = (torch.tensor(scaler.transform(a), dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

# a plain deep MLP: Linear + GELU, DEPTH - 1 times, then the 10-way output layer
layers = []
for _ in range(DEPTH - 1):
    layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
plain = nn.Sequential(*layers, nn.Linear(WIDTH, 10))

# the same network with a shortcut around every layer (plain is not changed)
converted = resify.apply(plain, x_train[:2], gate="rezero")
print(resify.applied_plan(converted).summary())
print("gradient flow, plain:    ", resify.gradient_flow(plain, x_train, target=y_train).summary())
print("gradient flow, converted:", resify.gradient_flow(converted, x_train, target=y_train).summary())


def train(model: nn.Module) -> float:
    """Adam, batch 64, EPOCHS epochs; returns the test accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


if not args.watch:
    print(f"plain     {DEPTH} layers: test accuracy {train(plain):.1%}")
    print(f"converted {DEPTH} layers: test accuracy {train(converted):.1%}")
else:
    watches = []
    for label, model in (("plain", plain), ("resify.apply(gate='rezero')", converted)):
        with resify.watch(model, every=args.every, label=label) as w:  # hooks off again at the end
            accuracy = train(model)
        print(f"\n{label}, {DEPTH} layers: test accuracy {accuracy:.1%}")
        print(w.history.summary())
        watches.append(w)
    print(f"\nwrote {watches[0].plot(args.watch, beside=watches[1:])}")
