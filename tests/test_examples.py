"""The training example runs end to end (a tiny budget) and writes its plots."""

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_digits  # noqa: E402


def test_train_digits_runs_every_optimizer_and_plots(tmp_path, capsys):
    plot = tmp_path / "digits.png"
    histories = train_digits.main(["--budget", "0.01", "--max-epochs", "1", "--plot", str(plot)])
    assert {(h.model, h.optimizer) for h in histories} == {
        (model, optimizer) for model in train_digits.MODELS for optimizer in train_digits.OPTIMIZERS
    }
    assert all(len(h.accuracy) == 1 and 0 <= h.accuracy[0] <= 1 for h in histories)
    assert plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "kfac" in printed and "zeroth-order" in printed
