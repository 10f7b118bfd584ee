"""Dataset formats, sources and the validation report, on small fixture files written by each test."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.data.formats import DataError, detect_format, normalise, to_family
from alignpipe.data.report import format_report, validation_report
from alignpipe.data.sources import load_rows, prepare_data
from alignpipe.recipe.kinds import kind_of


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .jsonl / .json / .csv / .parquet, chosen by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- each format

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Go away."

# format -> (a raw row, the family, its normalised form)
CASES = {
    "text": ({"text": "the cat sat"}, "text", {"text": "the cat sat"}),
    "alpaca": (
        {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be brief."},
        "conversations",
        {"messages": [{"role": "system", "content": "Be brief."}, user("Add\n\n2 and 2"), bot("4")]},
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "conversations",
        {"messages": [{"role": "system", "content": "S"}, user("hi"), bot("yo")]},
    ),
    "messages": ({"messages": [user("hi"), bot("yo")]}, "conversations", {"messages": [user("hi"), bot("yo")]}),
    "prompt_completion": ({"prompt": "hi", "completion": "yo"}, "conversations", {"messages": [user("hi"), bot("yo")]}),
    "preference": (
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        "pairs",
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
    ),
    "hh_rlhf": (
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        "pairs",
        {
            "prompt": [user("What is 2+2?"), bot("4."), user("And 3+3?")],
            "chosen": [bot("6.")],
            "rejected": [bot("Go away.")],
        },
    ),
    "kto": (
        {"prompt": "q", "completion": "a", "label": True},
        "kto",
        {"prompt": [user("q")], "completion": [bot("a")], "label": True},
    ),
    "prompt_only": ({"prompt": "tell me a story"}, "prompts", {"prompt": [user("tell me a story")]}),
}


@pytest.mark.parametrize("fmt", list(CASES))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_format_is_detected_and_normalised_from_each_file_type(tmp_path, fmt, suffix):
    raw, family, expected = CASES[fmt]
    write_rows(tmp_path / f"d{suffix}", [raw, raw])
    (part,) = prepare_data({"path": f"d{suffix}"}, tmp_path, family).parts
    assert (part.format, part.detected, part.family) == (fmt, True, family)
    assert part.rows == [expected, expected]
    assert part.drops.total == 0


def test_json_with_data_key_and_explicit_format(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"data": [CASES["alpaca"][0]]}))
    data = prepare_data({"path": "d.json", "format": "alpaca"}, tmp_path, "conversations")
    assert data.rows == [CASES["alpaca"][2]] and not data.parts[0].detected


def test_folder_reads_every_file_and_filters_by_split(tmp_path):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "train-0.jsonl", [{"text": "a"}])
    write_rows(tmp_path / "data" / "train-1.parquet", [{"text": "b"}, {"text": "c"}])
    write_rows(tmp_path / "data" / "test.csv", [{"text": "z"}])
    train = prepare_data({"path": "data", "split": "train"}, tmp_path, "text")
    assert [r["text"] for r in train.rows] == ["a", "b", "c"]
    assert [p.source for p in train.parts] == ["data/train-0.jsonl", "data/train-1.parquet"]
    everything = prepare_data({"path": "data"}, tmp_path, "text")
    assert len(everything.rows) == 4


def test_ultrafeedback_style_pairs_split_shared_prompt_and_columns_settle_by_family(tmp_path):
    convo = [{"role": "system", "content": "S"}, user("q1"), bot("a1"), user("q2")]
    row = {
        "prompt": "q2",
        "prompt_id": "x",
        "chosen": convo + [bot("good")],
        "rejected": convo + [bot("bad")],
        "messages": convo + [bot("good")],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    write_rows(tmp_path / "uf.parquet", [row])
    pairs = prepare_data({"path": "uf.parquet"}, tmp_path, "pairs")
    assert pairs.parts[0].format == "preference"
    assert pairs.rows == [{"prompt": convo, "chosen": [bot("good")], "rejected": [bot("bad")]}]
    sft = prepare_data({"path": "uf.parquet"}, tmp_path, "conversations")
    assert sft.parts[0].format == "messages" and sft.rows == [{"messages": convo + [bot("good")]}]
    rl = prepare_data({"path": "uf.parquet"}, tmp_path, "prompts")
    assert rl.rows == [{"prompt": convo}]
    # A shared assistant turn after the last user turn stays with the responses: a prompt ends with a user turn.
    same_start = normalise([{"chosen": [user("q"), bot("a"), bot("good")], "rejected": [user("q"), bot("a"), bot("bad")]}])
    assert same_start.rows[0]["prompt"] == [user("q")] and same_start.rows[0]["chosen"] == [bot("a"), bot("good")]


def test_hh_rlhf_shared_prefix_becomes_prompt_and_anomalies_are_dropped():
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: bye"},  # no leading \n\n
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},  # identical
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},  # empty chosen
        {"chosen": "preamble\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    ]
    data = normalise(rows, "auto", family="pairs")
    assert data.format == "hh_rlhf"
    assert data.rows[0] == CASES["hh_rlhf"][2]
    assert data.rows[1] == {"prompt": [user("hi")], "chosen": [bot("hello")], "rejected": [bot("bye")]}
    assert data.drops.first_rows == {
        "identical_pair": [3], "prompt_mismatch": [4], "empty_response": [5], "unparseable": [6],
    }


def test_stage_families_and_conversions():
    assert [kind_of(k).family for k in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")] == [
        "text", "conversations", "pairs", "pairs", "prompts", "prompts",
    ]
    convo = normalise([{"messages": [user("q"), bot("a"), user("q2"), bot("a2")]}], "messages")
    assert to_family(convo, "prompts").rows == [{"prompt": [user("q"), bot("a"), user("q2")]}]
    pairs = normalise([CASES["preference"][0]], "preference")
    assert to_family(pairs, "kto").rows == [
        {"prompt": [user("q")], "completion": [bot("good")], "label": True},
        {"prompt": [user("q")], "completion": [bot("bad")], "label": False},
    ]
    assert to_family(pairs, "conversations").notes == ["sft on the chosen response of each pair"]
    text = normalise([{"text": "x"}], "text", source="t.jsonl")
    with pytest.raises(DataError, match=r"^t\.jsonl: format text: text rows are text, but this stage needs pairs; .*preference"):
        to_family(text, "pairs")
    with pytest.raises(DataError, match="needs pairs"):
        normalise([CASES["alpaca"][0]], "alpaca", family="pairs")


# --------------------------------------------------------------------------- errors


def test_ambiguous_and_unknown_columns_name_what_was_seen_and_expected():
    with pytest.raises(DataError) as err:
        detect_format([{"text": "x", "messages": [user("a")]}], "both.jsonl")
    assert str(err.value) == (
        "both.jsonl: format: auto: ambiguous: columns [messages, text] fit messages and text; "
        "set format: to one of messages, text in the recipe"
    )
    with pytest.raises(DataError) as err:
        detect_format([{"question": "q", "answer": "a"}], "qa.csv")
    msg = str(err.value)
    assert msg.startswith("qa.csv: format: auto: unknown shape: columns [answer, question] match no known format;")
    for fmt in ("alpaca", "sharegpt", "messages", "preference", "hh_rlhf", "kto", "text"):
        assert fmt in msg
    # Plain-string pairs without a prompt are neither HH nor conversational preference.
    with pytest.raises(DataError, match="unknown shape"):
        detect_format([{"chosen": "a", "rejected": "b"}], "x.jsonl")
    assert "\n" not in msg


def test_malformed_jsonl_names_file_and_line(tmp_path):
    # an invalid line is listed with the other bad rows (line numbers), not alone and first
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": ""}\n'
                                        + '{"text": "d"}\n' * 40)
    data = prepare_data({"path": "bad.jsonl", "max_dropped": 0.1}, tmp_path, "text")
    drops = data.parts[0].drops.as_dict()
    assert drops["invalid_json"]["first_rows"] == [4] and drops["empty_text"]["first_rows"] == [5]
    assert "Expecting property name enclosed in double quotes" in drops["invalid_json"]["example"]
    assert prepare_data({"path": "bad.jsonl"}, tmp_path, "text").parts[0].rows_read == 44  # 2/44 < 0.05
    with pytest.raises(DataError) as err:
        prepare_data({"path": "bad.jsonl", "max_dropped": 0.01}, tmp_path, "text", key="stages.pretrain.data")
    assert str(err.value).startswith("bad.jsonl: stages.pretrain.data: 2 of 44 rows dropped (4.5%), more than "
                                     "max_dropped 0.01: invalid_json x1 (first at 4: invalid JSON")
    assert "empty_text x1 (first at 5: 'text' is empty; line 5)" in str(err.value)
    assert str(err.value).endswith("accept more: --set stages.pretrain.data.max_dropped=0.06")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"lines\.json: line 2 column 1: invalid JSON: Extra data; .*rename it to \.jsonl"):
        load_rows({"path": "lines.json"}, tmp_path)


def test_missing_file_and_bad_spec_name_path_and_recipe_key(tmp_path):
    with pytest.raises(DataError) as err:
        load_rows({"path": "nope/x.jsonl"}, tmp_path, key="stages.sft.data")
    assert str(err.value) == (
        f"nope/x.jsonl: stages.sft.data.path: no such file or folder; relative paths are resolved against {tmp_path}"
    )
    with pytest.raises(DataError, match=r"^recipe: stages.sft.data: unknown key 'splt'"):
        load_rows({"path": "x.jsonl", "splt": "train"}, tmp_path, key="stages.sft.data")


@pytest.mark.slow
def test_offline_hub_fails_fast_with_a_clear_error(tmp_path):
    script = (
        "import time; from pathlib import Path\n"
        "from alignpipe.data.sources import load_rows\n"
        "t = time.time()\n"
        "try:\n"
        "    load_rows({'hub': 'alignpipe-test/no-such-dataset-3141', 'split': 'train'}, Path('.'), key='stages.dpo.data')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, round(time.time() - t, 2)); print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    kind_and_seconds, message = out.stdout.strip().splitlines()
    kind, seconds = kind_and_seconds.split()
    # behaviour, not timing: offline, the hub is never tried (a network wait would hit the 120 s timeout)
    assert kind == "DataError", out.stdout + out.stderr
    assert message.startswith("alignpipe-test/no-such-dataset-3141[train]: stages.dpo.data.hub: the Hugging Face hub is not reachable")
    assert "HF_HUB_OFFLINE" in message and "stages.dpo.data.path" in message


# --------------------------------------------------------------------------- report


def test_report_counts_known_bad_rows(tmp_path):
    rows = [
        {"messages": [user("q"), bot("a")]},  # line 1 ok
        {"messages": [user("q")]},  # 2 last turn not assistant
        {"messages": []},  # 3 empty conversation
        {"messages": [user("q"), bot("  ")]},  # 4 empty response
        {"messages": "hi"},  # 5 wrong type
        {"messages": None},  # 6 missing
        {"messages": [user("q"), {"role": "wizard", "content": "x"}]},  # 7 unknown role
        {"messages": [user("q2"), bot("a2")]},  # 8 ok
        {"messages": [user("q3")]},  # 9 last turn not assistant
        [1, 2],  # 10 not an object
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = validation_report(prepare_data({"path": "sft.jsonl", "max_dropped": 1}, tmp_path, "conversations"))
    assert (report["rows_read"], report["rows_kept"], report["rows_dropped"]) == (10, 2, 8)
    dropped = report["sources"][0]["dropped"]
    assert {r: (d["count"], d["first_rows"]) for r, d in dropped.items()} == {
        "last_turn_not_assistant": (2, [2, 9]),
        "empty_conversation": (1, [3]),
        "empty_response": (1, [4]),
        "wrong_type": (2, [5, 10]),
        "missing_field": (1, [6]),
        "unknown_role": (1, [7]),
    }
    assert report["tokens"] is None
    json.dumps(report)  # the caller writes it as JSON
    text = format_report(report)
    assert "10 rows read, 2 kept, 8 dropped" in text and "last_turn_not_assistant" in text and "line 2, 9" in text


def test_drops_keep_only_first_five_and_no_usable_rows_is_an_error(tmp_path):
    write_rows(tmp_path / "a.jsonl", [{"instruction": "i", "output": ""}] * 7)
    with pytest.raises(DataError) as err:
        prepare_data({"path": "a.jsonl"}, tmp_path, "conversations")
    assert str(err.value).startswith("a.jsonl: format alpaca: no usable rows out of 7 (empty_response x7 (first at 1:")
    data = normalise([{"instruction": "i", "output": ""}] * 7 + [{"instruction": "i", "output": "o"}], "alpaca")
    assert data.drops.counts == {"empty_response": 7} and data.drops.first_rows["empty_response"] == [1, 2, 3, 4, 5]


def test_kto_labels_from_csv_text(tmp_path):
    write_rows(tmp_path / "k.csv", [{"prompt": "q", "completion": "a", "label": v} for v in ("true", "False", "1", "maybe")])
    (part,) = prepare_data({"path": "k.csv", "max_dropped": 0.25}, tmp_path, "kto").parts
    assert [r["label"] for r in part.rows] == [True, False, True]
    assert part.drops.first_rows == {"wrong_type": [5]}  # line 5: the header is line 1


# --------------------------------------------------------------------------- mixtures


def test_mixture_weights_are_seeded_and_deterministic(tmp_path):
    write_rows(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(100)])
    write_rows(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    spec = {"mixture": [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}], "n": 51}
    first = prepare_data(spec, tmp_path, "text", seed=1)
    again = prepare_data(spec, tmp_path, "text", seed=1)
    other = prepare_data(spec, tmp_path, "text", seed=2)
    assert first.rows == again.rows and first.rows != other.rows
    texts = [r["text"] for r in first.rows]
    # 51 * 0.7 = 35.7 and 51 * 0.3 = 15.3: the larger remainder gets the 51st row.
    assert sum(t.startswith("a") for t in texts) == 36 and sum(t.startswith("b") for t in texts) == 15
    assert len(set(t for t in texts if t.startswith("a"))) == 36  # no repeats while rows last
    assert set(t for t in texts if t.startswith("b")) == {f"b{i}" for i in range(10)}  # 15 of 10: every row, then 5 more
    assert [(m["taken"], m["available"], m["upsampled"]) for m in first.mixture] == [(36, 100, False), (15, 10, True)]
    assert any(t.startswith("b") for t in texts[:36])  # shuffled, not one component after the other
    # Without n: the largest proportional draw that repeats nothing (b's 10 rows are its 30%).
    proportional = prepare_data({"mixture": spec["mixture"]}, tmp_path, "text")
    assert [m["taken"] for m in proportional.mixture] == [23, 10]
    with pytest.raises(DataError, match=r"recipe: data.mixture\[1\].weight: -1 is not a positive number"):
        prepare_data({"mixture": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": -1}]}, tmp_path, "text")


def test_mixture_of_different_formats_normalises_each_component(tmp_path):
    write_rows(tmp_path / "alpaca.json", [CASES["alpaca"][0]] * 4)
    write_rows(tmp_path / "chat.parquet", [CASES["sharegpt"][0]] * 4)
    spec = {"mixture": [{"path": "alpaca.json", "weight": 1}, {"path": "chat.parquet", "weight": 1}], "n": 6}
    data = prepare_data(spec, tmp_path, "conversations")
    assert [p.format for p in data.parts] == ["alpaca", "sharegpt"]
    assert sorted(len(r["messages"]) for r in data.rows) == [3] * 6


# --------------------------------------------------------------------------- token lengths


def tiny_tokenizer():
    """A word-level tokenizer: one token per whitespace word, chat markers are single special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] [PAD] hi yo q good bad the cat sat".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    wrapped.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    wrapped.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return wrapped


def test_token_length_stats_after_chat_template(tmp_path):
    tok = tiny_tokenizer()
    assert len(tok.apply_chat_template([user("hi"), bot("yo")], tokenize=True)["input_ids"]) == 6
    # Pair lengths: <|user|> q <|end|> <|assistant|> ... <|end|> = 5 + response words; the longer side counts.
    rows = [{"prompt": "q", "chosen": "good " * k, "rejected": "bad"} for k in (1, 2, 3, 4, 10)]
    write_rows(tmp_path / "p.jsonl", rows)
    data = prepare_data({"path": "p.jsonl"}, tmp_path, "pairs")
    report = validation_report(data, tok, max_length=8)
    assert report["tokens"] == {
        "rows_measured": 5, "min": 6, "median": 8, "p95": 15, "max": 15, "mean": 9.0,
        "max_length": 8, "truncated": 2, "truncated_fraction": 0.4, "prompt_fills_max_length": 0,
    }
    assert "2 (40.0%) longer than max_length 8" in format_report(report)
    # Prompts get the generation prompt; plain text gets no template.
    prompts = validation_report(prepare_data({"path": "p.jsonl"}, tmp_path, "prompts"), tok)
    assert prompts["tokens"]["max"] == 4  # <|user|> q <|end|> <|assistant|>
    write_rows(tmp_path / "t.jsonl", [{"text": "the cat sat"}, {"text": "the cat"}])
    text_data = prepare_data({"path": "t.jsonl"}, tmp_path, "text")
    text = validation_report(text_data, tok, max_length=2)["tokens"]
    assert (text["min"], text["max"], text["truncated"]) == (2, 3, 1)
    assert validation_report(text_data, tok, sample=1)["tokens"]["rows_measured"] == 1


def test_conversational_rows_need_a_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    write_rows(tmp_path / "m.jsonl", [CASES["messages"][0]])
    with pytest.raises(DataError, match="need a chat template"):
        validation_report(prepare_data({"path": "m.jsonl"}, tmp_path, "conversations"), tok)
