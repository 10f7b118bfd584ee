"""`alignpipe ui` (issue 41): the runs page lists a finished run and its lineage; a stage's progress updates on
the page while it trains; the samples view filters to judge disagreements; compare shows two stages; and the
doors of every local page (a token on every request, Host and Origin checked, loopback unless told otherwise).
The page tests drive headless Chromium (tests/browser.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from alignpipe.runtime.progress import PROGRESS_FILE, Progress, stage_log
from browser import browser, wait
from conftest import REPO, copy_base, tiny_recipe, write_yaml

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(Path(__file__).parent),
                                                    os.environ.get("PYTHONPATH", "")])}


def start_ui(runs_dir: Path, *extra: str):
    """`alignpipe ui RUNS_DIR --port 0 ...` in a process of its own; returns it and the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "ui", str(runs_dir), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    line = proc.stdout.readline()
    assert " open http://" in line, line + proc.stdout.read()
    return proc, line.rsplit("open ", 1)[1].strip()


@pytest.fixture
def ui():
    """Starts `alignpipe ui` servers for a test and stops them after it."""
    procs = []

    def start(runs_dir: Path, *extra: str) -> str:
        proc, url = start_ui(runs_dir, *extra)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def driver():
    d = browser("the alignpipe ui test")
    yield d
    d.quit()


# --- a run folder written by hand (no training): two policy stages with known samples ---------------------

PROMPTS = ["compute 2 + 3.", "compute 7 - 4.", "reverse the word cat.", "what is the product of 5 and 3?"]


def _sample(i: int, judge: bool, parent_judge: bool, reward: float, parent_reward: float, ended: bool = True) -> dict:
    return {"prompt": PROMPTS[i // 2], "response": f"answer {i}", "ended": ended, "tokens": 3 + i,
            "parent_response": f"parent answer {i}", "parent_ended": True, "judge": judge,
            "parent_judge": parent_judge, "reward": reward, "parent_reward": parent_reward}


# By hand: rows 1 and 4 are where the judge and the reward model prefer different responses (row 1: the judge
# the parent's, the reward model this stage's; row 4 the other way round); row 6 is cut off; rows 0, 1, 2, 3,
# 5, 6 and 7 fail the judge.
SAMPLES = [_sample(0, False, False, 0.2, 0.1), _sample(1, False, True, 0.9, 0.1),
           _sample(2, False, False, 0.1, 0.1), _sample(3, False, False, -0.3, 0.2),
           _sample(4, True, False, -0.5, 0.4), _sample(5, False, False, 0.3, 0.3),
           _sample(6, False, False, 0.0, 0.5, ended=False), _sample(7, False, False, 0.4, 0.4)]
DISAGREE = {"answer 1", "answer 4"}


def _stage(run: Path, name: str, kind: str, metrics: dict, samples=None, parent=None, lineage=()) -> Path:
    d = run / name
    d.mkdir(parents=True)
    manifest = {"stage": name, "kind": kind, "status": "complete", "schema": 1, "version": 1, "metrics": metrics,
                "parent": {"stage": parent} if parent else None, "lineage": list(lineage), "wall_time_s": 1.0,
                "started_at": f"2026-01-01T00:00:0{len(lineage)}", "resolved_config": {"kind": kind}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    if samples is not None:
        (d / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return d


@pytest.fixture
def hand_run(tmp_path) -> Path:
    runs = tmp_path / "runs"
    judged = {"judge_pass_rate": 0.125, "judge_passed": 1, "judge_total": 8, "eot_rate": 1.0}
    parents = [{"prompt": s["prompt"], "response": s["parent_response"], "ended": True, "tokens": 4,
                "judge": s["parent_judge"]} for s in SAMPLES]
    _stage(runs / "hand", "sft", "sft", judged, parents)
    _stage(runs / "hand", "dpo", "dpo", {**judged, "eot_rate": 0.875, "reward_stage": "rm"}, SAMPLES, parent="sft",
           lineage=["sft"])
    return runs


def test_samples_view_filters_to_judge_disagreements(hand_run, ui, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = ui(hand_run)
    driver.get(url + "#/samples/hand/dpo")
    count = lambda: driver.find_element(By.ID, "sample-count").text  # noqa: E731
    shown = lambda: {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#samples .resp.this")}  # noqa: E731
    wait(lambda: count() == "8 of 8 samples", "the samples view")
    driver.find_element(By.ID, "f-disagree").click()
    wait(lambda: count() == "2 of 8 samples", "the disagreement filter")
    assert shown() == DISAGREE
    parents = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#samples .resp.parent")}
    assert parents == {"parent answer 1", "parent answer 4"}  # each beside its parent's sample of the prompt
    driver.find_element(By.ID, "f-disagree").click()
    driver.find_element(By.ID, "f-cut").click()
    wait(lambda: count() == "1 of 8 samples", "the cut-off filter")
    assert shown() == {"answer 6"}
    driver.find_element(By.ID, "f-cut").click()
    driver.find_element(By.ID, "f-failed").click()
    wait(lambda: count() == "7 of 8 samples", "the failed filter")
    Select(driver.find_element(By.ID, "f-kind")).select_by_value("reverse")
    wait(lambda: count() == "1 of 8 samples", "the task-kind filter")
    assert shown() == {"answer 5"}  # row 4, the other `reverse` one, passes the judge


def test_compare_shows_two_stages_head_to_head(hand_run, ui, driver):
    from selenium.webdriver.common.by import By

    driver.get(ui(hand_run) + "#/compare/hand/sft,hand/dpo")
    entries = wait(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#comparison .entry")], "compare")
    assert entries == ["sft", "dpo"]
    # by hand: the k-th samples of a prompt paired; the judge prefers dpo's on row 4, sft's on row 1, else a tie
    rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#comparison .group tr")]
    assert any(r.startswith("sft vs dpo judge 1/6/1 50.0%") for r in rows), rows
    assert any(r.startswith("judge_pass_rate") for r in rows)
    notes = driver.find_element(By.ID, "comparison").text
    assert "reward model scores come from different reward stages" in notes  # only dpo was scored by `rm`


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"{}") if "api" in url else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_every_request_needs_the_token_and_names_this_server(hand_run, ui):
    url = ui(hand_run)
    base, token = url.split("/?token=")
    port = base.rsplit(":", 1)[1]
    assert _get(f"{base}/api/runs")[0] == 403  # no token, on loopback too
    assert _get(f"{base}/api/runs?token=wrong")[0] == 403
    status, runs = _get(f"{base}/api/runs?token={token}")
    assert status == 200 and [r["name"] for r in runs["runs"]] == ["hand"]
    assert _get(f"{base}/?token={token}")[0] == 200
    assert _get(f"{base}/api/runs", {"X-Alignpipe-Token": token})[0] == 200
    # a page on another site: its Origin, or its own name as Host (DNS rebinding)
    assert _get(f"{base}/api/runs?token={token}", {"Origin": "http://evil.example"})[0] == 403
    assert _get(f"{base}/api/runs?token={token}", {"Host": f"evil.example:{port}"})[0] == 421
    # names are looked up among the runs found, never joined onto a path
    assert _get(f"{base}/api/stage?run=..&stage=hand&token={token}")[0] == 404
    assert _get(f"{base}/api/samples?run=hand&stage=../../etc&token={token}")[0] == 404
    # a body must be JSON (a cross-site form cannot send it)
    post = urllib.request.Request(f"{base}/api/labelling?token={token}", data=b"run=hand", method="POST",
                                  headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 415


def test_off_loopback_it_needs_the_flag_and_every_request_the_token(hand_run, ui):
    out = subprocess.run([sys.executable, "-m", "alignpipe.cli", "ui", str(hand_run), "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, env=ENV, timeout=60)
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[alignpipe]")]
    assert out.returncode == 2 and len(lines) == 1 and "--allow-remote" in lines[0], out.stderr
    url = ui(hand_run, "--host", "0.0.0.0", "--allow-remote")
    base, token = url.split("/?token=")
    port = base.rsplit(":", 1)[1]
    here = f"http://127.0.0.1:{port}"
    other = {"Host": f"192.0.2.7:{port}"}  # as a request from another machine names this one
    status, answer = _get(f"{here}/api/runs", other)
    assert status == 403 and "token" in answer["error"]
    assert _get(f"{here}/api/runs?token={token}", other)[0] == 200
    assert _get(f"{here}/api/runs?token={token}", {**other, "Origin": "http://evil.example"})[0] == 403


def test_the_labelling_page_of_a_human_label_stage_opens_from_the_run(hand_run, ui, driver):
    from selenium.webdriver.common.by import By

    label = _stage(hand_run / "hand", "label", "label", {}, parent="sft", lineage=["sft"])
    manifest = json.loads((label / "manifest.json").read_text())
    manifest.update(status="running", resolved_config={"labeller": "human", "min_labels": 2})
    (label / "manifest.json").write_text(json.dumps(manifest))
    items = [{"id": str(i), "prompt": f"compute {i} + 1.", "a": f"The answer is {i + 1}.", "b": "no idea"}
             for i in range(3)]
    (label / "queue.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    driver.get(ui(hand_run) + "#/stage/hand/label")
    wait(lambda: driver.find_element(By.ID, "open-labelling"), "the labelling button").click()
    wait(lambda: len(driver.window_handles) == 2, "the labelling page's tab")
    driver.switch_to.window(driver.window_handles[1])
    assert wait(lambda: driver.find_element(By.ID, "progress").text, "the labelling page") == "0 / 3 labelled (needed: 2)"
    driver.find_element(By.ID, "btn-a").click()  # the one thing the UI lets a page write: a label
    wait(lambda: driver.find_element(By.ID, "progress").text.startswith("1 / 3"), "the label")
    assert [json.loads(line)["verdict"] for line in (label / "labels.jsonl").read_text().splitlines()] == ["a"]


def test_a_bar_publishes_the_stage_progress_for_the_page(tmp_path):
    with stage_log(tmp_path / "stage" / "stage.log"):
        bar = Progress("stage x train", 40, stream=io.StringIO(), unit="step")
        bar.update()
        first = json.loads((tmp_path / "stage" / PROGRESS_FILE).read_text())
        for _ in range(39):
            bar.update()
        bar.close()
    last = json.loads((tmp_path / "stage" / PROGRESS_FILE).read_text())
    assert (first["n"], first["total"], first["unit"]) == (1, 40, "step") and first["pid"] == os.getpid()
    assert last["n"] == 40  # the end is always written, however soon after the last
    outside = Progress("no stage", 3, stream=io.StringIO())
    outside.update(3)
    assert not (Path.cwd() / PROGRESS_FILE).exists()  # no stage running: nothing written anywhere


# --- real runs of the tiny recipe ----------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_page_lists_a_finished_tiny_run_and_its_lineage(tiny_base, tmp_path, ui, driver):
    from selenium.webdriver.common.by import By

    copy_base(tiny_base, tmp_path / "runs")
    driver.get(ui(tmp_path / "runs"))
    node = lambda s: driver.find_element(By.CSS_SELECTOR, f'section[data-run="tiny"] g.node[data-stage="{s}"]')  # noqa: E731
    wait(lambda: node("sft"), "the tiny run's lineage")
    assert node("pretrain").get_attribute("data-status") == "complete"
    assert node("sft").get_attribute("data-status") == "complete"
    assert node("sft").get_attribute("data-parent") == "pretrain"
    assert driver.find_elements(By.CSS_SELECTOR, 'path.edge[data-from="pretrain"][data-to="sft"]')
    eval_loss = json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())["metrics"]["eval_loss"]
    assert f"eval_loss {eval_loss:.3f}" in node("sft").text  # the headline metric, from the manifest
    node("sft").click()
    wait(lambda: driver.find_element(By.TAG_NAME, "h2").text.startswith("tiny / sft"), "the stage page")
    panels = wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#curves .curve canvas"), "the curves")
    assert panels and "loss" in {e.get_attribute("data-series") for e in
                                 driver.find_elements(By.CSS_SELECTOR, "#curves .curve")}
    assert "pretrain → sft" in driver.find_element(By.TAG_NAME, "main").text
    # compare, from the runs page: check two stages, then the button
    driver.find_element(By.LINK_TEXT, "all runs").click()
    for stage in ("pretrain", "sft"):
        wait(lambda: driver.find_element(By.CSS_SELECTOR, f'input.pick[value="tiny/{stage}"]'), "the checkboxes").click()
    driver.find_element(By.ID, "compare-picked").click()
    entries = wait(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#comparison .entry")], "compare")
    assert entries == ["pretrain", "sft"]
    assert driver.find_elements(By.CSS_SELECTOR, '#comparison .curve[data-series="loss"] canvas')  # overlaid


@pytest.mark.slow
def test_a_stage_progress_updates_on_the_page_while_it_trains(tiny_base, tmp_path, ui, driver):
    from selenium.webdriver.common.by import By

    copy_base(tiny_base, tmp_path / "runs")
    longer = {"kind": "sft", "from": "sft", "data": {"embedded": "sft"}, "eval": {"enabled": False},
              "trainer": {"max_steps": 600, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                          "warmup_steps": 0, "logging_steps": 100}}
    path = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"more": longer}))
    url = ui(tmp_path / "runs")
    run = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(path)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        driver.get(url)
        status = lambda: driver.find_element(  # noqa: E731
            By.CSS_SELECTOR, 'g.node[data-stage="more"]').get_attribute("data-status")
        wait(lambda: status() == "running", "the stage running on the runs page", timeout=300)
        driver.get(url + "#/stage/tiny/more")
        seen = set()

        def finished() -> bool:
            box = driver.find_element(By.ID, "progress")
            text = box.text
            if box.get_attribute("data-status") == "running" and " train: " in text:
                seen.add(text.split(" train: ", 1)[1].split(" step")[0])  # "n/total"
            return box.get_attribute("data-status") == "complete"

        wait(finished, "the stage to finish on the page", timeout=600, every=0.3)
        assert run.wait(timeout=300) == 0, run.stderr.read()
    finally:
        run.kill()
    counts = sorted(int(s.split("/")[0]) for s in seen)
    assert len(counts) >= 2 and counts[0] < 600, seen  # the page showed the count move while it trained
    assert all(s.endswith("/600") for s in seen)
    assert "complete" in driver.find_element(By.CSS_SELECTOR, "h2 .badge").text
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#curves .curve canvas"), "the finished stage's curves")


@pytest.mark.slow
def test_two_stages_answer_one_message_side_by_side_streamed(tiny_base, tmp_path, ui, driver):
    import threading

    from selenium.webdriver.common.by import By

    from alignpipe.serving import engine

    run = copy_base(tiny_base, tmp_path / "runs")
    url = ui(tmp_path / "runs")
    driver.get(url + "#/chat/tiny/pretrain,tiny/sft")
    wait(lambda: driver.find_element(By.ID, "chat-input"), "the chat view").send_keys("compute 2 + 3.")
    driver.find_element(By.ID, "chat-send").click()
    wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".reply[data-done]")) == 2, "both answers", timeout=300)
    shown = {c.get_attribute("data-target"): c.find_element(By.CSS_SELECTOR, ".reply").text
             for c in driver.find_elements(By.CSS_SELECTOR, ".chat-column")}

    def served_answer(stage: str) -> str:  # what `alignpipe serve` answers greedily
        served = engine.load_served(run / stage)
        job = engine.Job(messages=[{"role": "user", "content": "compute 2 + 3."}], prompt=None, max_tokens=None,
                         temperature=0.0, top_p=1.0, stop=[], seed=0)
        ids = engine.prompt_ids(served, job)
        budget = engine.token_budget(served, len(ids), None)
        tokens, reply = engine.start(served, job, ids, budget, threading.Event()), []
        while (t := tokens.get()) is not engine.DONE:
            reply.append(t)
        return engine.finish(served, job, len(ids), reply, budget).text

    expected = {f"tiny/{s}": served_answer(s) for s in ("pretrain", "sft")}
    assert shown == {k: v.strip() for k, v in expected.items()}  # the page shows text as the browser lays it out
    # streamed: the answer comes in pieces that join to the whole, then a last line saying it is done
    base, token = url.split("/?token=")
    body = json.dumps({"run": "tiny", "stage": "sft", "messages": [{"role": "user", "content": "compute 2 + 3."}],
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{base}/api/chat", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Alignpipe-Token": token})
    with urllib.request.urlopen(request, timeout=120) as answer:
        lines = [json.loads(line) for line in answer.read().decode().splitlines()]
    pieces, last = lines[:-1], lines[-1]
    assert len(pieces) >= 2 and last["done"] and "".join(p["text"] for p in pieces) == last["text"] == expected["tiny/sft"]
