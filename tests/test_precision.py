"""The precision switch (auto, bf16, fp16, fp32): refused where the device has no use for it, and
recorded in the results. GPU paths run here through the same code: the device's answers are
stood in for where a test needs a GPU's, and the training functions take fp16 on the CPU."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_RUN as RUN
from conftest import train_tiny as train

from kdlab.cli import main
from kdlab.config import SpeedLevers
from kdlab.errors import KdlabError
from kdlab.lab import Lab
from kdlab.train import check_precision, onednn_where_it_computes, resolve_precision


@pytest.mark.parametrize("command, needle", [
    (["run", RUN, "--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    (["sweep", RUN, "--engine", "serial", "--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    (["run", RUN, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["sweep", RUN, "--precision", "half"], "argument --precision: invalid choice: 'half'"),
])
def test_bad_precision_is_one_line_exit_2_and_nothing_trained(tmp_path, capsys, command, needle):
    folder = tmp_path / "out"
    args = command + ["--smoke", "--device", "cpu", "--ckpt-dir" if command[0] == "run" else "--out", str(folder)]
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:   # argparse's own refusals (kdlab.cli.Parser: one line, exit 2)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not folder.exists(), "nothing is written before the settings are checked"


def test_the_lab_refuses_an_unknown_precision():
    with pytest.raises(KdlabError, match="precision must be auto, bf16, fp16 or fp32, got 'fp8'"):
        Lab(device="cpu", precision="fp8")
    assert Lab(device="cpu").precision == "fp32" and Lab(device="cpu", precision="bf16").precision == "bf16"


@pytest.mark.parametrize("capability, name, auto", [((7, 5), "Tesla T4", "fp16"), ((9, 0), "NVIDIA H200", "bf16")])
def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch, capability, name, auto):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    gpu = torch.device("cuda")
    assert check_precision("auto", gpu) == resolve_precision("auto", gpu) == auto
    assert check_precision("fp16", gpu) == "fp16" and check_precision("fp32", gpu) == "fp32"
    if auto == "bf16":
        assert check_precision("bf16", gpu) == "bf16"
    else:
        with pytest.raises(KdlabError) as refused:
            check_precision("bf16", gpu)
        assert str(refused.value).startswith(f"--precision bf16: the {name} (compute capability 7.5) has no "
                                             f"native bf16 convolutions")
        assert "Use --precision fp16 (with a loss scaler) or auto." in str(refused.value)


@pytest.mark.parametrize("precision, expected", [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_the_results_and_the_log_name_the_precision(tmp_path, tiny_splits, precision, expected):
    lines = []
    trained = train(tiny_splits, tmp_path, log=lines.append, precision=precision)
    assert trained.results["precision"] == expected
    assert f"training on cpu ({expected})" in lines[0]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in trained.results["history"])


def test_bf16_steps_at_16_px_on_the_cpu_run_without_onednn():
    """oneDNN's bf16 weight gradient of a 3x3 stride-2 convolution over a 1x1 map (layer4's first, at
    16 px) is uninitialised memory, so such steps run on torch's own kernels: the eight taps that see
    only padding get a zero gradient, the centre the fp32 one. At the lab's sizes oneDNN stays on."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
    maps = torch.randn(4, 8, 1, 1)

    def weight_gradient(dtype):
        conv.zero_grad(set_to_none=True)
        with onednn_where_it_computes(maps, dtype), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            conv(maps).float().square().sum().backward()
        return conv.weight.grad

    fp32 = weight_gradient(None)
    for _ in range(3):   # unguarded, oneDNN's answer changed from one call to the next
        bf16 = weight_gradient(torch.bfloat16)
        assert torch.equal(bf16[..., [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]], torch.zeros(8, 8, 8))
        torch.testing.assert_close(bf16[..., 1, 1], fp32[..., 1, 1], rtol=0.05, atol=0.05)
    assert torch.backends.mkldnn.enabled, "the flag is restored after the step"
    for size, dtype in [(32, torch.bfloat16), (16, None)]:
        with onednn_where_it_computes(torch.zeros(2, 3, size, size), dtype):
            assert torch.backends.mkldnn.enabled


# ----------------------------------------------------------------------------- the fp16 loss scaler

class InfScaler(torch.amp.GradScaler):
    """A loss scaler whose step finds inf gradients every `every` steps (every step by default),
    as fp16 does when no loss scale is low enough; the rest of it is torch's own."""

    def __init__(self, every: int = 1):
        super().__init__("cpu")
        self.every, self.steps = every, 0

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        if self.steps % self.every == 0:
            for flag in per_device.values():
                flag.fill_(1.0)
        self.steps += 1
        return per_device


def test_fp16_records_each_epochs_skipped_steps_and_loss_scale(tmp_path, tiny_splits):
    """fp16 autocast and torch's scaler, on the CPU: the scale starts at 2^16 and halves once per
    skipped step (it would double only after 2000 good ones)."""
    trained = train(tiny_splits, tmp_path, precision="fp16")
    history = trained.results["history"]
    assert trained.results["precision"] == "fp16"
    skipped = 0
    for epoch in history:
        assert isinstance(epoch["skipped_steps"], int) and 0 <= epoch["skipped_steps"] <= 4
        skipped += epoch["skipped_steps"]
        assert epoch["loss_scale"] == 2.0 ** 16 / 2 ** skipped


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_without_a_scaler_the_history_says_none(tmp_path, tiny_splits, precision):
    history = train(tiny_splits, tmp_path, precision=precision).results["history"]
    assert all(h["skipped_steps"] is None and h["loss_scale"] is None for h in history)


@pytest.mark.parametrize("fused_sgd", [False, True], ids=["default SGD", "fused SGD"])
def test_a_scaler_that_skips_many_steps_says_so(tmp_path, tiny_splits, monkeypatch, fused_sgd):
    """Every other step skipped, the first among them. Fused SGD skips on the device, and its
    momentum would start as uninitialised memory after a skipped first step if kdlab did not
    give it zeros (kdlab.train.make_optimizer): the run would diverge."""
    monkeypatch.setattr("kdlab.train.make_scaler", lambda device, dtype: InfScaler(every=2))
    lines = []
    history = train(tiny_splits, tmp_path, log=lines.append, precision="fp16",
                    speed=SpeedLevers(fused_sgd=fused_sgd)).results["history"]
    assert [h["skipped_steps"] for h in history] == [2, 2]
    assert [h["loss_scale"] for h in history] == [2.0 ** 14, 2.0 ** 12]
    warnings = [line for line in lines if "warning: the fp16 loss scaler" in line]
    assert warnings == [f"{RUN} epoch {e}: warning: the fp16 loss scaler skipped 2 of 4 steps (inf or nan "
                        f"gradients; loss scale now {2.0 ** (16 - 2 * e):.3g}), so those batches did not train. "
                        f"If it goes on, lower --lr or use --precision fp32 (or bf16 on a GPU that has it)."
                        for e in (1, 2)]


def test_a_scaler_that_skips_every_step_stops_the_run_before_saving(tmp_path, tiny_splits, monkeypatch):
    monkeypatch.setattr("kdlab.train.make_scaler", lambda device, dtype: InfScaler())
    with pytest.raises(KdlabError) as stopped:
        train(tiny_splits, tmp_path, precision="fp16")
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith(f"{RUN}: the fp16 loss scaler skipped all 4 steps of epoch 1 (inf or nan gradients "
                              f"at every loss scale down to 4.1e+03), so the weights did not change.")
    assert ("Nothing from this epoch was saved; no epoch had finished, so there is no checkpoint. Lower the "
            "learning rate (--lr) and run with --retrain, or run again with --precision fp32") in message
    assert not any(tmp_path.glob("*.pt")) and not any(tmp_path.glob("*.json"))
