"""`alignpipe serve` through the official `openai` client, on loopback: a chat completion equals
`alignpipe generate`'s answer (greedy, and sampled with the same seed); a streamed one joins to the same
text; 8 concurrent requests are each answered with their own answer; bad requests get OpenAI-shaped
errors; a server started with a key (off loopback, as --allow-remote needs) refuses requests without it;
and a recipe's pairwise judge is an `alignpipe serve` of another run's stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignpipe.cli import main
from conftest import REPO, write_yaml
from hub_layout import save_tiny_model
from test_eval_user_data import TRAINER, write_files


def required(*names: str):
    """The optional packages these tests need: skipped when missing, except in CI (CI=true), where they must run."""
    import importlib
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[test]')", allow_module_level=True)
    return [importlib.import_module(n) for n in names]


openai, _, _ = required("openai", "fastapi", "uvicorn")
KEY_ENV, KEY = "ALIGNPIPE_TEST_SERVE_KEY", "sk-serve-test-4b1d9e7a20c35f86"
PROMPTS = ["What is 2 plus 3?", "What is 11 plus 4?", "Probe question one?"]


def start_server(stage_dirs, *extra: str, env: dict | None = None):
    """`alignpipe serve` in a process of its own on a free port; (process, base URL) once it listens."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "serve", *map(str, stage_dirs), "--port", "0",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()  # the address line, printed once the socket listens
    match = re.search(r"at (http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, match.group(1)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """A tiny Qwen2 look-alike after a short full-weight SFT with the ChatML template (which has tools)."""
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(root / "hub" / "tiny-qwen2")
    config = json.loads((model / "config.json").read_text())  # room for a tools prompt (~400 of these tokens)
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    files = write_files(root)
    recipe = write_yaml(root / "served.yaml", {
        "name": "served", "seed": 0, "runs_dir": str(root / "runs"), "model": {"path": str(model)},
        "chat_template": "chatml", "stages": {"sft": {"data": {"path": str(files["chat"])}, "eval": {"enabled": False},
                                                       "trainer": {**TRAINER, "max_steps": 4}}}})
    assert main(["run", str(recipe)]) == 0
    return root / "runs" / "served" / "sft"


@pytest.fixture(scope="module")
def served(stage):
    """The stage, and a copy of it in another run folder (runs can be copied), served side by side."""
    import shutil

    twin = stage.parent.parent / "twin" / "sft"
    if not twin.exists():
        shutil.copytree(stage, twin)
    proc, url = start_server([stage, twin])
    yield url
    stop_server(proc)


def client(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def generate(stage: Path, tmp: Path, prompts: list[str], *args: str) -> list[str]:
    """`alignpipe generate`'s responses, one prompt per batch (as the server answers them)."""
    inp, out = tmp / "prompts.jsonl", tmp / "answers.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["generate", str(stage), "--in", str(inp), "--out", str(out), "--batch-size", "1", *args]) == 0
    return [json.loads(x)["response"] for x in out.read_text().splitlines()]


def ask(c, prompt: str, **kw):
    return c.chat.completions.create(model="served/sft", messages=[{"role": "user", "content": prompt}], **kw)


def test_models_and_chat_completion_equal_generate(stage, served, tmp_path):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["served/sft", "twin/sft"]
    got = [ask(c, p, temperature=0, max_tokens=12, seed=0) for p in PROMPTS]
    twin = [c.chat.completions.create(model="twin/sft", messages=[{"role": "user", "content": p}], temperature=0,
                                      max_tokens=12) for p in PROMPTS]
    assert [t.model for t in twin] == ["twin/sft"] * 3 and [g.model for g in got] == ["served/sft"] * 3
    assert [t.choices[0].message.content for t in twin] == [g.choices[0].message.content for g in got]
    assert [g.choices[0].message.content for g in got] == generate(stage, tmp_path, PROMPTS, "--max-new-tokens", "12")
    assert all(g.choices[0].finish_reason in ("stop", "length") and g.usage.completion_tokens <= 12 for g in got)
    # sampling: the same seed, temperature and top_p give generate's sample
    sampled = ask(c, PROMPTS[0], temperature=1.0, top_p=0.9, max_tokens=12, seed=5).choices[0].message.content
    assert sampled == generate(stage, tmp_path, PROMPTS[:1], "--max-new-tokens", "12", "--temperature", "1.0",
                               "--top-p", "0.9", "--seed", "5")[0]


def test_stream_joins_to_the_same_text(served):
    c = client(served)
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        whole = ask(c, PROMPTS[1], max_tokens=16, **kw).choices[0]
        chunks = list(ask(c, PROMPTS[1], max_tokens=16, stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.message.content and len(chunks) > 2
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    # the raw completions endpoint, streamed and not
    whole = c.completions.create(model="served/sft", prompt="What is", max_tokens=6, temperature=0)
    parts = c.completions.create(model="served/sft", prompt="What is", max_tokens=6, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_eight_concurrent_requests_get_their_own_answers(served):
    """Sampled with a different seed each, so any crossing of tokens or random state changes an answer."""
    c = client(served)
    alone = [ask(c, PROMPTS[i % 3], temperature=1.0, max_tokens=10, seed=i).choices[0].message.content
             for i in range(8)]
    assert len(set(alone)) > 1  # the seeds do change the answers: a crossing would show

    def one(i: int) -> str:
        if i % 2:  # half of them streamed
            return "".join(ch.choices[0].delta.content or "" for ch in
                           ask(c, PROMPTS[i % 3], temperature=1.0, max_tokens=10, seed=i, stream=True) if ch.choices)
        return ask(c, PROMPTS[i % 3], temperature=1.0, max_tokens=10, seed=i).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone


def test_bad_requests_get_openai_shaped_errors(served):
    import httpx

    c = client(served)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="no/such", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        ask(c, "hi", temperature=7)
    assert err.value.body["param"] == "temperature" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="served/sft", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:  # more tokens than the context holds
        ask(c, "hi", max_tokens=100000)
    assert err.value.body["code"] == "context_length_exceeded"
    r = httpx.post(served + "/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host
    r = httpx.get(served + "/models", headers={"Host": "attacker.example:8000"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    assert httpx.get(served + "/models", headers={"Host": "localhost:1"}, timeout=30).status_code == 200


def test_tools_are_rendered_and_tool_calls_parsed(stage, served):
    from transformers import AutoTokenizer

    from alignpipe.serving.engine import split_tool_calls

    tools = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    got = client(served).chat.completions.create(model="served/sft", messages=messages, tools=tools, temperature=0,
                                                 max_tokens=4)
    tok = AutoTokenizer.from_pretrained(str(stage / "model"))
    with_tools = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "add two numbers" in with_tools
    assert got.usage.prompt_tokens == len(tok(with_tools, add_special_tokens=False)["input_ids"])
    # what the template writes for an assistant's tool call is parsed back into the same call
    call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    text = tok.apply_chat_template(messages + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                   tools=tools, tokenize=False)
    said = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    content, calls = split_tool_calls(said)
    assert content == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 2})]


def test_key_is_required_off_loopback(stage, tmp_path):
    run = [sys.executable, "-m", "alignpipe.cli", "serve", str(stage), "--host", "0.0.0.0", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop(KEY_ENV, None)
    for extra, needle in (([], "not a loopback address"), (["--allow-remote", "--api-key-env", KEY_ENV],
                                                            f"{KEY_ENV} is not set")):
        done = subprocess.run(run + extra, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1

    # bound to every interface (off loopback): every request needs the key; reached here through 127.0.0.1
    proc, url = start_server([stage], "--host", "0.0.0.0", "--allow-remote", "--api-key-env", KEY_ENV,
                             env={KEY_ENV: KEY})
    try:
        url = url.replace("0.0.0.0", "127.0.0.1")
        import httpx

        r = httpx.get(url + "/models", timeout=30)  # no key at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, "sk-wrong").models.list()
        assert err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            ask(client(url, "sk-wrong"), "hi", max_tokens=2)
        assert ask(client(url, KEY), PROMPTS[0], temperature=0, max_tokens=3).choices[0].message.content is not None
        # off loopback the Host header is not what protects it (the key is): another name is fine with the key
        r = httpx.get(url + "/models", headers={"Host": "server.lan", "Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200
    finally:
        stop_server(proc)


def test_a_served_stage_is_another_recipes_pairwise_judge(stage, served, tmp_path):
    """The judge of this recipe's dpo stage is `alignpipe serve` of the other run's sft stage: every pair is
    asked in both orders, and each answer is what `alignpipe generate` says to the same judging prompt."""
    from alignpipe.eval.judges import DEFAULT_TEMPLATE, fill, parse_verdict
    from alignpipe.runfolder.manifests import read_manifest
    from test_judges import judge_recipe

    model_dir = save_tiny_model(tmp_path / "hub" / "tiny-qwen2")
    judges = {"served": {"endpoint": served, "model": "served/sft", "max_new_tokens": 6}}
    path = judge_recipe(tmp_path, model_dir, judges)
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    dpo = tmp_path / "runs" / "judged" / "dpo"
    m = read_manifest(dpo)["metrics"]
    rows = [json.loads(x) for x in (dpo / "eval_samples.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "served_answers" in r]  # those with a parent response to compare
    assert m["eval_status"] == "complete" and m["served_pairs"] == len(rows) == 16
    asks = [fill(DEFAULT_TEMPLATE, r["prompt"], r["response"], r["parent_response"]) for r in rows]
    asks += [fill(DEFAULT_TEMPLATE, r["prompt"], r["parent_response"], r["response"]) for r in rows]
    said = [parse_verdict(a) for a in generate(stage, tmp_path, asks, "--max-new-tokens", "6")]
    assert [a for r in rows for a in r["served_answers"]] == [x for i in range(16) for x in (said[i], said[16 + i])]
    assert m["served_unparseable"] == said.count(None)


def test_stop_strings_cut_the_answer_streamed_or_not(served):
    c = client(served)
    kw = {"temperature": 1.0, "seed": 11, "max_tokens": 16}
    full = ask(c, PROMPTS[2], **kw).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(full) > 4 and stop.strip()
    expect = full[: full.find(stop)].rstrip()
    cut = ask(c, PROMPTS[2], stop=[stop, "never said"], **kw).choices[0]
    assert cut.message.content == expect and cut.finish_reason == "stop"
    chunks = list(ask(c, PROMPTS[2], stop=stop, stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expect
    assert chunks[-1].choices[0].finish_reason == "stop"
