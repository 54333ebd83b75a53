"""A small recurrent language model on generated sequences.

Sequences come from a random sparse second-order Markov chain over a small vocabulary
(each pair of previous tokens allows a few next tokens), made on the fly from (seed, step).
The model is an embedding, a hand-written tanh RNN (plain ops, so it runs under vmap) and a
linear read-out; the loss is next-token cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Task, TaskFamily, generator
from .synthetic import _choice


class TinyRNN(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.inp = nn.Linear(emb, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        x = self.inp(self.embed(tokens))
        h = torch.zeros(x.shape[:-2] + (self.rec.in_features,), dtype=x.dtype)
        outs = []
        for t in range(x.shape[-2]):
            h = torch.tanh(x[..., t, :] + self.rec(h))
            outs.append(h)
        return self.out(torch.stack(outs, dim=-2))


def markov_lm(seed: int) -> Task:
    g = generator(401, seed)
    vocab = int(_choice(g, [16, 32]))
    hidden = int(_choice(g, [32, 64]))
    length = int(_choice(g, [12, 20]))
    bs = int(_choice(g, [16, 32, 64]))
    # transition logits: each (a, b) context allows 3 next tokens
    logits = torch.full((vocab, vocab, vocab), -1e9)
    for a in range(vocab):
        for b in range(vocab):
            nxt = torch.randperm(vocab, generator=g)[:3]
            logits[a, b, nxt] = torch.randn(3, generator=g)
    probs = torch.softmax(logits, -1)

    def batch_fn(split, s, step):
        gg = generator(402, split == "valid", s, step)
        seq = torch.randint(0, vocab, (bs, 2), generator=gg)
        cols = [seq[:, 0], seq[:, 1]]
        for _ in range(length - 1):
            p = probs[cols[-2], cols[-1]]
            cols.append(torch.multinomial(p, 1, generator=gg).squeeze(-1))
        seq = torch.stack(cols, dim=1)
        return seq[:, :-1], seq[:, 1:]

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Task.from_module(f"markov-rnn-v{vocab}-h{hidden}-t{length}-b{bs}",
                            lambda: TinyRNN(vocab, 16, hidden), loss_fn, batch_fn=batch_fn,
                            batch_size=bs, family="markov_lm")


MARKOV_LM = TaskFamily("markov_lm", markov_lm)
