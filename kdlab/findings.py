"""The lab's findings, computed once from its results files; the report, the docs and the notebook word them.

A comparison is a paired difference of two runs (kdlab.stats.paired_difference). `Findings`
computes each comparison once, however many renderings use it: each distillation run's gain over
its baseline, the best student's gap to its teacher, logit KD from scratch against its baseline
at each training budget and the verdict those budgets give.
kdlab.report writes them in LaTeX, kdlab.docs and kdlab.figures' results table in Markdown;
none of them compares runs itself. numpy only, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial

from kdlab.config import CLASSES, TEACHER_RUN, baseline_of
from kdlab.results import (BUDGETS, EQUAL_EPOCHS, LOGIT_KD_FROM_SCRATCH, best_distilled, best_student,
                           default_seed_results, mean_seconds)
from kdlab.stats import paired_difference, paired_difference_by_class, training_seed


@dataclass(frozen=True)
class Verdict:
    """What the budget comparisons say of logit KD from scratch: the budgets (BUDGETS' labels) at
    which it beats its baseline, is level with it or loses to it, those not measured yet, and the
    conclusion: "pending" (no gain at equal epochs, budgets still to measure), "open" (a gain at
    equal epochs, budgets still to measure: knowledge or compute is open), "no gain" (none at equal
    epochs, every budget measured), "every budget" (the gain holds at every budget-matched baseline),
    "the compute" (at none of them) or "mixed". `compute`, for "every budget": the seconds that say
    whether the longest budget-matched baseline had the teacher's compute too (Findings.teacher_compute)."""
    wins: list[str]
    ties: list[str]
    losses: list[str]
    pending: list[str]
    matched: list[str]       # the budget-matched budgets, all but equal epochs
    conclusion: str
    compute: dict | None = None


@dataclass
class Findings:
    """The comparisons of a results folder (`seeds`: load_seed_results), with the budget-matched
    baselines of logit KD from scratch (`budget_baselines`: load_budget_baselines, empty if none)."""
    seeds: dict[str, list[dict]]
    budget_baselines: dict[str, list[dict]] = field(default_factory=dict)
    _differences: dict[tuple[str, str], dict] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def results(self) -> dict[str, dict]:
        return default_seed_results(self.seeds)

    def difference(self, better: str, other: str) -> dict:
        """`better` minus `other`, paired by seed on the same test images; each pair computed once."""
        if (better, other) not in self._differences:
            self._differences[better, other] = paired_difference(self.seeds[better], self.seeds[other])
        return self._differences[better, other]

    def gain(self, run: str) -> dict | None:
        """A distillation run against the cross-entropy run of its start; None without both."""
        base = baseline_of(run)
        return self.difference(run, base) if run in self.seeds and base in self.seeds else None

    @cached_property
    def best_student(self) -> str | None:
        return best_student(self.results)

    @cached_property
    def teacher_gap(self) -> dict | None:
        """The best student against its teacher; None without both."""
        best = self.best_student
        return self.difference(best, TEACHER_RUN) if best and TEACHER_RUN in self.seeds else None

    @cached_property
    def per_class(self) -> tuple[str, str, list[dict]] | None:
        """(the best distilled run, its baseline, their paired difference class by class); None without both."""
        if (kd := best_distilled(self.results)) is None:
            return None
        base = baseline_of(kd)
        return kd, base, paired_difference_by_class(self.seeds[kd], self.seeds[base], len(CLASSES))

    @property
    def compares_budgets(self) -> bool:
        """Whether logit KD from scratch and its baseline have results, so the budgets can be compared."""
        return LOGIT_KD_FROM_SCRATCH in self.results and baseline_of(LOGIT_KD_FROM_SCRATCH) in self.results

    @cached_property
    def budgets(self) -> list[dict]:
        """Logit KD from scratch against its baseline at each budget of BUDGETS: {budget, label, baseline
        (its results by seed, or None while not trained), epochs (the baseline's), difference (or None)}.
        At equal epochs the baseline is the reference's own, at the other budgets a budget-matched one."""
        kd = LOGIT_KD_FROM_SCRATCH
        out = []
        for budget, label in BUDGETS.items():
            equal_epochs = budget == EQUAL_EPOCHS
            baseline = self.seeds.get(baseline_of(kd)) if equal_epochs else self.budget_baselines.get(budget)
            difference = None
            if baseline and self.seeds.get(kd):
                difference = (self.difference(kd, baseline_of(kd)) if equal_epochs
                              else paired_difference(self.seeds[kd], baseline))
            out.append(dict(budget=budget, label=label, baseline=baseline,
                            epochs=baseline[0]["epochs"] if baseline else None, difference=difference))
        return out

    @cached_property
    def verdict(self) -> Verdict:
        """The conclusion on logit KD from scratch, whichever way the budget comparisons go."""
        measured = {c["label"]: c["difference"] for c in self.budgets if c["difference"] is not None}
        wins = [label for label, d in measured.items() if d["excludes_zero"] and d["mean_difference"] > 0]
        losses = [label for label, d in measured.items() if d["excludes_zero"] and d["mean_difference"] < 0]
        ties = [label for label, d in measured.items() if not d["excludes_zero"]]
        pending = [c["label"] for c in self.budgets if c["difference"] is None]
        matched = [c for c in self.budgets if c["budget"] != EQUAL_EPOCHS]
        # The Verdict of these outcomes, given its conclusion.
        concluding = partial(Verdict, wins, ties, losses, pending, [c["label"] for c in matched])
        gained = BUDGETS[EQUAL_EPOCHS] in wins
        if pending:
            return concluding("open" if gained else "pending")
        if not gained:
            return concluding("no gain")
        matched_wins = [c for c in matched if c["label"] in wins]
        if len(matched_wins) == len(matched):
            return concluding("every budget", self.teacher_compute(matched))
        return concluding("mixed" if matched_wins else "the compute")

    def teacher_compute(self, matched: list[dict]) -> dict | None:
        """The seconds that say whether the longest budget-matched baseline trained as long as the
        teacher and the distilled student together: only such a baseline tests the teacher's
        compute. None when the teacher logit KD learned from has no results here."""
        kd = LOGIT_KD_FROM_SCRATCH
        teacher_seed = self.results[kd]["teacher"]["seed"]
        teacher = [r for r in self.seeds.get(TEACHER_RUN, []) if training_seed(r) == teacher_seed]
        if not teacher:
            return None
        longest = max(matched, key=lambda c: mean_seconds(c["baseline"]))
        return dict(teacher_seconds=mean_seconds(teacher), kd_seconds=mean_seconds(self.seeds[kd]),
                    longest=longest["label"], longest_seconds=mean_seconds(longest["baseline"]))
