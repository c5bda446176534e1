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

import dataclasses
import hashlib
import inspect
import math
import re

import torch
from torch import nn

from kdlab.config import NUM_CLASSES, RUNS, STARTS, TEACHER_RUN, Run
from kdlab.errors import KdlabError
from kdlab.losses import attention_transfer_loss, cross_entropy, dkd_loss, hint_loss, kd_logits_terms
from kdlab.models import StageOutput, stage_channels
from kdlab.registry import (BUILT_IN_METHODS, METHODS, AttentionSettings, DecoupledKDSettings, FeatureKDSettings,
                            LogitKDSettings, MethodInfo, NoSettings, Settings, setting)


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


class RegisteredLoss(Method):
    """A method registered from outside the package (`register_method`): its loss reads the
    student's logits, the frozen teacher's logits and the labels, and returns its terms by name."""

    def forward_train(self, images, targets, epochs_done):
        teacher_logits = self.teacher_forward(images)
        logits = self.student(images)
        key = self.settings.method_key
        return logits, loss_terms(key, METHODS[key].loss(logits.float(), teacher_logits.float(), targets,
                                                         **loss_settings(self.settings)))


def build_method(cfg, student: nn.Module, teacher: nn.Module | None) -> Method:
    """The method of `cfg` (its class named in kdlab.registry.METHODS), with the config's settings."""
    implementation = globals()[METHODS[cfg.method].implementation]
    return implementation(student, teacher, cfg.settings, cfg.label_smoothing)


# ----------------------------------------------------------------------------- a method of your own

# The setting every registered method has besides the loss's own, never passed to the loss.
REGISTERED_FIELDS = ("loss_code",)


def register_method(key: str, loss, settings: dict | None = None, name: str | None = None,
                    description: str = "a method registered from outside the package",
                    start: str = "scratch") -> str:
    """Make `loss` a distillation method of the lab, with a run of its own; returns the run's name.

    `loss(student_logits, teacher_logits, targets, **settings)` returns the loss terms by name
    (`{"ce": ..., "mse": ...}`; a lone tensor is one term named `key`), each a scalar; the training
    loop sums them and logs each. `settings` are its keyword arguments' values, recorded in the
    run's config. The run, `student_<start>_<key>` (a ResNet18 distilled from the lab's teacher,
    from scratch unless `start="pretrained"`), trains and loads with `Lab.run` like every run, and
    the results table, the figures and the report show it. The loss's source is part of the config
    (`loss_code`): a changed loss no longer loads the old checkpoint, it asks for --retrain.

    Registering a key again (a notebook cell run again) replaces it. A key or run name of the
    package's own, a loss that needs a setting not given, or one whose terms are not finite
    scalars on a trial batch, is refused in one line (KdlabError), and nothing is registered.
    """
    settings = dict(settings or {})
    run = f"student_{start}_{key}"
    checks = [(isinstance(key, str) and re.fullmatch(r"[a-z][a-z0-9_]*", key) is not None,
               f"method {key!r}: a key is lower-case letters, digits and _, starting with a letter"),
              (key not in BUILT_IN_METHODS, f"method {key!r}: the lab already has a method of that key; choose another"),
              (start in STARTS, f"method {key!r}: start must be one of {', '.join(STARTS)}, got {start!r}"),
              (not (run in RUNS and RUNS[run].method in BUILT_IN_METHODS),
               f"method {key!r}: its run {run} would replace the lab's own run of that name; choose another key"),
              (not set(settings) & set(REGISTERED_FIELDS),
               f"method {key!r}: {', '.join(REGISTERED_FIELDS)} are the lab's own settings; rename yours"),
              (callable(loss), f"method {key!r}: loss must be a function, got {type(loss).__name__}")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise KdlabError(problems[0])
    check_loss_signature(key, loss, settings)
    check_loss_values(key, loss, settings)
    fields = [(k, type(v), setting(v, f"a setting of {key}'s loss")) for k, v in settings.items()]
    code = dataclasses.field(default=loss_code(loss), metadata=dict(  # recorded, never a flag to set
        help="sha256 of the loss's source: another loss, another run", symbol="code", fixed=True))
    settings_class = dataclasses.make_dataclass(f"{key}_settings", fields + [("loss_code", str, code)],
                                                bases=(Settings,), frozen=True, namespace={"method_key": key})
    METHODS[key] = MethodInfo(name or key.replace("_", " "), description, settings_class,
                              tuple(terms_of(key, loss, settings)), "RegisteredLoss", loss=loss)
    RUNS[run] = Run("resnet18", key, start, in_lab=False)
    return run


def unregister_method(key: str) -> None:
    """Remove a method `register_method` added, and its run (the package's own stay)."""
    if key in BUILT_IN_METHODS:
        raise KdlabError(f"method {key!r} is the lab's own and cannot be removed")
    METHODS.pop(key, None)
    for run in [run for run, r in RUNS.items() if r.method == key]:
        del RUNS[run]


def registered_runs() -> list[str]:
    """The runs of methods registered from outside the package, in the order they were registered."""
    return [run for run, r in RUNS.items() if r.method not in BUILT_IN_METHODS and run != TEACHER_RUN]


def loss_settings(settings) -> dict:
    """A registered method's settings as its loss takes them (without the lab's own fields)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in REGISTERED_FIELDS}


def loss_code(loss) -> str:
    """12 hex digits of the sha256 of the loss's source (of its bytecode where there is no source)."""
    try:
        source = inspect.getsource(loss).encode()
    except (OSError, TypeError):
        code = getattr(loss, "__code__", None)
        source = code.co_code + repr(code.co_consts).encode() if code is not None else repr(loss).encode()
    return hashlib.sha256(source).hexdigest()[:12]


def check_loss_signature(key: str, loss, settings: dict) -> None:
    """The loss takes (student_logits, teacher_logits, targets) and every setting, and needs no other."""
    try:
        parameters = list(inspect.signature(loss).parameters.values())
    except (TypeError, ValueError):
        return   # a builtin or C function: the trial call below says whether it fits
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise KdlabError(f"method {key!r}: its loss must take (student_logits, teacher_logits, targets) first, "
                         f"then its settings; it takes ({', '.join(p.name for p in parameters)})")
    named = parameters[3:] if len(positional) >= 3 else []
    needed = [p.name for p in named if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
              and p.name not in settings]
    if needed:
        raise KdlabError(f"method {key!r}: its loss needs the setting{'s' if len(needed) > 1 else ''} "
                         f"{', '.join(needed)}, which settings= does not give")
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        unknown = [k for k in settings if k not in {p.name for p in named}]
        if unknown:
            raise KdlabError(f"method {key!r}: setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"{'are' if len(unknown) > 1 else 'is'} not a parameter of its loss")


def trial_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a student (with gradients) and of a teacher, and labels, for 8 images, seeded."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, NUM_CLASSES, generator=generator).requires_grad_()
    return student, 3 * torch.randn(8, NUM_CLASSES, generator=generator), torch.arange(8) % NUM_CLASSES


def terms_of(key: str, loss, settings: dict) -> dict[str, torch.Tensor]:
    return loss_terms(key, loss(*trial_batch(), **settings))


def check_loss_values(key: str, loss, settings: dict) -> None:
    """The loss, called on a trial batch, gives finite scalar terms that depend on the student."""
    try:
        terms = terms_of(key, loss, settings)
    except KdlabError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the student's code raised, said in one line
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise KdlabError(f"method {key!r}: its loss failed on a trial batch of 8 images "
                         f"({type(err).__name__}: {detail})") from None
    bad = [name for name, value in terms.items() if not math.isfinite(value.item())]
    if bad:
        raise KdlabError(f"method {key!r}: its loss term{'s' if len(bad) > 1 else ''} {', '.join(bad)} "
                         f"{'are' if len(bad) > 1 else 'is'} not finite on a trial batch of 8 images")
    if not sum(terms.values()).requires_grad:
        raise KdlabError(f"method {key!r}: its loss does not depend on the student's logits, so it cannot train them")


def loss_terms(key: str, value) -> dict[str, torch.Tensor]:
    """A loss's value as terms by name: a dict of scalar tensors, or one scalar tensor named `key`."""
    terms = value if isinstance(value, dict) else {key: value}
    if not terms:
        raise KdlabError(f"method {key!r}: its loss returned no term")
    for name, term in terms.items():
        if not isinstance(term, torch.Tensor):
            raise KdlabError(f"method {key!r}: its loss term {name!r} is a {type(term).__name__}, not a tensor")
        if term.ndim:
            raise KdlabError(f"method {key!r}: its loss term {name!r} has shape {tuple(term.shape)}, not a scalar "
                             f"(reduce it, e.g. with .mean())")
    return terms
