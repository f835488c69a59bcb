"""bench/train_step.py at its `--tiny` shapes, without timing: for each variant (full fine-tuning, LoRA q,v with
PEFT, the TAGI stage-2 step vs its PyTorch re-creation) the step-0 losses of ours and torch agree to 1e-4, and
after one AdamW step every parameter has moved the same way on both sides (Adam's first step moves each entry
by about the learning rate, so the difference is measured in learning rates) and the step-1 losses agree too.
Also the CLI's one-line errors."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from bench import _common as C  # noqa: E402
from bench import train_step as TS  # noqa: E402

SETTINGS = TS.Settings(tiny=True, torch_threads=1)  # tiny matrices: one thread avoids OpenMP's barrier costs


@pytest.mark.parametrize("variant", TS.VARIANTS)
def test_same_loss_and_update_as_torch(variant):
    pair = TS.build(variant, SETTINGS)
    before = {name: (np.array(ours), np.array(theirs)) for name, ours, theirs in pair.param_pairs()}
    for name, (ours, theirs) in before.items():
        np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=f"{variant}: {name} differs before the step")
    assert len(before) > 10

    C.block(pair.jax_step())
    pair.torch_step()
    loss0 = float(pair.jax_step.last_loss), pair.torch_step.last_loss
    assert np.isfinite(loss0[0]) and abs(loss0[0] - loss0[1]) <= 1e-4, (variant, loss0)

    lr, moved = SETTINGS.learning_rate, 0
    for name, ours, theirs in pair.param_pairs():
        ours_step, theirs_step = np.asarray(ours) - before[name][0], theirs - before[name][1]
        assert np.max(np.abs(ours_step - theirs_step)) < 0.1 * lr, (variant, name)
        moved += int(np.any(np.abs(ours_step) > 0.5 * lr))
    assert moved > 0.5 * len(before), (variant, moved, len(before))  # trained parameters did move

    C.block(pair.jax_step())
    pair.torch_step()
    loss1 = float(pair.jax_step.last_loss), pair.torch_step.last_loss
    assert abs(loss1[0] - loss1[1]) <= 1e-4 and loss1[0] < loss0[0], (variant, loss0, loss1)


def test_report_lines():
    row = {"variant": "tagi", "jax": [1.0, 2.0, 3.0], "torch": [4.0, 5.0, 6.0], "loss0": (1.0, 1.00001),
           "load_before": "1.00 / 1.00 / 1.00", "load_after": "2.00 / 2.00 / 2.00", "peak_rss_mb": 10.0}
    text = TS.report([row])
    assert "ratio jax/torch tagi = 2.50  (torch median step time / ours; > 1 means ours is faster)" in text


@pytest.mark.parametrize("flags, message", [
    (["--variants=full,lora"], "--variants"),
    (["--head=wide"], "--head"),
    (["--repeats=0"], "--repeats"),
    (["--repeats=abc"], "invalid int value"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TS.parse_settings(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
