"""Sample-quality metrics of the distillation proxy: a digit classifier trained on real digits,
its accuracy on generated digits, and the Frechet distance in its feature space (FID's
formula, with this classifier in place of Inception)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_frechet_distance(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64.

    The symmetric form needs only eigendecompositions of symmetric matrices, so it stays
    real and stable where scipy's sqrtm of C_a C_b can return complex noise.
    """
    mean_a, mean_b, cov_a, cov_b = (v.double() for v in (mean_a, mean_b, cov_a, cov_b))
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature rows [N, D]."""
    for name, f in (("first", features_a), ("second", features_b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} feature set must be [N >= 2, D], got {tuple(f.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    return gaussian_frechet_distance(a.mean(0), a.T.cov(), b.mean(0), b.T.cov())


class DigitClassifier(nn.Module):
    """A small CNN for [N, 1, S, S] digit images in [-1, 1]; ``features`` is its last hidden
    layer, the space of the Frechet distance."""

    def __init__(self, image_size: int, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)
        self.image_size = image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, batch_size: int = 64
) -> DigitClassifier:
    """Train on real digits with small random shifts (so it judges shapes, not pixels)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    shift = max(1, images.shape[-1] // 16)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            dy, dx = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
            batch = torch.roll(images[index], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def sample_quality(
    classifier: DigitClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference_features: torch.Tensor,
) -> dict[str, float]:
    """Accuracy (generated digit classified as the digit asked for) and Frechet distance of
    the generated set to real held-out digits."""
    features = classifier.features(images.clamp(-1, 1))
    accuracy = (classifier.head(features).argmax(1) == labels).double().mean()
    return {
        "accuracy": float(accuracy),
        "frechet_distance": frechet_distance(features, reference_features),
    }
