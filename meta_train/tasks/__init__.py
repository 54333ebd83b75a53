"""Tasks and task families. ``get_family(name)`` returns a built-in family; ``"name1+name2"``
mixes several equally."""

from .base import Task, TaskFamily, generator, mixture, sample_batch, scale_loss, scale_parameters
from .synthetic import DEEP_CLASSIFIER, LOGISTIC, QUADRATIC, TEACHER_STUDENT


def _families():
    from .images import DIGITS_MLP
    from .language import MARKOV_LM
    from .mnist1d import MNIST1D_CNN, MNIST1D_MLP, MNIST1D_SMALL_BATCH, MNIST1D_WIDE
    from .overfit import OVERFIT_MLP, OVERFIT_TEACHER
    return {f.name: f for f in (QUADRATIC, TEACHER_STUDENT, LOGISTIC, MNIST1D_MLP, MNIST1D_WIDE,
                                MNIST1D_CNN, MNIST1D_SMALL_BATCH, DIGITS_MLP, MARKOV_LM, DEEP_CLASSIFIER,
                                OVERFIT_MLP, OVERFIT_TEACHER)}


def family_names():
    return sorted(_families())


def get_family(name: str, scale_augment: bool = False, loss_scale_augment: bool = False) -> TaskFamily:
    """A built-in family by name, or a mixture ``"a+b+c"``; optionally with per-tensor
    parameter-scale augmentation and with loss-scale augmentation."""
    fams = _families()
    parts = name.split("+")
    unknown = [p for p in parts if p not in fams]
    if unknown:
        raise ValueError(f"unknown task family {unknown}; built-in: {sorted(fams)}")
    fam = fams[parts[0]] if len(parts) == 1 else mixture(name, [fams[p] for p in parts])
    if scale_augment:
        base = fam
        fam = TaskFamily(name + "+scaled", lambda s: scale_parameters(base.sample(s), s))
    if loss_scale_augment:
        plain = fam
        fam = TaskFamily(fam.name + "+loss-scaled", lambda s: scale_loss(plain.sample(s), s))
    return fam


__all__ = ["Task", "TaskFamily", "generator", "get_family", "family_names", "mixture",
           "sample_batch", "scale_loss", "scale_parameters"]
