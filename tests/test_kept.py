"""kdlab.kept: a run's weights kept as float16 parts with a sha256 manifest, loaded bit for bit, and
refused whole when anything is off; `--teacher-weights` distils from them without a teacher trained."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import REPO, run_kdlab

from kdlab import kept
from kdlab.config import make_config
from kdlab.errors import KdlabError
from kdlab.models import build_model, tensors_sha256
from kdlab.results import KEPT_MANIFEST, read_kept_manifest, teacher_note, teachers_of

TEACHER = make_config("teacher_resnet50", smoke=True)
# The smoke teacher as `kdlab run --smoke` builds it: CLI overrides that reach the teacher's config.
SMOKE_FLAGS = ("--smoke", "--device", "cpu")


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 1 MiB, so that a ResNet18 makes many (every tensor boundary is no part boundary)."""
    monkeypatch.setattr(kept, "PART_BYTES", 2 ** 20)


def resnet_state(arch: str = "resnet18") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(arch, "none").state_dict()


def test_the_parts_join_into_the_float16_state_dict_bit_for_bit(tmp_path, small_parts):
    state = resnet_state()
    manifest = kept.keep_weights(state, TEACHER, tmp_path, test_acc=0.5)
    parts = sorted(tmp_path.glob("weights.fp16.part*"))
    assert [p.name for p in parts] == [part["name"] for part in manifest["parts"]] and len(parts) > 10
    assert all(p.stat().st_size <= 2 ** 20 for p in parts)
    joined = b"".join(p.read_bytes() for p in parts)
    assert hashlib.sha256(joined).hexdigest() == manifest["sha256"] and len(joined) == manifest["bytes"]
    loaded, read = kept.load_kept(tmp_path, TEACHER)
    assert read == manifest == json.loads((tmp_path / KEPT_MANIFEST).read_text())
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected), name
    # the identity students record: the float16 tensors', however they were serialized
    assert manifest["tensors_sha256"] == tensors_sha256(kept.half(state))
    assert manifest["config"]["run"] == "teacher_resnet50" and manifest["test_acc"] == 0.5


def test_keeping_again_leaves_no_part_of_the_earlier_weights(tmp_path, small_parts):
    kept.keep_weights(resnet_state(), TEACHER, tmp_path)
    kept.keep_weights({"w": torch.ones(3)}, TEACHER, tmp_path)
    assert [p.name for p in tmp_path.glob("weights.fp16.part*")] == ["weights.fp16.part00"]


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "weights.fp16.part01").unlink(), "weights.fp16.part01 is missing"),
    (lambda folder: (folder / "weights.fp16.part02").write_bytes(
        bytes([(folder / "weights.fp16.part02").read_bytes()[0] ^ 1]) + (folder / "weights.fp16.part02").read_bytes()[1:]),
     "weights.fp16.part02 does not match its sha256"),
    (lambda folder: (folder / KEPT_MANIFEST).unlink(), "holds no kept weights (manifest.json is missing)"),
])
def test_a_missing_or_altered_part_or_manifest_is_refused(tmp_path, small_parts, damage, message):
    kept.keep_weights(resnet_state(), TEACHER, tmp_path)
    damage(tmp_path)
    with pytest.raises(KdlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kept.load_kept(tmp_path, TEACHER)


def test_weights_kept_with_another_config_are_refused_by_name(tmp_path):
    kept.keep_weights({"w": torch.ones(3)}, TEACHER, tmp_path)
    with pytest.raises(KdlabError, match=r"another config .*epochs: 2 -> 7"):
        kept.load_kept(tmp_path, make_config("teacher_resnet50", smoke=True, epochs=7))


def test_the_committed_reference_teacher_loads_and_matches_its_manifest():
    """The kept reference teacher: every part present and intact, its config the scratch teacher's."""
    folder = REPO / "checkpoints" / "reference" / "teacher_resnet50"
    manifest = read_kept_manifest(folder)
    state, _ = kept.load_kept(folder, make_config("teacher_resnet50", weights="none"))
    model = build_model("resnet50", "none")
    model.load_state_dict(state)
    assert tensors_sha256(kept.half(state)) == manifest["tensors_sha256"]
    assert all(part["bytes"] <= 15 * 2 ** 20 for part in manifest["parts"])
    results = json.loads((REPO / manifest["results_file"]).read_text())
    assert results["test_acc"] == manifest["test_acc"]
    assert results["kept_weights"]["tensors_sha256"] == manifest["tensors_sha256"]
    assert abs(manifest["test_acc_float16"] - manifest["test_acc"]) <= 0.0005 and manifest["float16_within_tolerance"]


@pytest.fixture(scope="module")
def smoke_teacher(smoke_lab, tmp_path_factory):
    """The smoke lab's teacher (trained by the CLI's `run all --smoke`), kept as the plan keeps one."""
    from kdlab.checkpoints import load_checkpoint
    from kdlab.results import RunPaths

    state = load_checkpoint(RunPaths(smoke_lab[0], "teacher_resnet50").best)
    folder = tmp_path_factory.mktemp("teacher") / "kept"
    kept.keep_weights(state["modules"]["student"], make_config("teacher_resnet50", smoke=True), folder,
                      test_acc=state["results"]["test_acc"])
    return folder


def test_a_student_distils_the_kept_teacher_and_records_its_sha256(smoke_teacher, tmp_path):
    result = run_kdlab("run", "student_scratch_kd_scores", *SMOKE_FLAGS, "--teacher-weights", smoke_teacher,
                       "--ckpt-dir", tmp_path)
    assert "teacher_resnet50: loaded the kept weights" in result.stdout
    assert not (tmp_path / "teacher_resnet50_best.pt").exists(), "no teacher trains"
    results = json.loads((tmp_path / "student_scratch_kd_scores_results.json").read_text())
    assert results["teacher"]["weights_sha256"] == read_kept_manifest(smoke_teacher)["tensors_sha256"]


@pytest.mark.parametrize("spoil, flags, message", [
    (lambda folder: (folder / KEPT_MANIFEST).unlink(), (), "holds no kept weights"),
    (lambda folder: (folder / "weights.fp16.part00").write_bytes(b"altered"), (), "does not match its sha256"),
    (lambda folder: None, ("--teacher-epochs", "5"), "another config than this teacher_resnet50 (epochs: 2 -> 5)"),
])
def test_bad_teacher_weights_are_one_line_exit_2_and_nothing_trained(smoke_teacher, tmp_path, spoil, flags, message):
    folder = tmp_path / "kept"
    folder.mkdir()
    for path in smoke_teacher.iterdir():
        folder.joinpath(path.name).write_bytes(path.read_bytes())
    spoil(folder)
    ckpt = tmp_path / "ckpt"
    result = run_kdlab("run", "student_scratch_kd_scores", *SMOKE_FLAGS, *flags, "--teacher-weights", folder,
                       "--ckpt-dir", ckpt, check=False)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not ckpt.exists(), "nothing trained, nothing written"


def distilled(run: str, seed: int, teacher_acc: float, sha: str | None) -> dict:
    teacher = dict(run="teacher_resnet50", seed=42, test_acc=teacher_acc, **({"weights_sha256": sha} if sha else {}))
    return dict(run=run, config=dict(seed=seed), teacher=teacher)


def test_one_teacher_for_every_distilled_run_needs_no_note():
    seeds = {"teacher_resnet50": [dict(run="teacher_resnet50", config=dict(seed=42), teacher=None,
                                       kept_weights=dict(tensors_sha256="a" * 64))],
             "student_scratch_kd_scores": [distilled("student_scratch_kd_scores", s, 0.9, "a" * 64) for s in (42, 43)]}
    assert teachers_of(seeds) == [dict(sha256="a" * 64, test_acc=0.9, in_folder=True,
                                       runs={"student_scratch_kd_scores": [42, 43]})]
    assert teacher_note(seeds) is None


def test_runs_distilled_from_different_teachers_are_named_with_their_teachers():
    seeds = {"teacher_resnet50": [dict(run="teacher_resnet50", config=dict(seed=42), teacher=None,
                                       kept_weights=dict(tensors_sha256="b" * 64))],
             "student_scratch_kd_scores": [distilled("student_scratch_kd_scores", s, 0.9061, None) for s in (42, 43)],
             "student_scratch_dkd": [distilled("student_scratch_dkd", 44, 0.909, "b" * 64)]}
    note = teacher_note(seeds)
    assert note.startswith("The distilled runs learned from 2 teachers")
    assert ("ResNet18 from scratch + logit KD (seeds 42, 43) from an earlier teacher whose weights were not kept "
            "(test accuracy 0.9061)") in note
    assert "ResNet18 from scratch + decoupled KD (seed 44) from the teacher in these results (test accuracy 0.9090, " \
           "sha256 bbbbbbbb)" in note


def test_the_reference_results_table_names_its_two_teachers_until_the_one_teacher_item_has_run():
    from kdlab.figures import format_results_table
    from kdlab.results import load_seed_results

    seeds = load_seed_results(REPO / "results" / "reference")
    found = teachers_of(seeds)
    kept_sha = read_kept_manifest(REPO / "checkpoints/reference/teacher_resnet50")["tensors_sha256"]
    assert {g["sha256"] for g in found} <= {None, kept_sha}
    if len(found) > 1:
        assert teacher_note(seeds) in format_results_table(seeds)
