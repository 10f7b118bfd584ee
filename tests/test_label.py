"""The label stage: pairs from the policy's own samples on training prompts only, written in the standard format
and read by a reward stage as `data: {from: label}` with lineage; labellers checked at validate time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.data.world import World, WorldConfig, judge
from alignpipe.labelling.labellers import Labeller, agreement, compare
from alignpipe.labelling.queue import LABELS_FILE, LabelLog, current, read_log
from alignpipe.pipeline.runner import run_recipe
from alignpipe.recipe.parse import load_recipe
from conftest import TINY_EVAL, TINY_WORLD, tiny_recipe, write_yaml

LABEL = {"from": "sft", "data": {"embedded": "rl_prompts"}, "labeller": "label_rules:shorter", "num_prompts": 24,
         "samples_per_prompt": 3, "eval": {"max_new_tokens": 12}}
REWARD = {"from": "sft", "data": {"mixture": [{"embedded": "pairs", "weight": 1}, {"from": "label", "weight": 1}]},
          "eval": TINY_EVAL, "trainer": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                         "warmup_steps": 0, "logging_steps": 1}}


@pytest.fixture(scope="module")
def base(tiny_base):
    """pretrain + sft of the tiny recipe (the session's), copied into each test's run folder."""
    return tiny_base


def _recipe(tmp_path, base, stages: dict, name: str = "lab") -> Path:
    for stage in ("pretrain", "sft"):
        shutil.copytree(base / stage, tmp_path / "runs" / name / stage)
    return write_yaml(tmp_path / f"{name}.yaml", tiny_recipe(tmp_path / "runs", name=name, extra_stages=stages))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_label_pairs_come_from_training_prompts_and_a_reward_stage_trains_on_them(base, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = _recipe(tmp_path, base, {"label": LABEL, "reward": REWARD})
    manifests = run_recipe(load_recipe(path))
    label_dir = tmp_path / "runs" / "lab" / "label"
    samples, queue, pairs = (_lines(label_dir / f) for f in ("samples.jsonl", "queue.jsonl", "pairs.jsonl"))
    world = World(WorldConfig(**TINY_WORLD))
    heldout = {p["prompt"] for p in world.eval_prompts()} | {t.prompt for t in world.eval_tasks}
    train = {r["prompt"][0]["content"] for r in world.rl_prompts()}
    # every raw sample is kept, 3 per prompt; every queued pair is labelled; no held-out prompt anywhere
    assert len(samples) == 3 * manifests["label"]["metrics"]["prompts"]
    assert {s["prompt"] for s in samples} <= train and not {s["prompt"] for s in samples} & heldout
    labels = current(read_log(label_dir), "label_rules:shorter")
    assert set(labels) == {it["id"] for it in queue}
    assert pairs and all(p["prompt"][0]["content"] in train for p in pairs)
    # the rule's verdicts (the shorter finished answer wins), and pairs in the standard format from them
    for item in queue:
        score = {s: (1 / (1 + len(item[s])) if item[f"{s}_ended"] else 0.0) for s in "ab"}
        assert labels[item["id"]] == compare(score["a"], score["b"])
    # a pair with an empty response is left out and counted (whether the tiny model samples one differs by CPU)
    decided = [(it["a"], it["b"]) if labels[it["id"]] == "a" else (it["b"], it["a"])
               for it in queue if labels[it["id"]] in "ab"]
    kept = [(win, lose) for win, lose in decided if win.strip() and lose.strip()]
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs} == set(kept)
    metrics = manifests["label"]["metrics"]
    assert metrics["pairs"] == len(pairs) == len(kept)
    assert metrics["pairs_left_out_empty_response"] == len(decided) - len(kept)
    assert metrics["heldout_prompts_skipped"] == 0
    # the reward stage read them (beside the world's pairs) and has the label stage in its lineage
    reward = manifests["reward"]
    assert reward["metrics"]["pairs_train"] >= len(pairs)
    assert "upstream:label" in reward["inputs"]
    assert "onpolicy_wrong_answer_accuracy" in reward["metrics"]
    assert set(reward["metrics"]["onpolicy_accuracy_by_failure_type"]) == {"wrong_answer", "style", "cut_off"}

    # lineage: the same recipe skips both; other labels (another rule) re-run the label and the reward stage
    again = run_recipe(load_recipe(path))
    assert again["reward"]["fingerprint"] == reward["fingerprint"]
    recipe = load_recipe(path, ["stages.label.labeller=label_rules:longer"])
    relabelled = run_recipe(recipe)
    assert relabelled["label"]["metrics"]["pairs_sha256"] != metrics["pairs_sha256"]
    assert relabelled["reward"]["fingerprint"] != reward["fingerprint"]
    assert relabelled["reward"]["version"] == reward["version"] + 1


@pytest.mark.slow
def test_user_prompts_never_label_a_held_out_prompt(base, tmp_path, monkeypatch):
    from alignpipe.data.split import FRACTION, prompt_key, score

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    prompts = [f"compute {a} + {b}." for a in range(10) for b in range(8)]
    held = [p for p in prompts if score(0, prompt_key({"prompt": [{"role": "user", "content": p}]})) < FRACTION]
    assert held  # the file has held-out prompts, so leaving them out is tested
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    stage = {**LABEL, "data": {"path": str(tmp_path / "prompts.jsonl")}, "num_prompts": 100, "samples_per_prompt": 2}
    path = _recipe(tmp_path, base, {"label": stage}, name="user")
    manifests = run_recipe(load_recipe(path))
    sampled = {s["prompt"] for s in _lines(tmp_path / "runs" / "user" / "label" / "samples.jsonl")}
    assert sampled == set(prompts) - set(held)
    assert manifests["label"]["metrics"]["prompts"] == len(prompts) - len(held)


def test_embedded_labeller_is_the_worlds_judge_and_agreement_is_reported():
    world = World(WorldConfig(**TINY_WORLD))
    task = world.train_tasks[0]
    right, wrong = world.good_response(task), f"The answer is {task.answer}0."
    assert judge(task.prompt, right) and not judge(task.prompt, wrong)
    from alignpipe.eval.verifiers import embedded_judge

    lab = Labeller("embedded", "", score=embedded_judge)
    items = [{"prompt": task.prompt, "a": right, "b": wrong, "a_ended": True, "b_ended": True},
             {"prompt": task.prompt, "a": wrong, "b": right, "a_ended": True, "b_ended": True},
             {"prompt": task.prompt, "a": right, "b": right + " ok", "a_ended": False, "b_ended": True},
             {"prompt": task.prompt, "a": wrong, "b": wrong + " ok", "a_ended": True, "b_ended": True}]
    assert lab.label(items) == ["a", "b", "both_bad", "both_bad"]  # a cut-off answer never passes
    got = agreement({"1": "a", "2": "b", "3": "tie"}, {"1": "a", "2": "a", "4": "b"})
    assert got["label_agreement"] == 0.5 and got["label_agreement_items"] == 2


def test_label_log_is_append_only_with_undo_and_survives_a_torn_line(tmp_path):
    log = LabelLog(tmp_path)
    log.append({"id": "1", "verdict": "a", "labeller": "human"})
    log.append({"id": "2", "verdict": "b", "labeller": "human"})
    log.append({"undo": "2", "labeller": "human"})
    log.append({"id": "3", "verdict": "tie", "labeller": "human"})
    with open(tmp_path / LABELS_FILE, "a") as fh:
        fh.write('{"id": "4", "verd')  # a kill in the middle of a write
    assert current(read_log(tmp_path), "human") == {"1": "a", "3": "tie"}
    assert len((tmp_path / LABELS_FILE).read_text().splitlines()) == 5  # nothing rewritten


BAD_LABELLERS = {
    "unknown": ({"labeller": "crowd"}, "unknown labeller 'crowd'"),
    "module": ({"labeller": "no_such_module_x:fn"}, "cannot import verifier 'no_such_module_x:fn'"),
    "function": ({"labeller": "label_rules:nope"}, "cannot import verifier 'label_rules:nope'"),
    "judge": ({"labeller": "judge:big"}, "labeller 'judge:big' names no judge of this stage"),
    "second": ({"second_labeller": "label_rules:shorter"}, "second_labeller is the labeller again"),
    "embedded_on_files": ({"labeller": "embedded", "data": {"path": "p.jsonl"}}, "the embedded judge knows only"),
    "samples": ({"samples_per_prompt": 6}, "samples_per_prompt must be 2 to 4"),
    "no_prompts": ({"data": {"embedded": "corpus"}}, "embedded 'corpus' has no prompts to label"),
}


@pytest.mark.parametrize("case", BAD_LABELLERS)
def test_bad_labeller_is_one_line_at_validate(case, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "p.jsonl").write_text('{"prompt": "compute 1 + 2."}\n{"prompt": "compute 2 + 2."}\n')
    change, expected = BAD_LABELLERS[case]
    stages = {"label": {**LABEL, **change}, "reward": REWARD}
    path = write_yaml(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "runs", name="bad", extra_stages=stages))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[alignpipe]")]
    assert len(lines) == 1 and expected in lines[0] and "fix:" in lines[0] and str(path) in lines[0], lines


def test_data_from_a_stage_that_is_not_a_label_stage_is_refused(tmp_path, capsys):
    stages = {"reward": {**REWARD, "data": {"from": "sft"}}}
    path = write_yaml(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "runs", name="bad", extra_stages=stages))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "`from: sft` names a sft stage" in err and "fix:" in err


# --- the labelling page, in a real browser ---------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _browser():
    """Headless Chromium through Selenium; skipped when missing, except in CI (CI=true), where it must run."""
    import os

    why = None
    try:
        from selenium import webdriver
    except ImportError:
        why = "selenium is not installed (pip install 'alignpipe[test]')"
    if why is None and not (CHROMIUM and CHROMEDRIVER):
        why = "chromium / chromedriver are not installed (apt-get install chromium chromium-driver)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the labelling page test cannot run in CI: {why}")
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _start_server(folder: Path, env: dict):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "label", str(folder), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    assert "open http://127.0.0.1:" in line, line
    return proc, line.rsplit("open ", 1)[1].strip()


def _wait(predicate, what: str, timeout: float = 240.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if (value := predicate()):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_labelling_page_in_a_browser_survives_a_killed_server_and_feeds_a_reward_stage(base, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from selenium.webdriver.common.by import By

    driver = _browser()
    stage = {**LABEL, "labeller": "human", "num_prompts": 4, "samples_per_prompt": 2, "poll_s": 0.2}
    path = _recipe(tmp_path, base, {"label": stage, "reward": REWARD}, name="people")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(path)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "people" / "label"
    server = None
    try:
        _wait(lambda: (folder / "queue.jsonl").is_file(), "the label stage's queue")
        total = len(_lines(folder / "queue.jsonl"))
        assert total >= 3, "the test needs a queue it can stop in the middle of"
        server, url = _start_server(folder, env)
        driver.get(url)
        progress = lambda: driver.find_element(By.ID, "progress").text  # noqa: E731
        _wait(lambda: progress() == f"0 / {total} labelled", "the page")
        first = driver.find_element(By.ID, "a").text
        driver.find_element(By.ID, "btn-a").click()  # by click
        _wait(lambda: progress() == f"1 / {total} labelled", "the first label")
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("b")  # by key
        _wait(lambda: progress() == f"2 / {total} labelled", "the second label")
        body.send_keys("u")  # undo the second
        _wait(lambda: progress() == f"1 / {total} labelled", "the undo")
        body.send_keys("x")
        _wait(lambda: progress() == f"2 / {total} labelled", "the label after the undo")
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("ALIGNPIPE_SCREENSHOT"):  # docs/labelling-page.png is made this way
            driver.save_screenshot(os.environ["ALIGNPIPE_SCREENSHOT"])
        server.send_signal(signal.SIGKILL)  # mid-queue
        server.wait()
        queue = _lines(folder / "queue.jsonl")
        assert current(read_log(folder), "human") == {queue[0]["id"]: "a", queue[1]["id"]: "both_bad"}
        assert queue[0]["a"] == first
        assert run.poll() is None  # the stage still waits for the rest

        server, url = _start_server(folder, env)  # restarted: the labels are there and the queue resumes
        driver.get(url)
        _wait(lambda: progress() == f"2 / {total} labelled", "the resumed page")
        assert driver.find_element(By.ID, "prompt").text == queue[2]["prompt"].strip()
        for n in range(2, total):
            driver.find_element(By.TAG_NAME, "body").send_keys("a")
            _wait(lambda: progress() == f"{n + 1} / {total} labelled", f"label {n + 1}")
        _wait(lambda: driver.find_element(By.ID, "done").is_displayed(), "the end of the queue")
        assert run.wait(timeout=600) == 0, run.stderr.read()[-3000:]
    finally:
        driver.quit()
        for proc in (server, run):
            if proc is not None and proc.poll() is None:
                proc.kill()
    label = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert label["labelled"] == total and label["verdicts"]["both_bad"] == 1 and label["pairs"] == total - 1
    reward = json.loads((folder.parent / "reward" / "manifest.json").read_text())
    assert reward["status"] == "complete" and "upstream:label" in reward["inputs"]
    assert reward["metrics"]["pairs_train"] >= total - 1


@pytest.mark.slow
def test_judge_model_labeller_over_an_endpoint_and_agreement_with_a_rule(base, tmp_path, monkeypatch):
    """An OpenAI-compatible endpoint on loopback that prefers the shorter answer labels the queue (asked in both
    orders); the opposite rule as second labeller agrees on no winner, the same rule on every one."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
            a, b = re.search(r"Answer A: (.*)\n\nAnswer B: (.*)\n\nReply", text, re.S).groups()
            reply = "TIE" if len(a) == len(b) else "A" if len(a) < len(b) else "B"
            body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    judges = {"ep": {"endpoint": f"http://127.0.0.1:{srv.server_address[1]}/v1", "model": "judge"}}
    common = {**LABEL, "labeller": "judge:ep", "num_prompts": 10, "samples_per_prompt": 2}
    stages = {"label": {**common, "second_labeller": "label_rules:longer", "eval": {**LABEL["eval"], "judges": judges}},
              "label_same": {**common, "kind": "label", "second_labeller": "label_rules:shorter",
                             "eval": {**LABEL["eval"], "judges": judges}}}
    try:
        manifests = run_recipe(load_recipe(_recipe(tmp_path, base, stages, name="judged")))
    finally:
        srv.shutdown()
    queue = _lines(tmp_path / "runs" / "judged" / "label" / "queue.jsonl")
    labels = current(read_log(tmp_path / "runs" / "judged" / "label"), "judge:ep")
    assert labels == {it["id"]: compare(-len(it["a"]), -len(it["b"])) if len(it["a"]) != len(it["b"]) else "tie"
                      for it in queue}
    opposite, same = manifests["label"]["metrics"], manifests["label_same"]["metrics"]

    def rule(item, sign):  # label_rules: longer (sign 1) / shorter (sign -1); a cut-off answer scores 0
        score = {s: (float(1 + len(item[s])) ** sign if item[f"{s}_ended"] else 0.0) for s in "ab"}
        return compare(score["a"], score["b"])

    for metrics, sign in ((opposite, 1), (same, -1)):
        assert metrics["label_agreement_items"] == len(queue)
        assert metrics["label_agreement"] == sum(labels[it["id"]] == rule(it, sign) for it in queue) / len(queue)
    # where both answers ended, the opposite rule never names the judge's winner and the same rule always does
    ended = [it for it in queue if it["a_ended"] and it["b_ended"] and len(it["a"]) != len(it["b"])]
    assert all(rule(it, 1) != labels[it["id"]] == rule(it, -1) for it in ended)


def test_onpolicy_recipe_reuses_the_default_pretrain_and_sft_and_chains_two_rounds():
    """recipes/onpolicy.yaml: its pretrain and sft equal default.yaml's (copied runs are skipped, not re-trained);
    round two labels the round-one policy and its reward model reads both rounds' labels."""
    from alignpipe.recipe.parse import to_plain

    repo = Path(__file__).resolve().parents[1]
    default, onpolicy = (load_recipe(repo / "recipes" / f) for f in ("default.yaml", "onpolicy.yaml"))
    for attr in ("seed", "model", "chat_template", "world"):
        assert to_plain(getattr(onpolicy, attr)) == to_plain(getattr(default, attr)), attr
    for stage in ("pretrain", "sft"):
        assert to_plain(onpolicy.stages[stage]) == to_plain(default.stages[stage]), stage
    assert onpolicy.stages["label_2"].from_ == "ppo" and onpolicy.stages["ppo"].trainer["entropy_coef"] == 0
    assert set(onpolicy.upstream("reward_2")) == {"sft", "label", "label_2"}
    assert onpolicy.order(["reward_2"]) == ["pretrain", "sft", "label", "reward", "ppo", "label_2", "reward_2"]


def test_page_off_loopback_needs_the_flag_and_every_request_the_token(tmp_path):
    import threading
    import urllib.error
    import urllib.request
    from http.server import ThreadingHTTPServer

    from alignpipe.errors import AlignpipeError
    from alignpipe.labelling.queue import write_queue
    from alignpipe.labelling.server import Labelling, make_handler, serve
    from alignpipe.local_http import Rules

    write_queue(tmp_path, [{"id": "0-0-1", "prompt": "compute 1 + 2.", "a": "The answer is 3.", "b": "3"}])
    with pytest.raises(AlignpipeError, match="--allow-remote"):
        serve(tmp_path, host="0.0.0.0")
    app = Labelling(tmp_path)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(app, Rules("s3cret", hosts=None)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"

    def post(path, body, headers):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    try:
        for path in ("/", "/api/state"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 403
        with pytest.raises(urllib.error.HTTPError) as err:
            post("/api/label", {"id": "0-0-1", "verdict": "a"}, {"X-Alignpipe-Token": "wrong"})
        assert err.value.code == 403 and not (tmp_path / LABELS_FILE).exists()
        assert b"Which answer is better" in urllib.request.urlopen(base + "/?token=s3cret", timeout=10).read()
        state = post("/api/label", {"id": app.handle_of["0-0-1"], "verdict": "a"}, {"X-Alignpipe-Token": "s3cret"})
        assert state["labelled"] == 1 and state["item"] is None
    finally:
        srv.shutdown()
    assert current(read_log(tmp_path), "human") == {"0-0-1": "a"}


@pytest.mark.slow
def test_cut_off_pairs_false_leaves_out_pairs_whose_rejected_response_was_cut_off(base, tmp_path, monkeypatch):
    """`cut_off_pairs: false`: no pair rejects a response that never ended its turn; the left-out pairs are counted,
    and the pairs kept are exactly the default's pairs less those."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = _recipe(tmp_path, base, {"label": {**LABEL, "cut_off_pairs": False}}, name="ended")
    metrics = run_recipe(load_recipe(path))["label"]["metrics"]
    label_dir = tmp_path / "runs" / "ended" / "label"
    queue, pairs = _lines(label_dir / "queue.jsonl"), _lines(label_dir / "pairs.jsonl")
    labels = current(read_log(label_dir), "label_rules:shorter")
    # pairs with an empty response are left out before the cut-off rule (counted apart; they differ by CPU)
    decided = [(it, labels[it["id"]]) for it in queue if labels[it["id"]] in "ab" and it["a"].strip() and it["b"].strip()]
    loser = [("b" if v == "a" else "a") for _, v in decided]
    cut = sum(not it[f"{s}_ended"] for (it, _), s in zip(decided, loser))
    assert cut > 0  # the rule rejects cut-off answers, so leaving them out is tested
    assert metrics["pairs_left_out_cut_off"] == cut and metrics["pairs"] == len(pairs) == len(decided) - cut
    ended = {it[s] for (it, _), s in zip(decided, loser) if it[f"{s}_ended"]}
    assert {p["rejected"][0]["content"] for p in pairs} <= ended


def test_cut_off_pairs_at_its_default_keeps_the_fingerprint_of_label_stages_run_before_it_existed():
    from alignpipe.pipeline.plan import result_config

    before = {"labeller": "embedded", "samples_per_prompt": 4}
    assert result_config({**before, "cut_off_pairs": True}) == result_config(before)
    assert result_config({**before, "cut_off_pairs": False}) != result_config(before)


# --- the labelling page's doors: token, Host, Origin, body, ids, undo ---------------------------------------

QUEUE = [{"id": f"0-{i}-{i + 1}", "prompt": f"compute {i} + 1.", "a": f"The answer is {i + 1}.", "b": "no"}
         for i in range(3)]


def _serve_queue(folder: Path, *extra: str):
    """`alignpipe label` on a three-item queue, in its own process; (process, the printed address)."""
    import os
    import subprocess
    import sys

    from alignpipe.labelling.queue import write_queue

    write_queue(folder, QUEUE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "label", str(folder), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    assert "open http://" in line, line + proc.stdout.read()
    return proc, line.rsplit("open ", 1)[1].strip()


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one request; no exception for 4xx."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _raw_request(port: int, head: str, body: bytes = b"") -> int:
    """The status of a request written by hand (a Host or a Content-Length urllib would not send)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_page_on_loopback_refuses_other_sites_other_hosts_and_calls_without_its_token(tmp_path):
    """What a web page open in the labeller's browser could do to the default 127.0.0.1 server: a cross-site
    POST (text/plain, no preflight), a DNS-rebound read (its own Host), a guessed item id. All refused; the
    printed address carries the token that the page's own calls need."""
    from urllib.parse import parse_qs, urlparse

    proc, url = _serve_queue(tmp_path)
    try:
        parsed = urlparse(url)
        base, port = f"{parsed.scheme}://{parsed.netloc}", parsed.port
        token = parse_qs(parsed.query).get("token", [""])[0]
        assert token, f"the printed address carries no token: {url}"
        # a cross-site form/fetch POST: text/plain from another origin, with a queue id (guessable)
        for path in ("/api/label", "/api/undo"):
            status, _ = _request(base + path, "POST", json.dumps({"id": QUEUE[0]["id"], "verdict": "a"}).encode(),
                                 {"Content-Type": "text/plain", "Origin": "http://evil.example"})
            assert status in (400, 403, 415), (path, status)
        assert not (tmp_path / LABELS_FILE).exists()
        # the same from another origin with the token and JSON still refused (a leaked token is not enough)
        status, _ = _request(base + "/api/label?token=" + token, "POST", b'{"id": "x", "verdict": "a"}',
                             {"Content-Type": "application/json", "Origin": "http://evil.example"})
        assert status == 403
        # DNS rebinding: the browser sends the rebound name as Host
        assert _raw_request(port, f"GET /api/state?token={token} HTTP/1.1\r\nHost: evil.example:{port}\r\n"
                                  "Connection: close\r\n") == 421
        assert _request(base + "/api/state")[0] == 403  # no token
        status, state = _request(base + "/api/state?token=" + token)
        assert status == 200 and state["item"]["prompt"] == QUEUE[0]["prompt"]
        assert state["item"]["id"] not in {q["id"] for q in QUEUE} and len(state["item"]["id"]) >= 16
        # the queue's own id is not accepted in place of the page's handle
        headers = {"Content-Type": "application/json", "X-Alignpipe-Token": token}
        assert _request(base + "/api/label", "POST", json.dumps({"id": QUEUE[0]["id"], "verdict": "a"}).encode(),
                        headers)[0] == 400
        # bodies: not an object, too large, a negative length: one short answer each, the server lives on
        assert _request(base + "/api/label", "POST", b"[1, 2]", headers)[0] == 400
        assert _raw_request(port, f"POST /api/label?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 200000\r\n"
                                  "Connection: close\r\n", b'{"id": 1}') == 413
        assert _raw_request(port, f"POST /api/label?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  "Content-Type: application/json\r\nContent-Length: -1\r\n"
                                  "Connection: close\r\n", b'{"id": 1}') == 411
        assert _request(base + "/api/label", "POST", b"[" * 10_000, headers)[0] == 400
        status, state = _request(base + "/api/label", "POST",
                                 json.dumps({"id": state["item"]["id"], "verdict": "b"}).encode(), headers)
        assert status == 200 and state["labelled"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert current(read_log(tmp_path), "human") == {QUEUE[0]["id"]: "b"}


def test_undo_withdraws_the_callers_own_latest_verdict(tmp_path):
    """Two pages (clients) on one queue: each undo withdraws that page's latest standing verdict, also after
    it labelled an item twice; another page's verdicts stand."""
    from urllib.parse import parse_qs, urlparse

    proc, url = _serve_queue(tmp_path)
    parsed = urlparse(url)
    base, token = f"{parsed.scheme}://{parsed.netloc}", parse_qs(parsed.query).get("token", [""])[0]

    def call(path: str, client: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json", "X-Alignpipe-Token": token, "X-Alignpipe-Client": client}
        status, state = _request(f"{base}{path}?token={token}", "POST" if body is not None else "GET",
                                 json.dumps(body).encode() if body is not None else None, headers)
        assert status == 200, state
        return state

    try:
        first = call("/api/state", "one")["item"]["id"]
        call("/api/label", "one", {"id": first, "verdict": "a"})
        second = call("/api/state", "two")["item"]["id"]
        call("/api/label", "two", {"id": second, "verdict": "b"})
        call("/api/label", "one", {"id": first, "verdict": "tie"})  # page one labels its item again
        call("/api/undo", "one", {})  # withdraws "tie": its first verdict stands again, page two's too
        assert current(read_log(tmp_path), "human") == {QUEUE[0]["id"]: "a", QUEUE[1]["id"]: "b"}
        call("/api/undo", "one", {})  # and then its first verdict
        assert current(read_log(tmp_path), "human") == {QUEUE[1]["id"]: "b"}
        call("/api/undo", "one", {})  # nothing of page one's is left: page two's verdict stands
        assert current(read_log(tmp_path), "human") == {QUEUE[1]["id"]: "b"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_torn_last_line_does_not_swallow_the_next_label(tmp_path):
    """A kill mid-write leaves a line without its newline; the next verdict (answered 200) starts a line of
    its own instead of being glued onto the torn one and lost."""
    log = LabelLog(tmp_path)
    log.append({"id": "1", "verdict": "a", "labeller": "human"})
    with open(tmp_path / LABELS_FILE, "a") as fh:
        fh.write('{"id": "2", "verd')
    log.append({"id": "3", "verdict": "b", "labeller": "human"})
    log.extend([{"id": "4", "verdict": "tie", "labeller": "human"}])
    assert current(read_log(tmp_path), "human") == {"1": "a", "3": "b", "4": "tie"}


@pytest.mark.parametrize("case", ["ipv6", "port_in_use"])
def test_label_host_and_port_problems_are_one_line(case, tmp_path):
    """`--host ::1` listens on IPv6 loopback; a port in use is one line and exit 2, not a traceback."""
    import socket
    import subprocess
    import sys
    import os

    from alignpipe.labelling.queue import write_queue

    write_queue(tmp_path, QUEUE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    if case == "ipv6":
        if not socket.has_ipv6:
            pytest.skip("no IPv6 here")
        proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "label", str(tmp_path), "--host", "::1",
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            line = proc.stdout.readline()
            if "Cannot assign requested address" in line or "cannot listen" in line:
                pytest.skip("IPv6 loopback is not configured here")
            assert "open http://[::1]:" in line, line + proc.stdout.read()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        return
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = subprocess.run([sys.executable, "-m", "alignpipe.cli", "label", str(tmp_path), "--port",
                               str(busy.getsockname()[1])], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0] and "--port" in lines[0], lines
