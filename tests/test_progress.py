"""The console while a stage runs: a progress bar on a terminal, one line per N% elsewhere, the trainers'
logged rows in the stage's `stage.log` (and on the console only with -v)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest

from alignpipe.cli import main
from alignpipe.runtime.progress import Progress
from conftest import REPO, tiny_recipe, write_yaml

LINE = re.compile(r"^\[alignpipe\] stage pretrain train: (\d+)%  (\d+)/(\d+)  ([\d.]+ step/s|- step/s)  "
                  r"(ETA \d+:\d\d|ETA -|in \d+:\d\d)$")


def _pretrain_only(tmp_path, steps: int = 40, logging_steps: int = 5):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["pretrain"]["trainer"].update(max_steps=steps, logging_steps=logging_steps)
    return write_yaml(tmp_path / "tiny.yaml", recipe)


@pytest.mark.slow
def test_off_a_terminal_a_line_per_step_of_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNPIPE_PROGRESS_EVERY", "25")
    monkeypatch.delenv("ALIGNPIPE_VERBOSE", raising=False)
    path = _pretrain_only(tmp_path)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr()
    console = (out.out + out.err).splitlines()
    lines = [line for line in console if "stage pretrain train:" in line]
    assert len(lines) == 4, console  # 25, 50, 75, 100 %
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in parsed] == [(25, 10, 40), (50, 20, 40), (75, 30, 40),
                                                                     (100, 40, 40)]
    assert parsed[-1][5].startswith("in ")  # done: how long it took instead of time left
    assert not any(line.startswith("{") or "'loss'" in line for line in console)  # no raw metric dicts
    assert len(console) < 20, console
    # the rows went to the stage's log, one per `logging_steps`
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "pretrain" / "stage.log").read_text()
            .splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_verbose_shows_the_rows_on_the_console(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNPIPE_VERBOSE", raising=False)
    path = _pretrain_only(tmp_path, steps=10)
    assert main(["-v", "run", str(path)]) == 0
    os.environ.pop("ALIGNPIPE_VERBOSE", None)  # main() set it for this process
    out = capsys.readouterr()
    rows = [line for line in (out.out + out.err).splitlines() if line.startswith('{"step"')]
    assert len(rows) == 3  # steps 5 and 10, and the closing summary


def test_a_resumed_bar_starts_where_training_resumes():
    stream = io.StringIO()
    bar = Progress("x", 100, start=60, stream=stream)
    for n in range(61, 101):
        bar.set(n)
    bar.close()
    pcts = [int(re.search(r": (\d+)%", line)[1]) for line in stream.getvalue().splitlines()]
    assert pcts == [70, 80, 90, 100]


@pytest.mark.slow
def test_on_a_terminal_a_bar_is_drawn(tmp_path):
    """The real CLI with its stderr on a pseudo-terminal: one bar, redrawn in place, ending at 40/40."""
    path = _pretrain_only(tmp_path)
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("ALIGNPIPE_VERBOSE", None)
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, drawn.decode(errors="replace")[-2000:]
    text = drawn.decode(errors="replace")
    frames = [f for f in text.split("\r") if "stage pretrain train" in f]
    assert frames and "\x1b[K" in text  # redrawn in place (carriage return, clear line)
    last = frames[-1].replace("\x1b[K", "").splitlines()[0]
    assert re.match(r"stage pretrain train  \[#{24}\]  40/40  [\d.]+ step/s  in \d+:\d\d$", last), last
    assert not re.search(r"\[alignpipe\] stage pretrain train: \d+%", text)  # no per-N% lines on a terminal
