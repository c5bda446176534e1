"""The distillation losses as pure functions; kdlab.methods wraps each in a method."""
import math

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in fp32 whatever the autocast dtype, optionally against smoothed labels."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def kd_logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft term's gradients the same size whatever the temperature;
    the KL is summed over classes and averaged over the batch ("batchmean").
    """
    return sum(kd_logits_terms(student_logits, teacher_logits, targets, temperature, alpha).values())


def kd_logits_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float, alpha: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The two weighted terms of `kd_logits_loss` by name, so the training loop logs each.

    Label smoothing touches the hard-label term only: the teacher's soft targets stay as they are.
    """
    return {"kd": alpha * distillation_term(student_logits, teacher_logits, temperature),
            "ce": (1 - alpha) * cross_entropy(student_logits, targets, label_smoothing)}


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, in fp32 whatever the autocast dtype."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature ** 2 * kl


def hint_loss(regressed_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015): mean squared error between the regressed hint and the teacher's."""
    return F.mse_loss(regressed_student.float(), teacher_features.float())


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, in fp32 whatever the autocast dtype.

    TCKD is the KL between the binary (target class, every other class) distributions of teacher
    and student; NCKD the KL between their distributions over the non-target classes alone. Each
    is a batch-mean KL times T^2, as in `distillation_term`. Hinton's KL is TCKD + (1 - p_t) * NCKD,
    with p_t the teacher's target probability: decoupling frees NCKD from that damping weight.
    """
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    is_target = F.one_hot(targets, student.shape[1]).bool()
    tckd = F.kl_div(binary_log_probs(student, is_target), binary_log_probs(teacher, is_target),
                    reduction="batchmean", log_target=True)
    # Subtracting 1000 from the target logit (mdistiller's form) drops its probability to exactly 0
    # in fp32, leaving a softmax over the other classes; -inf would give 0 * inf = NaN in the KL.
    hide_target = 1000.0 * is_target
    nckd = F.kl_div(F.log_softmax(student - hide_target, dim=1), F.log_softmax(teacher - hide_target, dim=1),
                    reduction="batchmean", log_target=True)
    return temperature ** 2 * (alpha * tckd + beta * nckd)


def binary_log_probs(logits: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """(B, 2) log-probabilities of (the target class, any other class), from logsumexps, so a
    probability near 1 never turns into log(0)."""
    log_probs = F.log_softmax(logits, dim=1)
    return torch.stack([log_probs.masked_fill(~is_target, -math.inf).logsumexp(1),
                        log_probs.masked_fill(is_target, -math.inf).logsumexp(1)], dim=1)


def attention_transfer_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                            p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017), summed over the stages given.

    Per stage: the mean squared difference of the two attention maps (`attention_map`). Channel
    counts may differ (the map averages them away); spatial sizes must match, as they do for two
    torchvision ResNets at the same input size.
    """
    return sum((attention_map(s, p) - attention_map(t, p)).pow(2).mean()
               for s, t in zip(student_features, teacher_features, strict=True))


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the mean over channels of |x|^p, L2-normalised per image, in fp32."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)
