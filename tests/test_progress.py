"""Progress off a terminal: plain lines at an interval and one at the end, never a carriage return."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from hf_ibproj import progress


def test_off_a_terminal_a_phase_prints_a_line_every_interval_and_one_at_its_end(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    bar = progress.progress_bar(total=10, desc="pretrain", unit="step")
    for _ in range(10):
        now[0] += 10.0  # a step of 10 s
        bar.update(1)
    now[0] += 10.0
    bar.set_postfix(loss="1.234")
    bar.write("epoch 1: kNN top-1 50.00%")
    bar.close()
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    # a line every 30 s (at steps 3, 6 and 9), then the closing one
    assert lines[:3] == ["pretrain: 3/10 step, 30 s, 0.10 step/s, 70 s left",
                         "pretrain: 6/10 step, 60 s, 0.10 step/s, 40 s left",
                         "pretrain: 9/10 step, 90 s, 0.10 step/s, 10 s left"]
    assert lines[3:] == ["epoch 1: kNN top-1 50.00%", "pretrain: 10/10 step done, 110 s, 0.09 step/s, loss=1.234"]


def test_a_transient_or_disabled_phase_prints_nothing_and_a_terminal_gets_tqdm(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    for item in progress.progress_bar(range(3), desc="features", leave=False):
        pass
    quiet = progress.progress_bar(total=3, desc="pretrain", disable=True)
    quiet.update(3)
    quiet.write("not the main process")
    quiet.close()
    assert capsys.readouterr().out == ""

    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    assert not progress.on_terminal()
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bar = progress.progress_bar(total=3, file=io.StringIO())
    assert isinstance(bar, tqdm)
    bar.close()
