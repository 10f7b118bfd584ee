"""Tools (issue 39): the calculator, the tool world, tool calls checked and run, multi-turn rollouts that execute
tools and mask their results, recipe-named tools and their schemas."""

from __future__ import annotations

import re
import time

import pytest

from alignpipe.data import world_tools
from alignpipe.data.tools import parse_calls, resolve_tools, run_call
from alignpipe.data.world import World, WorldConfig, build_splits
from alignpipe.errors import RecipeError
from alignpipe.models.loading import train_tokenizer
from alignpipe.recipe.templates import EMBEDDED, EMBEDDED_SPECIAL_TOKENS
from alignpipe.models.tool_episode import run_episode
from alignpipe.runfolder.manifests import fingerprint_json

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 * 48"}}\n</tool_call>'


# --- tools named in a recipe, for tests: a raising one, a slow one, one without a schema
def explode(x: int) -> str:
    """Always fails.

    Args:
        x: any number
    """
    raise RuntimeError("boom")


def sleepy(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def untyped(x):
    return x


@pytest.fixture(scope="module")
def tokenizer():
    texts = [CALL, "<tool_response>1776</tool_response>", "The answer is 1776.", "what is 37 times 48?"] * 20
    return train_tokenizer(texts, 400, EMBEDDED_SPECIAL_TOKENS, EMBEDDED)


def test_calculator_evaluates_arithmetic_and_refuses_anything_else():
    assert world_tools.calculator("37 * 48") == "1776"
    assert world_tools.calculator("(2 + 3) * -4 / 2") == "-10"
    for bad in ("__import__('os').system('true')", "a * 2", "2 ** 1000", "len([1])", "1 +", "(1).real"):
        with pytest.raises(ValueError):
            world_tools.calculator(bad)
    with pytest.raises(ZeroDivisionError):
        world_tools.calculator("1 / 0")


def test_default_world_rows_are_unchanged_by_the_tool_option():
    """tool_share 0 (the default) builds the plain World; its rows hash as before the tool world existed. With the
    option on, the corpus is the default's plus tool documents."""
    config = WorldConfig(n_corpus_docs=50, n_corpus_eval_docs=10, n_sft=100, n_pairs=20, n_eval_pairs=10,
                         n_rl_prompts=50)
    assert type(world_tools.make_world(config)) is World
    plain = build_splits(config)
    tooled = world_tools.make_world(WorldConfig(**{**config.__dict__, "tool_share": 0.3}))
    docs = tooled.corpus()
    assert len(docs) == 50 + 15 and sorted(d for d in docs if "<tool_call>" not in d) == sorted(
        r["text"] for r in plain["corpus"])
    assert tooled.corpus_eval() == [r["text"] for r in plain["corpus_eval"]]
    assert plain["eval_prompts"] == tooled.eval_prompts()
    assert plain["sft"] != tooled.sft_rows()


def test_tool_documents_write_the_call_as_the_template_does_and_never_a_held_out_pair(tokenizer):
    """The corpus's tool documents hold the call text the embedded template renders (so the tokenizer learns its
    tokens) and only training pairs: no held-out pair's product, prompt or expression reaches pretraining."""
    world = world_tools.ToolWorld(WorldConfig(n_corpus_docs=400, tool_share=0.5))
    tool_docs = [d for d in world.corpus() if "<tool_call>" in d]
    assert len(tool_docs) == 200
    demo = world_tools.tool_demonstration("what is 37 times 48?", 37, 48, with_call=True)
    rendered = tokenizer.apply_chat_template(demo, tokenize=False)
    doc = world_tools.tool_document([("what is 37 times 48?", 37, 48)])
    assert doc.split("\n", 1)[1].startswith(CALL) and CALL in rendered
    assert doc.endswith("<tool_response>1776</tool_response>\nThe answer is 1776.")
    text = "\n".join(tool_docs)
    expressions = set(re.findall(r'"expression": "(\d+) \* (\d+)"', text))
    assert len(expressions) > 100
    assert not {(int(a), int(b)) for a, b in expressions} & set(world.tool_eval), "a held-out pair reached the corpus"
    assert not any(r["prompt"] in text for r in world.tool_eval_prompts(100) if r["needs_tool"])


def test_tool_rl_share_changes_the_rl_prompts_only():
    """`tool_rl_share` sets the bigmul share of RL prompts; SFT rows, the corpus and the fingerprints of stages that do
    not read RL prompts stay as with `tool_share` alone, and the default world's fingerprint config lacks it."""
    from alignpipe.data.world import part_config
    from alignpipe.recipe.parse import to_plain

    base_config = WorldConfig(n_corpus_docs=40, n_sft=100, n_rl_prompts=100, tool_share=0.3)
    rl_config = WorldConfig(**{**base_config.__dict__, "tool_rl_share": 0.7})
    plain, more = world_tools.ToolWorld(base_config), world_tools.ToolWorld(rl_config)
    assert plain.sft_rows() == more.sft_rows() and plain.corpus() == more.corpus()
    assert sum(1 for r in more.rl_prompts() if world_tools.solve(r["prompt"][0]["content"])[1]) == 70
    for part in ("corpus", "sft", "pairs"):
        assert part_config(to_plain(base_config), part) == part_config(to_plain(rl_config), part)
    assert part_config(to_plain(base_config), "rl_prompts") != part_config(to_plain(rl_config), "rl_prompts")
    assert "tool_rl_share" not in part_config(to_plain(WorldConfig()), "rl_prompts")
    with pytest.raises(ValueError, match="tool_rl_share"):
        world_tools.ToolWorld(WorldConfig(tool_share=0.3, tool_rl_share=1.5))


def test_the_shaped_tool_reward_pays_right_answers_and_docks_invalid_and_wasted_calls():
    good, bad = parse_calls(CALL), parse_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    prompts = ["what is 37 times 48?"] * 3 + ["what is 3 plus 4?"] * 2
    finals = ["The answer is 1776.", "The answer is 1776.", "The answer is 1777.", "The answer is 7.",
              "The answer is 7."]
    rewards = world_tools.tool_shaped_reward(prompts, [""] * 5, final_answer=finals,
                                             calls=[good, good + bad, [], good, []])
    assert rewards == [1.0, -0.5, 0.0, 0.5, 1.0]
    assert world_tools.tool_judge_reward(prompts[:1], [CALL], None, None) == [0.0]  # a call is not an answer


def test_tool_world_mixes_demonstrations_and_holds_out_pairs():
    config = WorldConfig(n_sft=200, n_rl_prompts=100, tool_share=0.5, tool_demo_share=0.4)
    world = world_tools.ToolWorld(config)
    rows = world.sft_rows()
    tool_rows = [r for r in rows if world_tools.solve(r["messages"][0]["content"])[1]]
    with_call = [r for r in tool_rows if len(r["messages"]) == 4]
    assert len(rows) == 200 and len(tool_rows) == 100 and len(with_call) == 40
    assert all(world_tools.tool_judge(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in tool_rows)
    held = {str(a * b) for a, b in world.tool_eval} & {str(a * b) for a, b in world.tool_train}
    train_prompts = {r["messages"][0]["content"] for r in tool_rows}
    eval_rows = world.tool_eval_prompts(20)
    assert sum(r["needs_tool"] for r in eval_rows) == 20
    assert not train_prompts & {r["prompt"] for r in eval_rows}, "a held-out pair reached SFT"
    assert held is not None and sum(1 for r in world.rl_prompts()
                                    if world_tools.solve(r["prompt"][0]["content"])[1]) == 50



def test_the_tools_recipe_has_a_mixed_teacher_and_a_control_on_the_same_demonstrations():
    """recipes/tools.yaml: a fixed share of bigmul demonstrations calls the calculator, the rest answer from memory
    (so SFT is not at the ceiling by construction), and sft_more is the same SFT continued on the same
    demonstrations (the control RL must beat), while grpo starts from the same SFT."""
    from pathlib import Path

    from alignpipe.recipe.parse import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tools.yaml")
    assert 0.0 < recipe.world["tool_demo_share"] < 1.0
    sft, more, grpo = (recipe.stages[name] for name in ("sft", "sft_more", "grpo"))
    assert more.kind == sft.kind == "sft" and more.from_ == "sft" and grpo.from_ == "sft"
    assert more.data == sft.data and more.trainer["learning_rate"] == sft.trainer["learning_rate"]

def test_calls_are_parsed_checked_and_failures_become_error_results():
    tools = {**world_tools.default_tools(), **resolve_tools(["test_tools:explode", "test_tools:sleepy"])}
    (good,) = parse_calls(CALL)
    assert run_call(good, tools) == ("1776", False)
    bad = parse_calls('<tool_call>{"name": "calculator"</tool_call> <tool_call>{"name": "nope", "arguments": {}}'
                      '</tool_call> <tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>'
                      ' <tool_call>{"name"')
    results = [run_call(c, tools) for c in bad]
    assert [r[1] for r in results] == [True] * 4
    assert "not JSON" in results[0][0] and "nope" in results[1][0] and "wrong type" in results[2][0]
    assert "not closed" in results[3][0]
    (raising,) = parse_calls('<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>')
    assert run_call(raising, tools) == ("error: RuntimeError: boom", True)
    (slow,) = parse_calls('<tool_call>{"name": "sleepy", "arguments": {"seconds": 5}}</tool_call>')
    assert run_call(slow, tools, timeout_s=0.2) == ("error: the tool took longer than 0.2 s", True)


def test_a_recipe_named_tool_gets_its_schema_and_a_bad_one_one_line():
    tools = resolve_tools(["alignpipe.data.world_tools:calculator"])
    schema = tools["calculator"].schema["function"]
    assert schema["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["parameters"]["required"] == ["expression"] and schema["description"].startswith("Evaluate")
    with pytest.raises(RecipeError, match="no JSON schema"):
        resolve_tools(["test_tools:untyped"])
    with pytest.raises(RecipeError, match="cannot import tool"):
        resolve_tools(["test_tools:missing"])


def scripted(tokenizer, turns: list[str]):
    """A policy that writes the given turns (each ended with the end-of-turn token), in order."""
    queue = list(turns)

    def step(ids, budget):
        return (tokenizer(queue.pop(0), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:budget]

    return step


def test_a_rollout_executes_the_tool_and_masks_its_result(tokenizer):
    tools = world_tools.default_tools()
    prompt = [{"role": "user", "content": "what is 37 times 48?"}]
    ep = run_episode(scripted(tokenizer, [CALL, "The answer is 1776."]), tokenizer, prompt, tools, max_tokens=200)
    assert ep.answered and ep.turns == 2 and ep.final == "The answer is 1776." and ep.failed_calls == 0
    assert [m["role"] for m in ep.messages] == ["assistant", "tool", "assistant"]
    assert ep.messages[1]["content"] == "1776"
    assert world_tools.tool_judge(prompt[0]["content"], ep.final, ep.calls)
    # the tokens masked out are exactly the tool turn the template writes, and the result is among them
    masked = tokenizer.decode([t for t, m in zip(ep.completion_ids, ep.mask, strict=True) if m == 0])
    assert masked == "<|user|><tool_response>1776</tool_response><|end|><|assistant|>"
    trained = tokenizer.decode([t for t, m in zip(ep.completion_ids, ep.mask, strict=True) if m == 1])
    assert "1776</tool_response>" not in trained and "The answer is 1776." in trained
    # the ids are what the template renders for the whole conversation
    full = tokenizer.apply_chat_template(prompt + ep.messages[:2], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ep.prompt_ids + ep.completion_ids).startswith(full)


def test_a_raising_tool_gives_an_error_turn_and_is_counted(tokenizer):
    tools = {**world_tools.default_tools(), **resolve_tools(["test_tools:explode"])}
    call = '<tool_call>{"name": "explode", "arguments": {"x": 3}}</tool_call>'
    ep = run_episode(scripted(tokenizer, [call, "The answer is 1776."]), tokenizer,
                     [{"role": "user", "content": "what is 37 times 48?"}], tools, max_tokens=200)
    assert ep.failed_calls == 1 and ep.messages[1] == {"role": "tool", "name": "explode",
                                                      "content": "error: RuntimeError: boom"}
    assert ep.answered and not world_tools.tool_judge("what is 37 times 48?", ep.final, ep.calls,
                                                      tools={"calculator": tools["calculator"]})


def test_without_tools_a_call_is_no_answer_and_the_turn_limit_holds(tokenizer):
    tools = world_tools.default_tools()
    prompt = [{"role": "user", "content": "what is 37 times 48?"}]
    ep = run_episode(scripted(tokenizer, [CALL]), tokenizer, prompt, tools, execute=False, max_tokens=200)
    assert ep.turns == 1 and ep.calls == [] and not world_tools.tool_judge(prompt[0]["content"], ep.final)
    ep = run_episode(scripted(tokenizer, [CALL] * 5), tokenizer, prompt, tools, max_turns=2, max_tokens=400)
    assert ep.turns == 2 and not ep.answered and len(ep.calls) == 2


def test_embedded_template_renders_tool_turns_and_plain_chats_as_before(tokenizer):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is 1."}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == "<|user|>hi<|end|><|assistant|>The answer is 1.<|end|>"
    demo = world_tools.tool_demonstration("what is 37 times 48?", 37, 48, with_call=True)
    text = tokenizer.apply_chat_template(demo, tokenize=False)
    assert text == ("<|user|>what is 37 times 48?<|end|><|assistant|>" + CALL + "<|end|>"
                    "<|user|><tool_response>1776</tool_response><|end|><|assistant|>The answer is 1776.<|end|>")


def test_chat_shows_each_call_and_its_result(tokenizer):
    from alignpipe.models.tool_chat import chat_turn, show_episode

    messages = [{"role": "user", "content": "what is 37 times 48?"}]
    ep = chat_turn(scripted(tokenizer, [CALL, "The answer is 1776."]), tokenizer, messages,
                   world_tools.default_tools(), max_tokens=200)
    assert show_episode(ep) == ['  [tool call] calculator({"expression": "37 * 48"})', "  [tool result] 1776",
                                "assistant> The answer is 1776."]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]


def test_tool_metrics_summarise_episodes():
    from alignpipe.eval.tools import summarise

    def row(needs, tools, calls, valid, passed, turns=2, answered=True):
        return {"needs_tool": needs, "tools": tools, "calls": calls, "valid_calls": valid, "passed": passed,
                "turns": turns, "answered": answered, "failed_calls": calls - valid}

    out = [row(True, True, 1, 1, True), row(True, True, 1, 0, False), row(True, False, 0, 0, False, 1),
           row(True, False, 0, 0, True, 1), row(False, True, 0, 0, True, 1), row(False, True, 2, 2, True, 3)]
    m = summarise(out)
    assert m["tool_pass_rate_with_tools"] == 0.5 and m["tool_pass_rate_without_tools"] == 0.5
    assert m["tool_call_rate"] == 1.0 and m["valid_call_rate"] == 0.75 and m["wasted_call_rate"] == 0.5
    assert m["turns_per_answer"] == 2.0 and m["tool_failed_calls"] == 1 and m["plain_pass_rate_with_tools"] == 1.0


@pytest.mark.slow
def test_grpo_trains_on_tool_rollouts_through_trl_and_reports_tool_figures(tiny_base, tmp_path):
    """A recipe with `tools:`: GRPO's rollouts go through the tool episode (TRL's rollout_func), the stage records
    the rollouts' call counts and every chat policy stage the tool figures; pretrain is not re-run for tools."""
    from conftest import TINY_EVAL, copy_base, stage_manifest, tiny_recipe, write_yaml

    from alignpipe.cli import main

    runs = tmp_path / "runs"
    copy_base(tiny_base, runs)
    grpo = {"from": "sft", "reward_function": "alignpipe.data.world_tools:tool_shaped_reward",
            "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL,
            "trainer": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4,
                        "max_completion_length": 24, "logging_steps": 1}}
    recipe = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(runs, extra_stages={"grpo": grpo},
                                                            tools=["alignpipe.data.world_tools:calculator"]))
    before = stage_manifest(runs / "tiny" / "pretrain")["version"]
    assert main(["run", str(recipe)]) == 0
    assert stage_manifest(runs / "tiny" / "pretrain")["version"] == before
    m = stage_manifest(runs / "tiny" / "grpo")
    assert m["recipe_settings"]["tools"] == ["alignpipe.data.world_tools:calculator"]
    metrics = m["metrics"]
    assert metrics["train_tool_calls_per_rollout"] >= 0 and metrics["train_tool_failed_calls"] >= 0
    assert metrics["tool_eval_episodes"] > 0 and "tool_call_rate" in metrics
    assert metrics["tool_eval_episodes_greedy"] == metrics["tool_eval_episodes"] and "tool_call_rate_greedy" in metrics
    assert (runs / "tiny" / "grpo" / "eval_tool_samples.jsonl").is_file()
    assert "tool_call_rate" in stage_manifest(runs / "tiny" / "sft")["metrics"]


def test_report_section_shows_tool_figures(tmp_path):
    from types import SimpleNamespace

    from alignpipe.report.tools_section import tools_section

    stages = [SimpleNamespace(name="pretrain", metrics={"eval_loss": 1.0}),
              SimpleNamespace(name="sft", metrics={"tool_eval_episodes": 12, "tool_pass_rate_with_tools": 0.5,
                                                   "tool_pass_rate_without_tools": 0.0, "valid_call_rate": 1.0,
                                                   "tool_failed_calls": 0})]
    lines, figures = tools_section(stages, lambda name: tmp_path / f"fig-{name}.png")
    assert "| sft | 0.000 | 0.500 | - | - | - | 1.000 | - | - | 0 |" in lines
    assert not any("pretrain" in line for line in lines) and figures[0].is_file()
    assert tools_section(stages[:1], lambda name: tmp_path / name) == ([], [])


# The embedded template before tool turns were added (alignpipe 3b3007a): the default world must render the same.
EMBEDDED_BEFORE_TOOLS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def test_the_default_world_renders_as_before_the_tool_turns(tokenizer):
    world = World(WorldConfig(n_sft=300, n_pairs=50, n_rl_prompts=50))
    convs = [r["messages"] for r in world.sft_rows()] + [r["prompt"] + r["chosen"] for r in world.preference_rows()]
    for gen in (False, True):
        new = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=gen) for c in convs]
        old = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=gen,
                                             chat_template=EMBEDDED_BEFORE_TOOLS) for c in convs]
        assert new == old
    masks = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                           chat_template=t)["assistant_masks"]
             for c in convs[:20] for t in (EMBEDDED, EMBEDDED_BEFORE_TOOLS)]
    assert masks[0::2] == masks[1::2]


def test_sft_on_a_tool_demonstration_trains_the_call_and_the_answer_not_the_result(tokenizer):
    demo = world_tools.tool_demonstration("what is 37 times 48?", 37, 48, with_call=True)
    enc = tokenizer.apply_chat_template(demo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == CALL + "<|end|>The answer is 1776.<|end|>"


def test_the_tool_judge_as_reward_counts_as_training_on_the_judge():
    from alignpipe.eval.reward_functions import is_judge

    assert is_judge("alignpipe.data.world_tools:tool_judge_reward")
