"""What each training method computes, one small class per method, mdistiller-style.

kdlab.registry names each method, declares its settings and loss terms and lists it in
METHODS; the class here is built from those settings. `forward_train(images, targets,
epochs_done)` returns `(student_logits, {loss_name: loss})`; the training loop sums the dict
and logs each term by name. `epochs_done` is the progress in epochs (a float: 1.5 is halfway
through the second epoch), for methods that warm up.

The teacher is frozen by construction: no gradients, eval mode whatever `train()` is called
with, and its forward runs under no_grad (not inference_mode: its outputs are loss targets, and
autograd may save them for the backward pass, which inference tensors forbid).
"""
from __future__ import annotations

import torch
from torch import nn

from kdlab.losses import attention_transfer_loss, cross_entropy, dkd_loss, hint_loss, kd_logits_terms
from kdlab.models import StageOutput, stage_channels
from kdlab.registry import (METHODS, AttentionSettings, DecoupledKDSettings, FeatureKDSettings,
                            LogitKDSettings, NoSettings)


class Method(nn.Module):
    """Cross-entropy baseline; the base of the distillers.

    `label_smoothing` is the recipe's (kdlab.config), on the cross-entropy term of every method.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, settings=NoSettings(),
                 label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.settings, self.label_smoothing = settings, label_smoothing
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

    def cross_entropy(self, logits, targets):
        return cross_entropy(logits, targets, self.label_smoothing)

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(images)

    def forward_train(self, images, targets, epochs_done):
        logits = self.student(images)
        return logits, {"ce": self.cross_entropy(logits, targets)}


class LogitKD(Method):
    """Hinton et al. 2015: match the teacher's softened class probabilities."""
    settings: LogitKDSettings

    def forward_train(self, images, targets, epochs_done):
        teacher_logits = self.teacher_forward(images)
        logits = self.student(images)
        return logits, kd_logits_terms(logits, teacher_logits, targets, self.settings.temperature,
                                       self.settings.alpha, self.label_smoothing)


class FeatureKD(Method):
    """FitNets (Romero et al. 2015), in one stage: CE plus a hint on one ResNet stage.

    A 1x1 conv + BN regressor maps the student's stage output to the teacher's width; it
    trains with the student and is dropped at deployment.
    """
    settings: FeatureKDSettings

    def __init__(self, student, teacher, settings: FeatureKDSettings, label_smoothing: float = 0.0):
        super().__init__(student, teacher, settings, label_smoothing)
        stage = settings.hint_layer
        self.student_stage, self.teacher_stage = StageOutput(student, stage), StageOutput(teacher, stage)
        s, t = stage_channels(student, stage), stage_channels(teacher, stage)
        self.regressor = nn.Sequential(nn.Conv2d(s, t, 1, bias=False), nn.BatchNorm2d(t))

    def trained_modules(self):
        return {"student": self.student, "regressor": self.regressor}

    def close(self):
        self.student_stage.remove()
        self.teacher_stage.remove()

    def forward_train(self, images, targets, epochs_done):
        self.teacher_forward(images)
        logits = self.student(images)
        hint = self.regressor(self.student_stage.output)
        return logits, {
            "ce": self.cross_entropy(logits, targets),
            "hint": self.settings.hint_weight * hint_loss(hint, self.teacher_stage.output),
        }


class DecoupledKD(Method):
    """Decoupled KD (Zhao et al. 2022): CE plus alpha * TCKD + beta * NCKD (`kdlab.losses.dkd_loss`).

    The DKD term ramps up linearly over the first `dkd_warmup_epochs`: its beta of 8 on the
    teacher's non-target classes would otherwise pull an untrained student off before CE has shaped it.
    """
    settings: DecoupledKDSettings

    def forward_train(self, images, targets, epochs_done):
        teacher_logits = self.teacher_forward(images)
        logits = self.student(images)
        s = self.settings
        ramp = min(epochs_done / s.dkd_warmup_epochs, 1.0) if s.dkd_warmup_epochs else 1.0
        return logits, {
            "ce": s.ce_weight * self.cross_entropy(logits, targets),
            "dkd": ramp * dkd_loss(logits, teacher_logits, targets, s.alpha, s.beta, s.temperature),
        }


class AttentionTransfer(Method):
    """Attention transfer (Zagoruyko & Komodakis 2017): CE plus the distance between the spatial
    attention maps of student and teacher after each stage given (`kdlab.losses.attention_transfer_loss`).

    No module is added: an attention map has one channel whatever the stage's width.
    """
    settings: AttentionSettings

    def __init__(self, student, teacher, settings: AttentionSettings, label_smoothing: float = 0.0):
        super().__init__(student, teacher, settings, label_smoothing)
        self.student_stages = [StageOutput(student, stage) for stage in settings.attention_stages]
        self.teacher_stages = [StageOutput(teacher, stage) for stage in settings.attention_stages]

    def close(self):
        for hook in self.student_stages + self.teacher_stages:
            hook.remove()

    def forward_train(self, images, targets, epochs_done):
        self.teacher_forward(images)
        logits = self.student(images)
        attention = attention_transfer_loss([s.output for s in self.student_stages],
                                            [t.output for t in self.teacher_stages], self.settings.attention_p)
        return logits, {"ce": self.cross_entropy(logits, targets),
                        "attention": self.settings.attention_weight * attention}


def build_method(cfg, student: nn.Module, teacher: nn.Module | None) -> Method:
    """The method of `cfg` (its class named in kdlab.registry.METHODS), with the config's settings."""
    implementation = globals()[METHODS[cfg.method].implementation]
    return implementation(student, teacher, cfg.settings, cfg.label_smoothing)
