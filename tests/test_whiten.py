"""The whitened projector: the same function in new coordinates, whitened features, faster learning of a
low-variance direction (train.py's use of it: tests/test_train.py)."""
import torch
from torch import nn

from llava_min.toy.contrastive import decorrelation_loss
from llava_min.toy.whiten import WhitenedLinear, feature_statistics, folded


def ill_conditioned(n=4096, d=16, seed=0):
    """Correlated features whose covariance eigenvalues span 1e4 to 1, plus a large common offset."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.logspace(2, 0, d)
    return (torch.randn(n, d, generator=g) * scales) @ q.T + 5.0, q


def test_statistics_whiten_the_features():
    x, _ = ill_conditioned()
    mu, a = feature_statistics(x)
    z = (x - mu) @ a
    torch.testing.assert_close(torch.cov(z.T), torch.eye(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(a, a.T)


def test_same_function_at_the_start_and_after_folding():
    torch.manual_seed(0)
    x, _ = ill_conditioned(n=64)
    linear = nn.Linear(16, 8)
    w = WhitenedLinear(linear, *feature_statistics(x))
    torch.testing.assert_close(w(x), linear(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # as if trained
        w.weight.add_(torch.randn_like(w.weight))
        w.bias.add_(torch.randn_like(w.bias))
    plain = w.folded()
    assert type(plain) is nn.Linear and not torch.allclose(plain.weight, linear.weight)
    torch.testing.assert_close(plain(x), w(x), atol=1e-4, rtol=1e-4)


def test_a_low_variance_direction_is_learned_faster():
    """The point of it: a target read from the smallest-variance direction, the same steps of Adam."""
    x, q = ill_conditioned()
    y = x @ q[:, -1:]  # the direction with variance 1, against 1e4 for the largest

    def loss_after(layer, steps=200):
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = (layer(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    torch.manual_seed(0)
    plain = nn.Linear(16, 1)
    whitened = WhitenedLinear(nn.Linear(16, 1), *feature_statistics(x), fresh=True)
    plain_loss, whitened_loss = loss_after(plain), loss_after(whitened)
    assert whitened_loss < 0.01 * plain_loss, (whitened_loss, plain_loss)


def test_folded_restores_the_training_layer():
    model = nn.Module()
    model.projector = nn.Module()
    x, _ = ill_conditioned(n=64)
    model.projector.linear_1 = layer = WhitenedLinear(nn.Linear(16, 8), *feature_statistics(x))
    with folded(model):
        assert type(model.projector.linear_1) is nn.Linear
        assert set(model.projector.state_dict()) == {"linear_1.weight", "linear_1.bias"}
    assert model.projector.linear_1 is layer


def test_decorrelation_loss_is_zero_only_for_white_features():
    """The toy CLIP's optional pretraining term (--clip-decorrelation), the other way to the same end."""
    x, _ = ill_conditioned()
    mu, a = feature_statistics(x)
    assert decorrelation_loss((x - mu) @ a).item() < 1e-6
    assert decorrelation_loss(x).item() > 1.0
