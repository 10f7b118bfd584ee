"""The formats users bring from other tools, each on a small file written here in that tool's shape: detection,
normalisation, tool calls and loss_weight through the SFT loss mask, column maps, one source per spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpipe.data.formats import DataError
from alignpipe.data.sources import prepare_data


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
NORMAL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
NORMAL_TOOLS = [{"type": "function", "function": TOOLS[0]}]
TOOL_CONVERSATION = [user("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [NORMAL_CALL]},
                     {"role": "tool", "content": '{"sky": "sunny"}'}, bot("It is sunny.")]


def oasst_rows() -> list[dict]:
    """Two oasst1 trees as flat rows: a prompt with two ranked replies and a follow-up; a deleted reply; an orphan."""
    def m(mid, parent, role, text, rank=None, deleted=False):
        return {"message_id": mid, "parent_id": parent, "text": text, "role": role, "rank": rank,
                "deleted": deleted, "lang": "en", "message_tree_id": "t"}
    return [m("p1", None, "prompter", "What is 2+2?"), m("a1", "p1", "assistant", "4.", rank=0),
            m("a2", "p1", "assistant", "5.", rank=1), m("p2", "a1", "prompter", "And 3+3?"),
            m("a3", "p2", "assistant", "6.", rank=0), m("a4", "p1", "assistant", "rude", deleted=True),
            m("x1", "gone", "assistant", "orphan reply", rank=0), m("p9", None, "prompter", "Hello?")]


def tree_row() -> dict:
    return {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p1", "text": "What is 2+2?", "role": "prompter", "replies": [
            {"message_id": "a1", "text": "4.", "role": "assistant", "rank": 0, "replies": [
                {"message_id": "p2", "text": "And 3+3?", "role": "prompter", "replies": [
                    {"message_id": "a3", "text": "6.", "role": "assistant", "rank": 0, "replies": []}]}]},
            {"message_id": "a2", "text": "5.", "role": "assistant", "rank": 1, "replies": []}]}}


# name -> (rows of a file in that format, the family asked for, the format detected, the first normalised row)
CASES = {
    "openai_typed_parts": (
        [{"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                       {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "yo"}], "weight": 1}]}],
        "conversations", "messages",
        {"messages": [{"role": "system", "content": "Be brief."}, user("hi"), bot("yo")]}),
    "llamafactory_v1_loss_weight": (
        [{"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
                       {"role": "assistant", "content": [{"type": "text", "value": "hello"}], "loss_weight": 0.0},
                       {"role": "user", "content": [{"type": "text", "value": "bye"}], "loss_weight": 0.0},
                       {"role": "assistant", "content": [{"type": "reasoning", "value": "polite"},
                                                         {"type": "text", "value": "bye!"}], "loss_weight": 1.0}]}],
        "conversations", "messages",
        {"messages": [user("hi"), {**bot("hello"), "loss_weight": 0.0}, user("bye"),
                      bot("<think>\npolite\n</think>\n\nbye!")]}),
    "sharegpt_tools": (
        [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                            {"from": "function_call", "value": json.dumps(CALL)},
                            {"from": "observation", "value": '{"sky": "sunny"}'},
                            {"from": "gpt", "value": "It is sunny."}], "tools": json.dumps(TOOLS)}],
        "conversations", "sharegpt", {"messages": TOOL_CONVERSATION, "tools": NORMAL_TOOLS}),
    "openai_tool_calls": (
        [{"messages": [user("Weather in Paris?"),
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "c1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "sunny"}'},
                       bot("It is sunny.")], "tools": NORMAL_TOOLS}],
        "conversations", "messages", {"messages": TOOL_CONVERSATION, "tools": NORMAL_TOOLS}),
    "typed_tool_call_parts": (
        [{"messages": [{"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}]},
                       {"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(CALL)}]},
                       {"role": "tool", "content": [{"type": "text", "value": '{"sky": "sunny"}'}]},
                       {"role": "assistant", "content": [{"type": "text", "value": "It is sunny."}]}],
          "tools": json.dumps(NORMAL_TOOLS)}],
        "conversations", "messages", {"messages": TOOL_CONVERSATION, "tools": NORMAL_TOOLS}),
    "oasst_flat_conversations": (oasst_rows(), "conversations", "oasst",
                                 {"messages": [user("What is 2+2?"), bot("4."), user("And 3+3?"), bot("6.")]}),
    "oasst_flat_pairs": (oasst_rows(), "pairs", "oasst",
                         {"prompt": [user("What is 2+2?")], "chosen": [bot("4.")], "rejected": [bot("5.")]}),
    "oasst_tree_conversations": ([tree_row()], "conversations", "oasst_tree",
                                 {"messages": [user("What is 2+2?"), bot("4."), user("And 3+3?"), bot("6.")]}),
    "oasst_tree_pairs": ([tree_row()], "pairs", "oasst_tree",
                         {"prompt": [user("What is 2+2?")], "chosen": [bot("4.")], "rejected": [bot("5.")]}),
    "llamafactory_sharegpt_preference": (
        [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
          "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}],
        "pairs", "sharegpt_preference",
        {"prompt": [{"role": "system", "content": "S"}, user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}),
    "chosen_rejected_messages": (
        [{"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
                              {"role": "assistant", "content": [{"type": "text", "value": "good"}], "loss_weight": 1}],
          "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
                                {"role": "assistant", "content": [{"type": "text", "value": "bad"}]}]}],
        "pairs", "messages_preference", {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}),
    "ultrafeedback_binarized": (
        [{"prompt": "q", "chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")],
          "score_chosen": 8.0, "score_rejected": 3.0, "messages": [user("q"), bot("good")]}],
        "pairs", "preference", {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}),
    "kto_messages": (
        [{"messages": [user("q"), bot("a")], "label": False}], "kto", "kto_messages",
        {"prompt": [user("q")], "completion": [bot("a")], "label": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_format_is_detected_and_normalised(tmp_path, case):
    rows, family, fmt, first = CASES[case]
    jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data({"path": "d.jsonl", "max_dropped": 1}, tmp_path, family)
    (part,) = data.parts
    assert (part.format, part.detected, data.family) == (fmt, True, family)
    assert part.why  # validate says why it was detected
    assert data.rows[0] == first
    named = prepare_data({"path": "d.jsonl", "format": fmt, "max_dropped": 1}, tmp_path, family)
    assert named.rows == data.rows  # the same format, named in the recipe


def test_oasst_counts_every_message(tmp_path):
    jsonl(tmp_path / "o.jsonl", oasst_rows())
    (part,) = prepare_data({"path": "o.jsonl", "max_dropped": 1}, tmp_path, "conversations").parts
    assert part.rows_read == 8 and len(part.rows) == 1
    assert part.drops.counts == {"deleted": 1, "orphan": 1}
    assert part.drops.first_rows == {"deleted": [6], "orphan": [7]}
    assert "1 user turns nobody answered, not used (first at 8)" in part.notes
    assert "1 lower-ranked or unranked replies (and their follow-ups) not used" in part.notes
    # the unranked, deleted reply is neither a chosen nor a rejected side
    pairs = prepare_data({"path": "o.jsonl", "max_dropped": 1}, tmp_path, "pairs")
    assert len(pairs.rows) == 1


def test_plain_text_files_split_into_documents(tmp_path):
    (tmp_path / "a.md").write_text("# Title\nfirst para\n\nsecond para\nmore\n\n\nthird\n")
    (part,) = prepare_data({"path": "a.md"}, tmp_path, "text").parts
    assert [r["text"] for r in part.rows] == ["# Title\nfirst para", "second para\nmore", "third"]
    assert part.row_numbers == [1, 4, 8]
    (tmp_path / "b.txt").write_text("doc one\ndoc two\n" + "word " * 9000 + "\n")  # no blank line: one per line
    (part,) = prepare_data({"path": "b.txt"}, tmp_path, "text").parts
    assert [r["text"] for r in part.rows[:2]] == ["doc one", "doc two"]
    assert len(part.rows) == 5 and all(len(r["text"]) <= 20_000 for r in part.rows)  # 45k chars cut by size


def test_kto_rows_from_pairs_and_labels(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    rows = prepare_data({"path": "p.jsonl"}, tmp_path, "kto").rows
    assert rows == [{"prompt": [user("q")], "completion": [bot("good")], "label": True},
                    {"prompt": [user("q")], "completion": [bot("bad")], "label": False}]


# --------------------------------------------------------------------------- column maps


def test_column_maps_rename_columns_and_message_tags(tmp_path):
    jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 1}])
    rows = prepare_data({"path": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}},
                        tmp_path, "conversations").rows
    assert rows == [{"messages": [user("q"), bot("a")]}]
    jsonl(tmp_path / "gb.jsonl", [{"q": "q", "good": "yes", "bad": "no"}])
    rows = prepare_data({"path": "gb.jsonl", "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
                        tmp_path, "pairs").rows
    assert rows == [{"prompt": [user("q")], "chosen": [bot("yes")], "rejected": [bot("no")]}]
    jsonl(tmp_path / "tags.jsonl", [{"dialog": [{"speaker": "me", "says": "hi"}, {"speaker": "bot", "says": "yo"}]}])
    spec = {"path": "tags.jsonl", "columns": {"messages": "dialog", "role_tag": "speaker", "content_tag": "says",
                                              "user_tag": "me", "assistant_tag": "bot"}}
    assert prepare_data(spec, tmp_path, "conversations").rows == [{"messages": [user("hi"), bot("yo")]}]
    # in a mixture entry too
    mixed = prepare_data({"mixture": [{**spec, "weight": 1}, {"path": "qa.jsonl", "weight": 1,
                                                             "columns": {"prompt": "question", "response": "answer"}}]},
                         tmp_path, "conversations")
    assert [p.format for p in mixed.parts] == ["messages", "prompt_completion"]


def test_column_map_naming_a_missing_column_is_one_line(tmp_path):
    jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        prepare_data({"path": "qa.jsonl", "columns": {"prompt": "query", "response": "answer"}}, tmp_path,
                     "conversations", key="stages.sft.data")
    assert str(err.value) == ("qa.jsonl: stages.sft.data.columns.prompt: column 'query' is not in the file; its "
                              "columns are answer, question; map prompt to one of those columns")


def test_two_sources_in_one_spec_is_an_error_via_set(tmp_path, tiny, capsys):
    from alignpipe.cli import main

    code = main(["validate", str(tiny), "--set", "stages.sft.data.path=/no/such/file.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "stages.sft.data: names two sources, embedded and path" in err[0]
    assert "--set 'stages.sft.data={path: my.jsonl}'" in err[0]
    # replacing the whole mapping, as the message says, gets past that (to the missing file)
    assert main(["validate", str(tiny), "--set", "stages.sft.data={path: /no/such/file.jsonl}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_max_dropped_stops_the_stage_before_training(tmp_path):
    rows = [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(18)] + [{"messages": [bot("no user")]}] * 2
    jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_data({"path": "c.jsonl"}, tmp_path, "conversations", key="stages.sft.data")
    assert "2 of 20 rows dropped (10.0%), more than max_dropped 0.05: empty_prompt x2" in str(err.value)
    assert "lines 19, 20" in str(err.value) and "--set stages.sft.data.max_dropped=0.11" in str(err.value)
    assert len(prepare_data({"path": "c.jsonl", "max_dropped": 0.1}, tmp_path, "conversations").rows) == 18


# --------------------------------------------------------------------------- the SFT loss mask


def _tokenizer(template: str):
    from hub_layout import qwen_like_tokenizer

    tok = qwen_like_tokenizer()
    tok.chat_template = template
    return tok


def _trained_text(tok, features: dict) -> str:
    return tok.decode([t for t, m in zip(features["input_ids"], features["assistant_masks"]) if m])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_tool_calls_are_trained_on_and_tool_results_are_not(template):
    from alignpipe.data.sft_tokens import tokenize_rows
    from alignpipe.recipe.templates import BUILTIN

    tok = _tokenizer(BUILTIN[template])
    row = {"messages": TOOL_CONVERSATION, "tools": NORMAL_TOOLS}
    text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert '"name": "get_weather"' in text and "Weather of a city" in text  # the schema is in the prompt
    (features,) = tokenize_rows([row], tok)
    trained = _trained_text(tok, features)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in trained
    assert "It is sunny." in trained
    assert "sunny\"}" not in trained and "Weather in Paris" not in trained  # the tool result, the user turn


# a template that knows no tools: the embedded template before it learned tool turns (issue 39)
NO_TOOLS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def test_a_template_without_tool_support_is_refused():
    from alignpipe.data.sft_tokens import tokenize_rows

    with pytest.raises(DataError, match="does not render tool calls"):
        tokenize_rows([{"messages": TOOL_CONVERSATION, "tools": NORMAL_TOOLS}], _tokenizer(NO_TOOLS_TEMPLATE))


def test_loss_weight_zero_turns_are_not_trained_on():
    from alignpipe.data.sft_tokens import needs_own_tokens, tokenize_rows
    from alignpipe.recipe.templates import CHATML

    tok = _tokenizer(CHATML)
    rows = [{"messages": [user("hi"), {**bot("first answer"), "loss_weight": 0.0}, user("more"), bot("second")]}]
    assert needs_own_tokens(rows)
    (features,) = tokenize_rows(rows, tok)
    trained = _trained_text(tok, features)
    assert trained == "second<|im_end|>"
    with pytest.raises(DataError, match="no turn to train on"):
        tokenize_rows([{"messages": [user("hi"), {**bot("a"), "loss_weight": 0.0}]}], tok)


# --------------------------------------------------------------------------- reward pairs longer than max_length


def test_reward_pairs_keep_responses_and_cut_long_prompts_from_the_left():
    from alignpipe.recipe.templates import CHATML
    from alignpipe.reward.pairs import filter_pairs

    tok = _tokenizer(CHATML)
    long_prompt = [user("old question " * 40), bot("old answer " * 40), user("tell me " * 30 + "the last question")]
    pair = {"prompt": long_prompt, "chosen": [bot("The answer is 3.")], "rejected": [bot("No.")]}
    too_long = {"prompt": [user("q")], "chosen": [bot("word " * 300)], "rejected": [bot("No.")]}
    kept, report = filter_pairs([pair, too_long], "train", tok, max_length=60)
    assert report.truncated == 1 and report.dropped == {"too_long": 1} and report.first_rows == {"too_long": [2]}
    (fitted,) = kept
    assert fitted["chosen"] == pair["chosen"] and fitted["rejected"] == pair["rejected"]  # whole responses
    assert len(fitted["prompt"]) == 1 and fitted["prompt"][0]["content"].endswith("the last question")
    for side in ("chosen", "rejected"):
        ids = tok.apply_chat_template(fitted["prompt"] + fitted[side], tokenize=True, return_dict=True)["input_ids"]
        assert len(ids) <= 60
    assert "1 with the prompt cut from the left to fit" in report.summary()
    # rows that know their file lines (as a stage's split gives them) are reported by line
    from alignpipe.data.split import Rows

    _, by_line = filter_pairs(Rows([pair, too_long], [7, 9], "line"), "train", tok, max_length=60)
    assert by_line.first_rows == {"too_long": [9]} and "too_long x1 (first lines [9])" in by_line.summary()


# --------------------------------------------------------------------------- alignpipe data FILE


def test_data_command_shows_format_drops_and_what_is_trained(tmp_path, capsys):
    from alignpipe.cli import main

    rows = CASES["sharegpt_tools"][0] + [{"conversations": [{"from": "human", "value": "only a question"}]}]
    jsonl(tmp_path / "tools.jsonl", rows)
    assert main(["data", str(tmp_path / "tools.jsonl"), "--as", "conversations"]) == 0
    out = capsys.readouterr().out
    assert "sharegpt (detected from columns conversations" in out and "2 read -> 1 kept" in out
    assert "last_turn_not_assistant" in out and "(line 2)" in out
    assert "a stage would stop here: 50.0% of the rows are dropped" in out
    assert '«<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>»' in out
    assert '<|im_start|>tool\n{"sky": "sunny"}<|im_end|>' in out and "«It is sunny.<|im_end|>»" in out
    jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert main(["data", str(tmp_path / "p.jsonl"), "--template", "llama3"]) == 0
    out = capsys.readouterr().out
    assert "[chosen] <|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>" in out and "«bad<|eot_id|>»" in out


@pytest.mark.slow
def test_trl_trains_on_the_masks_given(tmp_path):
    """TRL's SFTTrainer takes the rows tokenized here and builds its labels from our masks."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from alignpipe.recipe.templates import CHATML
    from alignpipe.stages.sft import datasets
    from hub_layout import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    tok = _tokenizer(CHATML)
    rows = [{"messages": [user("hi"), {**bot("skip me"), "loss_weight": 0.0}, *TOOL_CONVERSATION],
             "tools": NORMAL_TOOLS}]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, bf16=False, report_to=[],
                     assistant_only_loss=True, max_length=2048, activation_checkpointing=False)
    train_ds, eval_ds = datasets(rows, rows, tok, args)  # as the sft stage does
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tok)
    labels = trainer.train_dataset[0]["labels"]
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       "It is sunny.<|im_end|>")
