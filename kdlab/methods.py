"""One small unit per training method, mdistiller-style.

`forward_train(images, targets)` returns `(student_logits, {loss_name: loss})`; the
training loop sums the dict and logs each term by name. The teacher is frozen by
construction: no gradients, eval mode whatever `train()` is called with, and its
forward runs under no_grad (not inference_mode: its outputs are loss targets, and
autograd may save them for the backward pass, which inference tensors forbid).
"""
from __future__ import annotations

import torch
from torch import nn

from kdlab.losses import cross_entropy, hint_loss, kd_logits_terms
from kdlab.models import StageOutput, stage_channels


class Method(nn.Module):
    """Cross-entropy baseline; the base of the distillers."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.label_smoothing = label_smoothing
        # Stored outside nn.Module's registry: not saved with the student, not trained.
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trained_modules(self) -> dict[str, nn.Module]:
        """What the optimiser updates and the checkpoint stores, by name."""
        return {"student": self.student}

    def close(self) -> None:
        """Undo what the method did to the networks, once training is over."""

    @classmethod
    def from_config(cls, cfg, student, teacher):
        return cls(student, label_smoothing=cfg.label_smoothing)

    def cross_entropy(self, logits, targets):
        return cross_entropy(logits, targets, self.label_smoothing)

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(images)

    def forward_train(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": self.cross_entropy(logits, targets)}


class LogitKD(Method):
    """Hinton et al. 2015: match the teacher's softened class probabilities."""

    def __init__(self, student, teacher, temperature: float, alpha: float, label_smoothing: float = 0.0):
        super().__init__(student, teacher, label_smoothing)
        self.temperature, self.alpha = temperature, alpha

    @classmethod
    def from_config(cls, cfg, student, teacher):
        return cls(student, teacher, cfg.temperature, cfg.alpha, cfg.label_smoothing)

    def forward_train(self, images, targets):
        teacher_logits = self.teacher_forward(images)
        logits = self.student(images)
        return logits, kd_logits_terms(logits, teacher_logits, targets, self.temperature, self.alpha,
                                       self.label_smoothing)


class FeatureKD(Method):
    """FitNets (Romero et al. 2015), in one stage: CE plus a hint on one ResNet stage.

    A 1x1 conv + BN regressor maps the student's stage output to the teacher's width; it
    trains with the student and is dropped at deployment.
    """

    def __init__(self, student, teacher, hint_layer: str, hint_weight: float, label_smoothing: float = 0.0):
        super().__init__(student, teacher, label_smoothing)
        self.hint_weight = hint_weight
        self.student_stage = StageOutput(student, hint_layer)
        self.teacher_stage = StageOutput(teacher, hint_layer)
        s, t = stage_channels(student, hint_layer), stage_channels(teacher, hint_layer)
        self.regressor = nn.Sequential(nn.Conv2d(s, t, 1, bias=False), nn.BatchNorm2d(t))

    @classmethod
    def from_config(cls, cfg, student, teacher):
        return cls(student, teacher, cfg.hint_layer, cfg.hint_weight, cfg.label_smoothing)

    def trained_modules(self):
        return {"student": self.student, "regressor": self.regressor}

    def close(self):
        self.student_stage.remove()
        self.teacher_stage.remove()

    def forward_train(self, images, targets):
        self.teacher_forward(images)
        logits = self.student(images)
        hint = self.regressor(self.student_stage.output)
        return logits, {
            "ce": self.cross_entropy(logits, targets),
            "hint": self.hint_weight * hint_loss(hint, self.teacher_stage.output),
        }


METHODS = {"ce": Method, "kd_logits": LogitKD, "kd_features": FeatureKD}


def build_method(cfg, student: nn.Module, teacher: nn.Module | None) -> Method:
    return METHODS[cfg.method].from_config(cfg, student, teacher)
