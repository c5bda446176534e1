"""The distillation methods by name: what each is called, what it logs and which settings it takes.

A method's settings are a small frozen dataclass with defaults and validation; its behaviour
(`forward_train`) is the class of the same entry in kdlab.methods. The CLI's flags, the config
table, the report's method names and settings, the figures' labels and the benchmark's step
kinds are all read from here. No torch: `--help`, `status` and `report` start at once.

Adding a method: its loss in kdlab.losses, its class in kdlab.methods, its settings class and
one line of METHODS here, and its test. A method from outside the package (a notebook cell, a
student's file) is one call instead: kdlab.methods.register_method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

# The ResNet stages a feature method can read (kdlab.models.StageOutput hooks their outputs).
STAGES = ("layer1", "layer2", "layer3", "layer4")


def setting(default, help: str, symbol: str | None = None):
    r"""A method setting: its default, a line for --help and its symbol (LaTeX), the same in the
    notebook, docs/methods.md and the report. A paper's letter where it has one ($T$, $\alpha$, and
    $\beta$ for decoupled KD's NCKD weight alone); a term's weight next to CE is $\lambda$ with the
    term's name ($\lambda_{\mathrm{hint}}$, $\lambda_{\mathrm{AT}}$)."""
    return field(default=default, metadata=dict(help=help, symbol=symbol))


class Settings:
    """Base of the settings classes; `problems()` lists what is wrong with the values, in words."""

    def problems(self) -> list[str]:
        return []


def failed(*checks: tuple[bool, str]) -> list[str]:
    """The messages of the (condition, message) checks whose condition is false."""
    return [message for ok, message in checks if not ok]


def stages_check(name: str, stages) -> tuple[bool, str]:
    return (bool(stages) and set(stages) <= set(STAGES),
            f"{name} must be among {', '.join(STAGES)}, got {', '.join(map(str, stages)) or 'none'}")


@dataclass(frozen=True)
class NoSettings(Settings):
    """Cross-entropy on the labels has nothing to set."""


@dataclass(frozen=True)
class LogitKDSettings(Settings):
    temperature: float = setting(4.0, "softens both distributions", "$T$")
    alpha: float = setting(0.9, "weight of the distillation term; CE gets 1 - alpha", r"$\alpha$")

    def problems(self):
        return failed((self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
                      (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"))


@dataclass(frozen=True)
class FeatureKDSettings(Settings):
    hint_layer: str = setting("layer3", "the ResNet stage whose output is matched", "hint")
    hint_weight: float = setting(1.0, "weight of the hint MSE next to CE", r"$\lambda_{\mathrm{hint}}$")

    def problems(self):
        return failed(stages_check("hint layer", [self.hint_layer]),
                      (self.hint_weight >= 0, f"hint weight must be non-negative, got {self.hint_weight}"))


@dataclass(frozen=True)
class DecoupledKDSettings(Settings):
    """mdistiller's CIFAR defaults. Its warm-up, 20 of 240 epochs (8%), is about 2 of our 20."""
    temperature: float = setting(4.0, "softens both distributions", "$T$")
    alpha: float = setting(1.0, "weight of TCKD (target class against the rest)", r"$\alpha$")
    beta: float = setting(8.0, "weight of NCKD (among the non-target classes)", r"$\beta$")
    ce_weight: float = setting(1.0, "weight of the cross-entropy on the labels", "CE weight")
    dkd_warmup_epochs: float = setting(2.0, "epochs over which the DKD term grows linearly from 0", "warm-up")

    def problems(self):
        return failed((self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
                      *((value >= 0, f"{name} must be non-negative, got {value}") for name, value in
                        (("alpha", self.alpha), ("beta", self.beta), ("CE weight", self.ce_weight),
                         ("DKD warm-up epochs", self.dkd_warmup_epochs))))


@dataclass(frozen=True)
class AttentionSettings(Settings):
    """All four stages, as mdistiller's AT; the weight of the paper's code."""
    attention_stages: tuple[str, ...] = setting(STAGES, "the ResNet stages whose attention maps are matched",
                                                "stages")
    attention_p: float = setting(2.0, "an attention map is the channel mean of |x|^p", "$p$")
    attention_weight: float = setting(1000.0, "weight of the attention term next to CE", r"$\lambda_{\mathrm{AT}}$")

    def problems(self):
        return failed(stages_check("attention stages", self.attention_stages),
                      (self.attention_p > 0, f"attention p must be positive, got {self.attention_p}"),
                      (self.attention_weight >= 0, f"attention weight must be non-negative, got {self.attention_weight}"))


@dataclass(frozen=True)
class MethodInfo:
    name: str                       # as the report and the figures write it
    description: str                # one line
    settings: type                  # its Settings dataclass
    loss_terms: tuple[str, ...]     # the names forward_train returns, the training loop logs
    implementation: str             # its class in kdlab.methods
    loss: Callable | None = None    # a registered method's loss (kdlab.methods.register_method)

    @property
    def uses_teacher(self) -> bool:
        return self.loss_terms != ("ce",)


METHODS = {
    "ce": MethodInfo("cross-entropy", "the labels alone", NoSettings, ("ce",), "Method"),
    "kd_logits": MethodInfo("logit KD", "Hinton et al. 2015: the teacher's softened class probabilities",
                            LogitKDSettings, ("kd", "ce"), "LogitKD"),
    "kd_features": MethodInfo("feature KD", "FitNets (Romero et al. 2015): a hint on one stage's output",
                              FeatureKDSettings, ("ce", "hint"), "FeatureKD"),
    "dkd": MethodInfo("decoupled KD", "Zhao et al. 2022: target and non-target KD weighted apart",
                      DecoupledKDSettings, ("ce", "dkd"), "DecoupledKD"),
    "attention": MethodInfo("attention transfer", "Zagoruyko & Komodakis 2017: the stages' spatial attention maps",
                            AttentionSettings, ("ce", "attention"), "AttentionTransfer"),
}
# The methods of the package; kdlab.methods.register_method adds others beside them, never over them.
BUILT_IN_METHODS = frozenset(METHODS)


def setting_fields(method: str) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(METHODS[method].settings)


def setting_owners(name: str) -> dict[str, dataclasses.Field]:
    """The methods that have setting `name`, each with its field (whose help says what it means there)."""
    return {key: f for key in METHODS for f in setting_fields(key) if f.name == name}


def all_settings() -> dict[str, dataclasses.Field]:
    """Every method setting by name, once (methods that share a name share its type)."""
    return {f.name: f for key in METHODS for f in setting_fields(key)}
