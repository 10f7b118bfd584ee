"""Pairwise judges: a tiny local judge model and an OpenAI-compatible endpoint served on loopback by the
test itself. Both orders are asked, answers parsed (an unparseable one counted as such, not as a tie),
position consistency reported; the endpoint's API key, read from the environment, appears nowhere in the
run folder. A judge that fails leaves the stage complete, and `alignpipe eval` re-runs the evaluation.
`validate` refuses a missing judge model, a verifier that does not import and an endpoint that does not
answer, in one line each."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.runfolder.manifests import read_manifest
from conftest import write_yaml
from test_eval_user_data import TRAINER, write_files

KEY_ENV, KEY = "ALIGNPIPE_TEST_JUDGE_KEY", "sk-test-7f3a9c41d2e8b6054ab1"


class Judge(BaseHTTPRequestHandler):
    """/v1/chat/completions: prefers the shorter answer ("A"/"B"), "maybe" (unparseable) when the question
    mentions 7, HTTP 500 while `failing`. /v1/models answers validate's probe."""

    asked: list[dict] = []
    failing = False

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "judge"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        type(self).asked.append({"auth": self.headers.get("Authorization"), "model": body["model"], "text": text})
        if type(self).failing:
            return self._send(500, {"error": "overloaded"})
        question = text.split("Question: ", 1)[1].split("\n\nAnswer A: ", 1)[0]
        a = text.split("Answer A: ", 1)[1].split("\n\nAnswer B: ", 1)[0]
        b = text.split("Answer B: ", 1)[1].split("\n\nReply with", 1)[0]
        reply = "maybe" if "7" in question else ("A" if len(a) <= len(b) else "B")
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def model_dir(tiny_hub_model) -> Path:
    return tiny_hub_model  # the session's, built once


def judge_recipe(folder: Path, model_dir: Path, judges: dict) -> Path:
    files = write_files(folder)
    ev = {"prompts": str(files["prompts"]), "num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 10}
    lora = {"r": 4, "alpha": 8}
    return write_yaml(folder / "judged.yaml", {
        "name": "judged", "seed": 0, "runs_dir": str(folder / "runs"), "model": {"path": str(model_dir)},
        "chat_template": "chatml", "stages": {
            "sft": {"data": {"path": str(files["chat"])}, "lora": lora, "eval": ev,
                    "trainer": {**TRAINER, "max_steps": 4}},
            "dpo": {"from": "sft", "data": {"path": str(files["pairs"])}, "lora": lora,
                    "eval": {**ev, "judges": judges}, "trainer": {**TRAINER, "max_steps": 2}}}})


@pytest.mark.slow
def test_local_and_endpoint_judges(model_dir, server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    Judge.asked.clear()
    judges = {"local": {"model": str(model_dir), "max_new_tokens": 4},
              "remote": {"endpoint": server, "model": "judge", "api_key_env": KEY_ENV}}
    path = judge_recipe(tmp_path, model_dir, judges)
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "judged"
    m = read_manifest(run / "dpo")["metrics"]
    rows = [json.loads(x) for x in (run / "dpo" / "eval_samples.jsonl").read_text().splitlines()]
    pairs = len(rows)
    assert pairs == 16

    # the endpoint: asked twice per pair (both orders), with the key from the environment; then twice per pair
    # against the parent's greedy answer (sharpening told apart from learning)
    asks = [a for a in Judge.asked if a["model"] == "judge"]
    assert len(asks) == 4 * pairs and all(a["auth"] == f"Bearer {KEY}" for a in asks)
    greedy = {r["prompt"]: r["greedy_parent_response"] for r in rows}
    assert all(f"Answer B: {greedy[r['prompt']]}\n" in a["text"] for r, a in zip(rows, asks[2 * pairs:3 * pairs]))
    lo, hi = m["remote_win_rate_vs_greedy_parent_ci"]
    assert 0 <= lo <= m["remote_win_rate_vs_greedy_parent"] <= hi <= 1
    asks = asks[:2 * pairs]
    mine = [r["response"] for r in rows]
    assert sum(f"Answer A: {r}\n" in a["text"] for r in mine for a in asks[:pairs]) >= pairs  # first order: A
    assert sum(f"Answer B: {r}\n" in a["text"] for r in mine for a in asks[pairs:]) >= pairs  # then: B
    sevens = sum("7" in r["prompt"] for r in rows)
    assert m["remote_unparseable"] == 2 * sevens and m["remote_ties"] == 0  # "maybe" is not a tie
    assert m["remote_pairs"] == pairs
    # "the shorter one" names the same response in both orders unless both are equally long (then "A" twice)
    decided = [r for r in rows if "7" not in r["prompt"]]
    expect = sum(len(r["response"]) != len(r["parent_response"]) for r in decided) / len(decided)
    assert m["remote_position_consistency"] == pytest.approx(expect)
    lo, hi = m["remote_win_rate_vs_parent_ci"]
    assert 0 <= lo <= m["remote_win_rate_vs_parent"] <= hi <= 1
    assert all(r["remote_answers"] == [None, None] for r in rows if "7" in r["prompt"])

    # the local judge model (random weights): both orders asked, whatever it says is parsed or counted
    assert m["local_pairs"] == pairs
    answers = [a for r in rows for a in r["local_answers"]]
    assert len(answers) == 2 * pairs and all(a in (None, "A", "B", "TIE") for a in answers)
    assert m["local_unparseable"] == answers.count(None) and m["local_ties"] == answers.count("TIE")
    assert m["local_position_consistency"] is None or 0 <= m["local_position_consistency"] <= 1

    # the key is nowhere in the run folder (manifests, logs, samples, report)
    assert main(["report", str(run)]) == 0
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_failed_judge_keeps_the_stage_and_eval_reruns(model_dir, server, tmp_path, capsys):
    judges = {"remote": {"endpoint": server, "model": "judge"}}
    path = judge_recipe(tmp_path, model_dir, judges)
    Judge.failing = True
    try:
        assert main(["run", str(path)]) == 0
    finally:
        Judge.failing = False
    dpo = tmp_path / "runs" / "judged" / "dpo"
    manifest = read_manifest(dpo)
    assert manifest["status"] == "complete" and (dpo / "model" / "adapter_config.json").is_file()
    m = manifest["metrics"]
    assert m["eval_status"] == "failed" and "500" in m["eval_error"] and "\n" not in m["eval_error"]
    assert "alignpipe eval" in capsys.readouterr().out
    trained = (dpo / "model" / "adapter_model.safetensors").read_bytes()

    assert main(["eval", str(dpo)]) == 0
    after = read_manifest(dpo)
    m = after["metrics"]
    assert m["eval_status"] == "complete" and "eval_error" not in m and m["remote_pairs"] == 16
    assert after["status"] == "complete" and (dpo / "model" / "adapter_model.safetensors").read_bytes() == trained
    assert "implicit_accuracy" in m  # the training figures are kept


@pytest.mark.slow
@pytest.mark.parametrize("judge,needle", [
    ({"model": "/no/such/judge"}, "judge model /no/such/judge does not exist"),
    ({"verifier": "no_such_module:check"}, "cannot import verifier"),
    ({"endpoint": "http://127.0.0.1:9/v1", "model": "m"}, "does not answer"),
    ({"endpoint": "http://127.0.0.1:9/v1", "api_key_env": "ALIGNPIPE_UNSET_KEY_VAR"}, "ALIGNPIPE_UNSET_KEY_VAR"),
])
def test_validate_refuses_a_bad_judge(model_dir, tmp_path, capsys, judge, needle):
    path = judge_recipe(tmp_path, model_dir, {"j": judge})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "stages.dpo.eval.judges.j" in err[0], err


@pytest.mark.slow
def test_prompts_file_without_a_user_turn_is_refused(model_dir, tmp_path, capsys):
    path = judge_recipe(tmp_path, model_dir, {})
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"question": "What is 1 plus 1?"}) + "\n" + json.dumps({"title": "no prompt"}) + "\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompts.jsonl: line 2 has no user turn" in err and "stages.sft.eval.prompts" in err


def test_verdict_parsing():
    from alignpipe.eval.judges import PairVerdict, parse_verdict

    assert [parse_verdict(t) for t in ("A", " b.", "Tie", "Answer A is better", "maybe", "")] == \
        ["A", "B", "TIE", "A", None, None]
    assert PairVerdict("A", "B").score() == 1.0 and PairVerdict("A", "B").consistent
    assert PairVerdict("A", "A").score() == 0.5 and not PairVerdict("A", "A").consistent
    assert PairVerdict("A", None).score() is None and not PairVerdict("A", None).parsed


@pytest.mark.parametrize("code", [302, 307])
def test_endpoint_judge_never_follows_a_redirect_with_the_key(code, monkeypatch):
    """A judge endpoint that redirects to another port (another host, to the client) is refused: the key in
    `Authorization` never reaches the second server, which records every header it is sent. (urllib follows
    a 302 of a POST as a GET and copies the headers, the key among them.)"""
    from alignpipe.errors import EvalError
    from alignpipe.eval.judges import EndpointJudge
    from alignpipe.recipe.schema import JudgeSpec

    seen: list[dict] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append(dict(self.headers))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"choices": [{"message": {"content": "A"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(code)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for srv in (first, other):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-secret")
    spec = JudgeSpec(endpoint=f"http://127.0.0.1:{first.server_address[1]}/v1", model="m",
                     api_key_env="JUDGE_KEY_FOR_TEST", timeout_s=10)
    try:
        with pytest.raises(EvalError, match="redirect"):
            EndpointJudge(spec).ask(["which is better?"])
    finally:
        first.shutdown()
        other.shutdown()
    assert not any("sk-secret" in str(h) for h in seen), seen
