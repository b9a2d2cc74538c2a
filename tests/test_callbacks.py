"""The end-of-sweep summary: verdict counts, the overrides every run shares said once, the swept ones as columns."""

from __future__ import annotations

from sweeps import grid, write_sweep

from gradsweep.sweep.callbacks import overrides_of, sweep_end_lines


def test_overrides_keep_commas_inside_values():
    assert overrides_of("init=xavier,model.net.sizes=[8,16],train.clip_norm=null,+tag=a") == {
        "init": "xavier", "model.net.sizes": "[8,16]", "train.clip_norm": "null", "+tag": "a"}
    assert overrides_of("") == {}


def test_the_table_shows_the_swept_keys_and_the_fixed_ones_once(tmp_path):
    write_sweep(tmp_path, grid(**{"init": ["xavier", "kaiming"], "model.depth": [2, 3], "optim.lr": [0.001]}), steps=3)
    lines = sweep_end_lines(str(tmp_path)).splitlines()
    assert lines[0].startswith(f"4 runs in {tmp_path}: ")
    assert lines[1] == "every run: optim.lr=0.001"
    header = lines[2].split()
    assert header == ["init", "model.depth", "verdict", "grad_ratio_log10", "final_loss", "diverged_step"]
    assert [line.split()[:2] for line in lines[3:]] == [["xavier", "2"], ["xavier", "3"], ["kaiming", "2"],
                                                       ["kaiming", "3"]]
    assert "optim.lr" not in "\n".join(lines[2:])


def test_a_classification_sweep_shows_its_test_accuracy(tmp_path):
    write_sweep(tmp_path, grid(**{"model.depth": [2, 3]}), steps=3,
                data={"name": "digits", "n_samples": 100, "n_test": 50})
    lines = sweep_end_lines(str(tmp_path)).splitlines()
    assert lines[1].split() == ["model.depth", "verdict", "grad_ratio_log10", "final_loss", "test_accuracy",
                                "diverged_step"]
    assert all(0.0 <= float(line.split()[4]) <= 1.0 for line in lines[2:])
