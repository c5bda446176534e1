import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.config import make_config
from kdlab.losses import kd_logits_loss
from kdlab.methods import build_method
from kdlab.models import build_model


def reference_kd(s, t, y, T, alpha):
    """Hinton's loss written out in float64 numpy, independently of kdlab."""
    s, t = s.double().numpy(), t.double().numpy()

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(t / T), softmax(s / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()
    ce = -np.log(softmax(s)[np.arange(len(y)), y.numpy()]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3)])
def test_kd_loss_matches_the_formula(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    got = kd_logits_loss(s, t, y, temperature=T, alpha=alpha).item()
    assert got == pytest.approx(reference_kd(s, t, y, T, alpha), rel=1e-5)


def test_soft_term_is_scaled_by_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.zeros(8, dtype=torch.long)
    for T in (2.0, 5.0):
        kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
        assert kd_logits_loss(s, t, y, T, alpha=1.0).item() == pytest.approx(T * T * kl.item(), rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_matching_logits_give_zero_kl():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    assert kd_logits_loss(s, t, y, 4.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(s, y).item())
    assert kd_logits_loss(s, s.clone(), y, 4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["kd_logits", "kd_features"])
def test_gradients_reach_the_student_and_never_the_teacher(method):
    torch.manual_seed(0)
    cfg = make_config(f"student_scratch_{'kd_scores' if method == 'kd_logits' else 'kd_features'}",
                      smoke=True)
    teacher = build_model("resnet50", "none")
    distiller = build_method(cfg, build_model("resnet18", "none"), teacher)
    distiller.train()
    assert not teacher.training, "the teacher stays in eval mode whatever train() is called with"
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = distiller.forward_train(images, targets)
    sum(losses.values()).backward()
    assert set(losses) == ({"kd", "ce"} if method == "kd_logits" else {"ce", "hint"})
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert all(p.grad is None for p in teacher.parameters())
    for name, module in distiller.trained_modules().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert "teacher" not in dict(distiller.named_children()), "the teacher is not saved with the student"
