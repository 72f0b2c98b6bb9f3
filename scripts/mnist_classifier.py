"""A small CNN classifier of MNIST digits, the judge of class-conditional generation: trained here on MNIST's
training split (about 99% on its test split after 2 epochs), it classifies decoded samples so that a benchmark can
report how often a sample is the digit that was asked for (scripts/bench_prior.py's class-accuracy,
scripts/bench_cvae.py). `--cache FILE` keeps the trained weights (safetensors) for the next run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, 28, 28] -> normalised float."""
    return (images.float() / 255.0 - 0.1307) / 0.3081


def train_classifier(mnist: Path, epochs: int, seed: int = 0) -> tuple[Classifier, float]:
    from vqtok.data.sources import read_idx

    train_x = torch.from_numpy(read_idx(mnist / "train-images-idx3-ubyte.gz")).unsqueeze(1)
    train_y = torch.from_numpy(read_idx(mnist / "train-labels-idx1-ubyte.gz")).long()
    torch.manual_seed(seed)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(_to_input(train_x[idx])), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.4f}")
    model.eval()
    return model, accuracy(model, *mnist_test(mnist))


def mnist_test(mnist: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from vqtok.data.sources import read_idx

    x = torch.from_numpy(read_idx(mnist / "t10k-images-idx3-ubyte.gz")).unsqueeze(1)
    y = torch.from_numpy(read_idx(mnist / "t10k-labels-idx1-ubyte.gz")).long()
    return x, y


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(_to_input(chunk)).argmax(-1) for chunk in images.split(1000)])


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels).float().mean().item()


def cached_classifier(mnist: Path, epochs: int, cache: str | None) -> tuple[Classifier, float]:
    """The classifier and its test accuracy: loaded from `cache` when that file exists, else trained (and saved
    there when a path is given)."""
    if cache and Path(cache).is_file():
        model = Classifier()
        model.load_state_dict(load_file(cache))
        model.eval()
        return model, accuracy(model, *mnist_test(mnist))
    model, test_accuracy = train_classifier(mnist, epochs)
    if cache:
        save_file(model.state_dict(), cache)
    return model, test_accuracy
