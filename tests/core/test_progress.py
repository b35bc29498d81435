"""StepBar: a progress bar over known steps, shown on stderr, or nothing at all when disabled."""

from __future__ import annotations

from toolkit.core.progress import StepBar


def test_each_advance_completes_the_previous_step_and_exit_completes_all(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # as on a terminal
    with StepBar(3, label="verify") as bar:
        bar.advance("embedding queries")
        (task,) = bar._progress.tasks
        assert task.completed == 0 and task.description == "embedding queries"
        bar.advance("embedding items")
        assert task.completed == 1 and task.description == "embedding items"
    assert task.completed == 3


def test_a_disabled_bar_shows_nothing(capsys):
    with StepBar(2, enabled=False) as bar:
        bar.advance("timing")
    assert bar._progress is None and capsys.readouterr().err == ""


def test_a_bar_writing_to_a_log_shows_nothing(capsys, monkeypatch):
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    with StepBar(2, label="training") as bar:
        bar.done()
    assert bar._progress is None and capsys.readouterr().err == ""
