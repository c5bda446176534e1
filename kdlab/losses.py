"""The distillation losses as pure functions; kdlab.methods wraps each in a method."""
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
