"""The runs of the lab, each a frozen dataclass with every hyperparameter named.

A run is a recipe (fine-tune from ImageNet or train from scratch) plus a method
(cross-entropy, logit KD, feature KD). `make_config(name, **overrides)` is the only
way to build one, so the CLI, the notebook and the tests agree on the defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdlab.errors import KdlabError

TEACHER_RUN = "teacher_resnet50"
STAGES = ("layer1", "layer2", "layer3", "layer4")   # the ResNet stages a feature method can read


@dataclass(frozen=True)
class RunConfig:
    run: str
    arch: str                    # torchvision name: "resnet50" (teacher) or "resnet18" (student)
    method: str                  # key of kdlab.methods.METHODS
    weights: str                 # "imagenet" or "none"
    epochs: int
    lr: float                    # peak learning rate for `batch_size`
    weight_decay: float
    batch_size: int = 512
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    image_size: int = 128        # CIFAR's 32 px upsampled on the device (README: "Input resolution")
    temperature: float = 4.0     # logit KD and decoupled KD
    alpha: float = 0.9           # logit KD: weight of the distillation term
    hint_layer: str = "layer3"   # feature KD: the ResNet stage whose output is matched
    hint_weight: float = 1.0     # feature KD: weight of the hint MSE next to CE
    # Decoupled KD, mdistiller's CIFAR defaults; its warm-up of 20 of 240 epochs (8%) is about
    # 2 of our 20: the DKD term grows linearly from 0 over the first `dkd_warmup_epochs`.
    dkd_alpha: float = 1.0       # weight of TCKD (target class vs the rest)
    dkd_beta: float = 8.0        # weight of NCKD (among the non-target classes)
    dkd_warmup_epochs: float = 2.0
    # Attention transfer: the stages compared (all four, as mdistiller) and the paper code's weight.
    at_stages: tuple[str, ...] = STAGES
    at_p: float = 2.0            # attention map = mean over channels of |x|^p
    at_weight: float = 1000.0
    val_per_class: int = 500
    limit_train: int = 0         # 0 = the whole 45,000-image train split
    seed: int = 42
    smoke: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.method != "ce"


# Fine-tuning keeps the ImageNet features: small LR, light decay, few epochs.
FINETUNE = dict(weights="imagenet", epochs=6, lr=0.05, weight_decay=5e-5)
# From scratch: Goyal et al.'s linear rule (0.1 per 256 images) and the usual CIFAR decay.
SCRATCH = dict(weights="none", epochs=20, lr=0.2, weight_decay=5e-4)
# A teacher from scratch needs a longer schedule than the students to be worth distilling.
SCRATCH_TEACHER_EPOCHS = 30

RUNS = {
    "teacher_resnet50":               dict(arch="resnet50", method="ce", **FINETUNE),
    "student_pretrained_baseline":    dict(arch="resnet18", method="ce", **FINETUNE),
    "student_pretrained_kd_logits":   dict(arch="resnet18", method="kd_logits", **FINETUNE),
    "student_pretrained_kd_features": dict(arch="resnet18", method="kd_features", **FINETUNE),
    "student_scratch_baseline":       dict(arch="resnet18", method="ce", **SCRATCH),
    "student_scratch_kd_scores":      dict(arch="resnet18", method="kd_logits", **SCRATCH),
    "student_scratch_kd_features":    dict(arch="resnet18", method="kd_features", **SCRATCH),
    "student_scratch_dkd":            dict(arch="resnet18", method="dkd", **SCRATCH),
    "student_scratch_at":             dict(arch="resnet18", method="attention", **SCRATCH),
}
# The six runs of the original lab; `run all` trains these.
LAB_RUNS = list(RUNS)[:6]

# Smoke mode: synthetic data, random weights, 32 px, two short epochs. Proves the whole
# pipeline end to end on any CPU in minutes; its numbers are never results.
SMOKE = dict(weights="none", epochs=2, batch_size=64, image_size=32, val_per_class=50,
             lr=0.05, warmup_epochs=0.5)

OVERRIDABLE = ("weights", "epochs", "batch_size", "lr", "image_size", "temperature",
               "alpha", "hint_layer", "hint_weight", "dkd_alpha", "dkd_beta", "dkd_warmup_epochs",
               "at_stages", "at_p", "at_weight", "limit_train", "seed")


def make_config(run: str, smoke: bool = False, **overrides) -> RunConfig:
    """The config of `run`: its recipe, then smoke settings, then the overrides that are not None.

    `weights` only overrides runs that start from ImageNet: a scratch run is scratch by name.
    """
    if run not in RUNS:
        raise KdlabError(f"unknown run {run}; valid runs: {', '.join(RUNS)} (or 'all')")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise KdlabError(f"cannot override {sorted(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
    fields = dict(RUNS[run], run=run, smoke=smoke)
    if fields["weights"] == "none":
        overrides.pop("weights", None)
    elif overrides.get("weights") == "none":
        fields.update(SCRATCH)  # no ImageNet start: a fine-tuning LR would under-train
    if run == TEACHER_RUN and fields["weights"] == "none":
        fields["epochs"] = SCRATCH_TEACHER_EPOCHS
    if smoke:
        fields.update(SMOKE)
    fields.update(overrides)
    return validate(RunConfig(**fields))


def validate(cfg: RunConfig) -> RunConfig:
    problems = []
    if cfg.weights not in ("imagenet", "none"):
        problems.append(f"weights must be 'imagenet' or 'none', got {cfg.weights!r}")
    if cfg.epochs < 1:
        problems.append(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        problems.append(f"batch size must be positive, got {cfg.batch_size}")
    if cfg.image_size < 16:
        problems.append(f"image size must be at least 16 px, got {cfg.image_size}")
    if not cfg.lr > 0:
        problems.append(f"learning rate must be positive, got {cfg.lr}")
    if not cfg.temperature > 0:
        problems.append(f"temperature must be positive, got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        problems.append(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.hint_layer not in STAGES:
        problems.append(f"hint layer must be one of {', '.join(STAGES)}, got {cfg.hint_layer!r}")
    if cfg.dkd_alpha < 0 or cfg.dkd_beta < 0:
        problems.append(f"DKD's alpha and beta must be non-negative, got {cfg.dkd_alpha} and {cfg.dkd_beta}")
    if cfg.dkd_warmup_epochs < 0:
        problems.append(f"DKD's warm-up must be 0 epochs or more, got {cfg.dkd_warmup_epochs}")
    if not cfg.at_stages or not set(cfg.at_stages) <= set(STAGES):
        problems.append(f"attention stages must be among {', '.join(STAGES)}, got {', '.join(cfg.at_stages) or 'none'}")
    if not cfg.at_p > 0 or cfg.at_weight < 0:
        problems.append(f"attention p must be positive and its weight non-negative, got {cfg.at_p} and {cfg.at_weight}")
    if cfg.limit_train < 0 or 0 < cfg.limit_train < 10:
        problems.append(f"limit-train must be 0 (no limit) or at least 10 (one image per class), "
                        f"got {cfg.limit_train}")
    if problems:
        raise KdlabError("; ".join(problems))
    return cfg


def config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_differences(stored: dict, requested: RunConfig) -> list[str]:
    """Fields whose stored value differs from the requested one, as 'field: stored -> requested'.

    A field the stored config lacks was added after it was written (a new method's setting):
    it counts as its default, the recipe that checkpoint was trained with.
    """
    wanted = config_dict(requested)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    stored = {**defaults, **stored}
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k, '<absent>')!r} -> {wanted.get(k, '<absent>')!r}"
            for k in keys if stored.get(k) != wanted.get(k)]
