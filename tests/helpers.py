"""Small models and training loops shared by the tests."""

import torch
from torch import nn

from learned_opt import LearnedOptimizer, MetaNetwork


class MixedRanks(nn.Module):
    """Tensors of ranks 0, 1, 2, 4 and 5 with very different sizes."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.3)  # noqa: E731
        self.scale = mk()  # 0-d
        self.conv = mk(4, 2, 3, 3)  # 4-d
        self.conv_b = mk(4)
        self.fc = mk(36, 8)
        self.fc_b = mk(8)
        self.odd = mk(2, 1, 3, 2, 2)  # 5-d
        self.out = mk(8, 3)

    def forward(self, x):  # x: (B, 2, 5, 5)
        h = torch.nn.functional.conv2d(x, self.conv, self.conv_b)  # (B, 4, 3, 3)
        h = torch.tanh(h.flatten(1) @ self.fc + self.fc_b) * (1 + self.scale)
        h = h + self.odd.sum() * 0.1
        return h @ self.out


def batch(step: int, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def train(model, opt, steps, pass_loss=True, dtype=torch.float32, start=0):
    losses = []
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if pass_loss:
            opt.step(loss=loss)
        else:
            opt.step()
        losses.append(loss.item())
    return losses


def random_weights(seed=3, config=None):
    """A meta-network with every path active (the default init zeroes some)."""
    return MetaNetwork.random(config, seed=seed)


def make(model, **kw):
    return LearnedOptimizer(model.parameters(), **kw)
