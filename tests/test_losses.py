import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.checkpoints import TrainedRun, train_or_load
from kdlab.config import RunConfig, make_config, run_of
from kdlab.data import make_splits, make_synthetic_cifar
from kdlab.losses import attention_transfer_loss, distillation_term, dkd_loss, kd_logits_loss
from kdlab.methods import build_method
from kdlab.models import build_model
from kdlab.registry import METHODS, all_settings, setting_fields

# The scratch run of each distillation method, which the tests below train or differentiate.
METHOD_RUNS = {method: run_of(method, "scratch") for method, info in METHODS.items() if info.uses_teacher}


def fixed_logits(seed, batch=16, classes=10):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(batch, classes, generator=g) * 3, torch.randn(batch, classes, generator=g) * 3
    return s, t, torch.randint(0, classes, (batch,), generator=g)


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


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_gradients_reach_the_student_and_never_the_teacher(method):
    torch.manual_seed(0)
    cfg = make_config(METHOD_RUNS[method], smoke=True)
    teacher = build_model("resnet50", "none")
    distiller = build_method(cfg, build_model("resnet18", "none"), teacher)
    distiller.train()
    assert not teacher.training, "the teacher stays in eval mode whatever train() is called with"
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = distiller.forward_train(images, targets, epochs_done=cfg.epochs)
    sum(losses.values()).backward()
    assert tuple(losses) == METHODS[method].loss_terms, "the registry names the terms the method logs"
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values())
    assert all(p.grad is None for p in teacher.parameters())
    for name, module in distiller.trained_modules().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert "teacher" not in dict(distiller.named_children()), "the teacher is not saved with the student"


# ----------------------------------------------------------------------------- decoupled KD

def reference_dkd(s, t, y, alpha, beta, T):
    """Zhao et al. 2022, eq. 1-5, written out in float64 numpy: binary (target, rest) KL and
    the KL among the non-target classes, each renormalised, batch mean, times T^2."""
    s, t, y = s.double().numpy() / T, t.double().numpy() / T, y.numpy()

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    tckd = nckd = 0.0
    for i in range(len(y)):
        p_s, p_t = softmax(s[i:i + 1])[0], softmax(t[i:i + 1])[0]
        b_s, b_t = np.array([p_s[y[i]], 1 - p_s[y[i]]]), np.array([p_t[y[i]], 1 - p_t[y[i]]])
        tckd += (b_t * np.log(b_t / b_s)).sum()
        others = np.arange(len(p_s)) != y[i]
        q_s, q_t = p_s[others] / p_s[others].sum(), p_t[others] / p_t[others].sum()
        nckd += (q_t * np.log(q_t / q_s)).sum()
    return T * T * (alpha * tckd + beta * nckd) / len(y)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 8.0)])
def test_dkd_loss_matches_the_paper(alpha, beta, T):
    s, t, y = fixed_logits(3)
    got = dkd_loss(s, t, y, alpha, beta, T).item()
    assert got == pytest.approx(reference_dkd(s, t, y, alpha, beta, T), rel=1e-5)


def test_dkd_recombines_into_hintons_kl():
    """The paper's decomposition, one image at a time: KD = TCKD + (1 - p_target of the teacher) * NCKD."""
    s, t, y = fixed_logits(4, batch=6)
    T = 4.0
    for i in range(len(y)):
        one = slice(i, i + 1)
        p_target = torch.softmax(t[one] / T, 1)[0, y[i]].item()
        recombined = dkd_loss(s[one], t[one], y[one], alpha=1.0, beta=1 - p_target, temperature=T)
        assert recombined.item() == pytest.approx(distillation_term(s[one], t[one], T).item(), rel=1e-5)


def test_dkd_is_fp32_and_finite_for_confident_low_precision_logits():
    s, t, y = fixed_logits(5)
    t[torch.arange(len(y)), y] = 60.0       # the teacher is sure: p_target rounds to 1 in fp32
    loss = dkd_loss(s.bfloat16(), t.bfloat16(), y, 1.0, 8.0, 1.0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_dkd_term_warms_up_linearly():
    torch.manual_seed(0)
    cfg = make_config("student_scratch_dkd", smoke=True, dkd_warmup_epochs=2.0)
    distiller = build_method(cfg, build_model("resnet18", "none"), build_model("resnet50", "none")).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    term = {done: distiller.forward_train(images, targets, done)[1]["dkd"].item() for done in (0.0, 1.0, 2.0, 5.0)}
    assert term[0.0] == 0.0 and term[1.0] == pytest.approx(term[2.0] / 2) and term[5.0] == pytest.approx(term[2.0])


# ----------------------------------------------------------------------------- attention transfer

def reference_attention_transfer(student_maps, teacher_maps, p):
    """Zagoruyko & Komodakis 2017, eq. 2 as their code computes it: Q = mean_c |A_c|^p per image,
    flattened and divided by its L2 norm; the mean of squared differences, summed over stages."""
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        q_s = (s.double().abs() ** p).mean(1).reshape(len(s), -1)
        q_t = (t.double().abs() ** p).mean(1).reshape(len(t), -1)
        q_s = q_s / q_s.square().sum(1, keepdim=True).sqrt()
        q_t = q_t / q_t.square().sum(1, keepdim=True).sqrt()
        total += (q_s - q_t).square().sum().item() / q_s.numel()
    return total


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_transfer_matches_the_paper(p):
    g = torch.Generator().manual_seed(6)
    # Two stages; student and teacher widths differ (ResNet18 vs ResNet50), spatial sizes match.
    student = [torch.randn(3, 8, 6, 6, generator=g), torch.randn(3, 16, 3, 3, generator=g)]
    teacher = [torch.randn(3, 32, 6, 6, generator=g), torch.randn(3, 64, 3, 3, generator=g)]
    got = attention_transfer_loss(student, teacher, p).item()
    assert got == pytest.approx(reference_attention_transfer(student, teacher, p), rel=1e-5)
    assert attention_transfer_loss(student, [s * 3 for s in student], p).item() == pytest.approx(0.0, abs=1e-7), \
        "a map is normalised: scaling the features changes nothing"


# ----------------------------------------------------------------------------- short training

@pytest.mark.parametrize("method", ["dkd", "attention"])
def test_new_method_trains_through_train_or_load(tmp_path, method):
    data = make_synthetic_cifar(train_per_class=30, test_per_class=5)
    splits = make_splits(data, val_per_class=5, split_seed=42, limit_train=0, device=torch.device("cpu"))
    cfg = make_config(METHOD_RUNS[method], smoke=True, epochs=2, batch_size=50)
    teacher = build_model("resnet50", "none").eval()
    trained = train_or_load(cfg, lambda: splits, torch.device("cpu"), tmp_path, progress=False, log=lambda _: None,
                            get_teacher=lambda: TrainedRun(teacher, dict(run="teacher_resnet50", test_acc=0.1), False))
    history = trained.results["history"]
    assert trained.trained and len(history) == 2 and (tmp_path / f"{cfg.run}_best.pt").exists()
    assert all(tuple(h["losses"]) == METHODS[method].loss_terms and math.isfinite(h["train_loss"]) for h in history)
    assert not any(stage._forward_hooks for stage in (teacher.layer1, teacher.layer2, teacher.layer3, teacher.layer4)), \
        "the method's hooks are gone once the run is over"


# ----------------------------------------------------------------------------- the registry

def test_every_method_declares_its_settings_completely():
    recipe = {f.name for f in dataclasses.fields(RunConfig)}
    assert not set(all_settings()) & recipe, "a checkpoint stores settings beside the recipe: names must differ"
    for method, info in METHODS.items():
        assert info.name and info.description and info.loss_terms
        for f in setting_fields(method):
            assert f.metadata["help"] and f.metadata["symbol"], (method, f.name)
        assert info.settings().problems() == [], f"{method}'s defaults are valid"
        assert run_of(method, "scratch"), f"{method} has a run"
