"""Training the projector in whitened coordinates: a preconditioner for the toy world (off for real models).

The toy CLIP's patch features are nearly low-rank: one direction holds about 60% of their variance and
five hold 96%, while what tells a circle from a square, or one cell from another, lies in directions
with well under 1% (docs/research/toy-research.md, "How the limit was found"). Gradient steps on the
projector's first layer follow the input's covariance, so the tiny LLM learns to read those directions
very slowly. Here the first layer is trained as

    W1 x + b1 = W1' A (x - mu) + b1',   A = C^(-1/2) (ZCA), mu and C from the training images' features,

which is the same function in other coordinates: only the optimizer's steps change. Saving folds the
layer back (`folded`), so every checkpoint holds a plain Eq. 1 projector in the usual key names.
"""
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from ..data.dataset import uncounted_skips
from ..errors import OptionError


def feature_statistics(features: torch.Tensor, eps: float = 1e-5) -> tuple:
    """features [..., D] -> (mu [D], A [D, D] = C^(-1/2)); eigenvalues below eps * the largest are raised
    to it, so directions with no variance are not blown up without bound."""
    z = features.reshape(-1, features.shape[-1]).double()
    mu = z.mean(0)
    cov = torch.cov((z - mu).T)
    e, v = torch.linalg.eigh(cov)
    e = e.clamp_min(eps * e.max())
    return mu.float(), (v @ torch.diag(e.rsqrt()) @ v.T).float()


class WhitenedLinear(nn.Module):
    """`linear` reparametrized as W' A (x - mu) + b'. Starts as the same function as `linear`, or, with
    `fresh`, as a freshly initialized layer in the new coordinates (a random W would be far from zero
    along the high-variance directions once written as W' = W A^-1, and take long to unlearn)."""

    def __init__(self, linear: nn.Linear, mu: torch.Tensor, whitening: torch.Tensor, fresh: bool = False):
        super().__init__()
        self.register_buffer("mu", mu.to(linear.weight))
        self.register_buffer("whitening", whitening.to(linear.weight))
        if fresh:
            new = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                            dtype=linear.weight.dtype)
            weight, bias = new.weight.detach(), new.bias.detach()
        else:
            with torch.no_grad():  # W' = W A^-1, b' = b + W mu
                weight = torch.linalg.solve(self.whitening.double(), linear.weight.double().T).T
                bias = linear.bias.double() + linear.weight.double() @ self.mu.double()
        self.weight = nn.Parameter(weight.to(linear.weight))
        self.bias = nn.Parameter(bias.to(linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((x - self.mu) @ self.whitening, self.weight, self.bias)  # A is symmetric

    def folded(self) -> nn.Linear:
        """The plain layer with the same function: W = W' A, b = b' - W' A mu."""
        with torch.no_grad():
            weight = self.weight.double() @ self.whitening.double()
            bias = self.bias.double() - weight @ self.mu.double()
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear


@torch.no_grad()
def image_features(model, dataset, num_images: int, batch_size: int = 64) -> torch.Tensor:
    """Z_v of the dataset's first `num_images` images (records without one, or skipped, are passed over;
    training counts the skips when it reaches them)."""
    views = []
    with uncounted_skips(dataset):
        for i in range(len(dataset)):
            item = dataset[i]
            if item is not None and item.get("pixel_values") is not None:
                views += list(item["pixel_values"])  # [views, 3, S, S]: AnyRes's tiles are views too
            if len(views) >= num_images:
                break
    if not views:
        raise OptionError("--whiten-features: the training data holds no images to measure the features on")
    param = next(model.vision_tower.parameters())
    return torch.cat([model.vision_tower(torch.stack(views[i: i + batch_size]).to(param.device, param.dtype)).float()
                      for i in range(0, len(views), batch_size)])


def whiten_projector(model, dataset, fresh: bool, num_images: int = 1024) -> None:
    """Replaces the projector's first layer by its whitened form: the same function (a trained projector), or
    a fresh layer in the new coordinates (`fresh`: the projector has not been trained yet)."""
    mu, whitening = feature_statistics(image_features(model, dataset, num_images))
    model.projector.linear_1 = WhitenedLinear(model.projector.linear_1, mu, whitening, fresh)


@contextmanager
def folded(model):
    """Inside: the projector's first layer is a plain nn.Linear again (for saving); restored after."""
    layer = model.projector.linear_1
    if isinstance(layer, WhitenedLinear):
        model.projector.linear_1 = layer.folded()
    try:
        yield model
    finally:
        model.projector.linear_1 = layer


def whitened(model, dataset, save, fresh: bool):
    """The projector's first layer whitened for training (`whiten_projector`); returns `save` wrapped to write
    the plain layer."""
    whiten_projector(model, dataset, fresh)

    def save_folded(out):
        with folded(model):
            save(out)
    return save_folded
