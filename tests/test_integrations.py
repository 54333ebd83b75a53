"""Giving the loss to the optimizer where a framework calls ``step()`` itself, and the recipes
of the README's *Using it with ...* section: HF Trainer, Lightning (resume included) and
accelerate, each run where the package is installed."""


import pytest
import torch
from torch import nn

from learned_opt import LearnedOptimizer, observe_loss


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def _count(opt):
    return int(opt.state[opt.param_groups[0]["params"][0]]["train_loss_count"])


def test_observed_losses_are_averaged_into_the_next_step():
    x, y = _data()
    a, b = _model(), _model()
    oa, ob = LearnedOptimizer(a.parameters()), LearnedOptimizer(b.parameters())
    for t in range(6):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            halves = [nn.functional.cross_entropy(m(x[i::2]), y[i::2]) for i in range(2)]
            (sum(halves) / 2).backward()
            if o is oa:  # two micro-batches, as with gradient accumulation
                for h in halves:
                    o.observe_loss(h)
                o.step()
            else:
                o.step(loss=(halves[0].detach().double() + halves[1].detach().double()) / 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert _count(oa) == 6
    oa.zero_grad()
    nn.functional.cross_entropy(a(x), y).backward()
    oa.step()  # nothing observed since the last step: no loss this time
    assert _count(oa) == 6


def test_observe_loss_finds_the_optimizer_inside_a_wrapper():
    opt = LearnedOptimizer(_model().parameters())

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner
    observe_loss(Wrapper(Wrapper(opt)), 1.5)
    assert opt._observed[1] == 1
    with pytest.raises(TypeError, match="no LearnedOptimizer"):
        observe_loss(torch.optim.SGD(_model().parameters(), lr=0.1), 1.0)


def test_hf_trainer_recipe(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = _data()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _model()

        def forward(self, inputs, labels=None):
            out = self.body(inputs)
            return {"loss": nn.functional.cross_entropy(out, labels), "logits": out}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"inputs": x[i], "labels": y[i]}

    class LossFeedingTrainer(transformers.Trainer):  # the README's recipe
        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            observe_loss(self.optimizer, loss)
            return loss

    counts = {}
    for cls in (transformers.Trainer, LossFeedingTrainer):
        model = Net()
        opt = LearnedOptimizer(model.parameters())
        args = transformers.TrainingArguments(output_dir=str(tmp_path / cls.__name__), max_steps=8,
                                              per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                              save_strategy="no", logging_strategy="no", disable_tqdm=True)
        cls(model=model, args=args, train_dataset=DS(), optimizers=(opt, None)).train()
        counts[cls.__name__] = _count(opt)
    assert counts == {"Trainer": 0, "LossFeedingTrainer": 8}


def test_accelerate_recipe():
    accelerate = pytest.importorskip("accelerate")
    x, y = _data()
    model = _model()
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, LearnedOptimizer(model.parameters()))
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        acc.backward(loss)
        observe_loss(opt, loss)
        opt.step()
    assert _count(opt.optimizer) == 5


def _lightning_module(L):
    x, y = _data()

    class Module(L.LightningModule):
        """Each step's batch is picked by the global step, which a checkpoint restores. (With
        the loader's own batches, Lightning resumed from an epoch-end checkpoint feeds another
        order than the uninterrupted run, Adam's runs included: measured, not ours to fix.)"""

        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, _):
            i = self.global_step % 4
            return nn.functional.cross_entropy(self.net(x[16 * i:16 * i + 16]), y[16 * i:16 * i + 16])

        def configure_optimizers(self):
            return LearnedOptimizer(self.parameters())
    return Module


def _trainer(L, steps, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def test_lightning_passes_the_loss_and_resumes_exactly(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    Module = _lightning_module(L)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(64)), batch_size=16)
    whole = Module()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    t = _trainer(L, 12, callbacks=[ckpt])
    t.fit(whole, loader)
    assert _count(t.optimizers[0]) == 12  # Lightning calls step(closure): the closure's loss reaches the features
    resumed = Module()
    _trainer(L, 12, enable_checkpointing=False).fit(resumed, loader, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
