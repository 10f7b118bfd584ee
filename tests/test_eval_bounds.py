"""A bounded evaluation (issue #34): prompts longer than the model's context are cut from the left (or
skipped, counted) to leave room for max_new_tokens; batches are sized by their estimated memory, not by count."""

from __future__ import annotations

import pytest

from alignpipe.errors import EvalError
from alignpipe.eval.budget import batch_bytes, cut_from_left, fit_prompts, plan_batches, prompt_budget


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hub_layout import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("hub") / "tiny-qwen2")
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) + 2 for m in messages)


def test_cut_from_left_drops_early_turns_then_the_start_of_the_earliest():
    turns = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
             {"role": "user", "content": "c" * 10}]
    assert cut_from_left(turns, chars, 100) == turns  # fits: as it is
    assert cut_from_left(turns, chars, 12) == turns[2:]  # whole early turns go first
    assert cut_from_left(turns, chars, 7) == [{"role": "user", "content": "c" * 5}]  # then the start, the end stays
    assert cut_from_left(turns, chars, 1) is None  # an empty turn does not fit: skipped


def test_prompts_longer_than_the_context_are_cut_to_leave_room_for_the_response(tiny):
    from alignpipe.eval.budget import rendered_length

    model, tok = tiny
    budget = prompt_budget(model, 32)
    assert budget == model.config.max_position_embeddings - 32
    long = [{"role": "user", "content": "question " * 400 + "what is 2 plus 3?"}]
    short = [{"role": "user", "content": "What is 2 plus 3?"}]
    fitted = fit_prompts(tok, [long, short], budget)
    assert (fitted.cut, fitted.skipped) == (1, 0) and fitted.prompts[1] == short
    length = rendered_length(tok)
    assert length(long) > budget >= length(fitted.prompts[0]) > budget - 8  # cut to fit, not far below
    assert fitted.prompts[0][0]["content"].endswith("what is 2 plus 3?")  # the end of the question stays
    assert "1 cut from the left to fit 224 tokens" in fitted.line("sft")
    with pytest.raises(EvalError, match="max_new_tokens 300 leaves no room"):
        prompt_budget(model, 300)


def test_sampling_long_prompts_stays_within_the_context_and_counts_them(tiny, capsys):
    from alignpipe.eval.policy import sample

    model, tok = tiny
    prompts = ["word " * 600 + f"question {i}?" for i in range(3)] + ["What is 1 plus 1?"]
    capsys.readouterr()
    out = sample(model, tok, prompts, 2, 16, seed=0, batch_size=4, stage="sft")
    assert out.cut == 3 and out.skipped == 0 and len(out.responses) == 8
    said = capsys.readouterr()
    assert "stage sft: of 4 eval prompts, 3 cut from the left to fit 240 tokens" in said.out
    assert "sampling: 100%  8/8" in said.err and "sampling: 50%  4/8" in said.err  # counted in samples
    assert out.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3] and out.prompts[0] == prompts[0]  # keyed by the full prompt
    context = model.config.max_position_embeddings
    assert all(len(p) + 16 <= context for p in out.prompt_ids)
    greedy = sample(model, tok, prompts, 2, 16, seed=0, greedy=True)
    assert len(greedy.responses) == 4  # one greedy response per prompt
    again = sample(model, tok, prompts, 2, 16, seed=5, greedy=True)
    assert greedy.responses == again.responses  # greedy: no seed matters


def test_batches_are_sized_by_memory_not_count(tiny):
    model, _ = tiny
    cfg = model.config

    def cost(seqs, width):
        return batch_bytes(cfg, seqs, width)

    assert cost(8, 256) > 3 * cost(8, 128)  # attention scores grow with the square of the width (linear: 2x)
    short = plan_batches([40] * 64, cost, cost(128, 40), max_items=128, per_item=4)
    assert short == [(0, 32), (32, 64)]  # by count: 128 sequences a batch
    budget = cost(32, 256)
    mixed = plan_batches([40] * 8 + [256] * 16 + [40] * 8, cost, budget, max_items=128, per_item=4)
    assert all(cost(4 * (e - s), 256) <= budget or e - s == 1 for s, e in mixed)
    assert [i for s, e in mixed for i in range(s, e)] == list(range(32))  # every prompt, in order, once
    assert len(mixed) > 1 and plan_batches([10_000], cost, 1, 128) == [(0, 1)]  # one prompt always makes a batch

