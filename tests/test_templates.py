"""Chat templates: the built-ins render their models' real formats, the boundary checks refuse what would
train or sample the wrong thing, and a stage refuses a parent with a different template or tokenizer."""

from __future__ import annotations

import pytest

from alignpipe.cli import main
from alignpipe.errors import AlignpipeError, RunError
from alignpipe.models import template_checks as tc
from alignpipe.pipeline.runner import run_stage
from alignpipe.pipeline.stage_templates import check_stage_templates
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.templates import CHATML, EMBEDDED, LLAMA3
from conftest import tiny_recipe, write_yaml
from hub_layout import QWEN_OWN_TEMPLATE, llama_like_tokenizer, qwen_like_tokenizer

TWO_TURNS = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": "A"}]


@pytest.fixture(scope="module")
def qwen():
    return qwen_like_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return llama_like_tokenizer()


def fresh(tok, template):
    """A copy of `tok` with `template` (tokenizers are mutated by the end-of-turn fix)."""
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


# --- the built-ins are the real formats -----------------------------------------------------------


def test_chatml_is_chatml(qwen):
    tok = fresh(qwen, CHATML)
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    assert tok.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_is_llama3(llama):
    tok = fresh(llama, LLAMA3)
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")


# --- checks that pass -------------------------------------------------------------------------------


@pytest.mark.parametrize("which,template,eot", [("qwen", CHATML, "<|im_end|>"), ("llama", LLAMA3, "<|eot_id|>")])
def test_builtin_passes_after_end_of_turn_becomes_eos(request, which, template, eot):
    tok = fresh(request.getfixturevalue(which), template)
    old_eos = tok.eos_token
    assert tc.use_end_of_turn_as_eos(tok) == eot
    assert tok.eos_token == eot
    assert tok.pad_token == old_eos  # padding stays on the old EOS (llama had none: it gets one)
    report = tc.check_template(tok, assistant_mask=True)
    assert report["end_of_turn"] == eot and report["eos"] == eot
    assert report["assistant_mask"]["turns"] == 2


def test_generation_config_stop_token_is_enough(qwen):
    tok = fresh(qwen, CHATML)  # EOS stays <|endoftext|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    report = tc.check_template(tok, assistant_mask=False, generation_eos=[tok.eos_token_id, im_end])
    assert report["end_of_turn_id"] == im_end and report["assistant_mask"] == "not used by this stage"


def test_embedded_template_on_its_own_tokenizer():
    from alignpipe.models.loading import train_tokenizer
    from alignpipe.recipe.templates import EMBEDDED_SPECIAL_TOKENS

    tok = train_tokenizer(["The answer is 7. What is 3 plus 4?"] * 20, 300, EMBEDDED_SPECIAL_TOKENS, EMBEDDED)
    assert tc.use_end_of_turn_as_eos(tok) is None  # <|end|> already is EOS
    report = tc.check_template(tok, assistant_mask=True)
    assert report["end_of_turn"] == "<|end|>" and report["generation_prompt"] == "<|assistant|>"


def test_add_stop_token_reaches_generation_config():
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=1, eos_token_id=1))
    model.generation_config = GenerationConfig(eos_token_id=1)
    tc.add_stop_token(model, 5)
    assert model.generation_config.eos_token_id == [5, 1] and model.config.eos_token_id == 5
    tc.add_stop_token(model, 5)  # idempotent
    assert model.generation_config.eos_token_id == [5, 1]


# --- checks that refuse ---------------------------------------------------------------------------


def refused(tok, match: str, **kwargs):
    with pytest.raises(tc.TemplateError) as err:
        tc.check_template(tok, **{"assistant_mask": True, **kwargs})
    assert match in str(err.value), str(err.value)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_end_of_turn_that_is_not_eos_is_refused(qwen):
    refused(fresh(qwen, CHATML), "neither the tokenizer's EOS nor a generation stop token")


def test_end_of_turn_that_is_not_a_token_is_not_made_eos(llama):
    tok = fresh(llama, CHATML)  # <|im_end|> is plain text to a Llama tokenizer
    assert tc.use_end_of_turn_as_eos(tok) is None and tok.eos_token == "<|end_of_text|>"
    refused(tok, "first token '<'")


def test_template_without_generation_markers_refused_for_assistant_only_loss(qwen):
    tok = fresh(qwen, QWEN_OWN_TEMPLATE)
    tc.use_end_of_turn_as_eos(tok)
    refused(tok, "marks no assistant tokens")
    tc.check_template(tok, assistant_mask=False)  # fine for a stage that does not mask


def test_mask_without_end_of_turn_refused(qwen):
    tok = fresh(qwen, CHATML.replace("<|im_end|>{% endgeneration %}", "{% endgeneration %}<|im_end|>"))
    tc.use_end_of_turn_as_eos(tok)
    refused(tok, "stops before the end-of-turn token")


def test_mask_over_user_turns_refused(qwen):
    everything = ("{% generation %}{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                  "'<|im_end|>\\n' }}{%- endfor -%}{% endgeneration %}"
                  "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    tok = fresh(qwen, everything)
    tc.use_end_of_turn_as_eos(tok)
    refused(tok, "spans for 2 assistant turns")


def test_ignored_generation_prompt_refused(qwen):
    tok = fresh(qwen, CHATML.split("{%- if add_generation_prompt")[0])
    tc.use_end_of_turn_as_eos(tok)
    refused(tok, "ignores add_generation_prompt")


def test_wrong_generation_prompt_refused(qwen):
    tok = fresh(qwen, CHATML.replace("{{ '<|im_start|>assistant\\n' }}{%- endif", "{{ '<|im_start|>bot\\n' }}{%- endif"))
    tc.use_end_of_turn_as_eos(tok)
    refused(tok, "is not how the template renders the start of an assistant turn")


def test_template_that_writes_nothing_after_the_answer_refused(qwen):
    tok = fresh(qwen, "{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] }}{%- endfor -%}")
    refused(tok, "writes nothing after an assistant message")


# --- across stages ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A completed tiny pretrain stage (the parent of the tests below)."""
    root = tmp_path_factory.mktemp("parent")
    path = write_yaml(root / "tiny.yaml", tiny_recipe(root / "runs"))
    assert main(["run", str(path), "--stages", "pretrain"]) == 0
    return root, path


@pytest.mark.slow
def test_sft_records_its_template_check(pretrained, tmp_path):
    import shutil

    root, _ = pretrained
    recipe = tiny_recipe(tmp_path / "runs")
    shutil.copytree(root / "runs", tmp_path / "runs")
    path = write_yaml(tmp_path / "tiny.yaml", recipe)
    assert main(["run", str(path)]) == 0
    from alignpipe.runfolder.manifests import read_manifest

    check = read_manifest(tmp_path / "runs" / "tiny" / "sft")["template_check"]
    assert check["end_of_turn"] == "<|end|>" and check["assistant_mask"]["turns"] == 2
    assert check["tokenizer"]["vocab_size"] == 300
    assert "skipped" in read_manifest(tmp_path / "runs" / "tiny" / "pretrain")["template_check"]


@pytest.mark.slow
def test_parent_with_another_template_refused(pretrained, tmp_path):
    root, _ = pretrained
    other = tmp_path / "other.jinja"
    other.write_text(EMBEDDED.replace("<|assistant|>", "<|assistant|> "))  # one space: still a different format
    recipe = load_recipe(write_yaml(tmp_path / "tiny.yaml", tiny_recipe(root / "runs", chat_template=str(other))))
    with pytest.raises(RunError, match="different chat template"):
        run_stage(recipe, "sft")  # run_recipe would rebuild the parent; a lone stage must refuse it
    assert not (root / "runs" / "tiny" / "sft").exists()


@pytest.mark.slow
def test_parent_whose_tokenizer_changed_refused(pretrained, tmp_path, capsys):
    import json
    import shutil

    root, _ = pretrained
    shutil.copytree(root / "runs", tmp_path / "runs")
    path = write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs"))
    tokenizer_json = tmp_path / "runs" / "tiny" / "pretrain" / "model" / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"])  # someone swapped the tokenizer
    tokenizer_json.write_text(json.dumps(data))
    assert main(["run", str(path), "--stages", "sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer.json of stage 'pretrain' changed after that stage completed" in err, err
    assert not (tmp_path / "runs" / "tiny" / "sft" / "manifest.json").exists()


def test_signature_sees_vocabulary_and_template(qwen, llama):
    a, b = tc.tokenizer_signature(fresh(qwen, CHATML)), tc.tokenizer_signature(fresh(qwen, LLAMA3))
    assert a["vocab_sha256"] == b["vocab_sha256"] and a["chat_template_sha256"] != b["chat_template_sha256"]
    assert tc.tokenizer_signature(fresh(llama, CHATML))["vocab_sha256"] != a["vocab_sha256"]


def test_errors_are_alignpipe_errors():
    assert issubclass(tc.TemplateError, AlignpipeError)


# --- each upstream check refuses on its own -----------------------------------------------------------

REWARD_STAGE = {"from": "sft", "data": {"embedded": "pairs"}, "eval": {"enabled": False},
                "trainer": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3}}
PPO_ON_RM = {"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"embedded": "rl_prompts"},
             "eval": {"enabled": False}, "trainer": {"total_updates": 1, "rollout_batch_size": 8, "minibatch_size": 8}}


@pytest.fixture(scope="module")
def with_reward(pretrained, tmp_path_factory):
    """pretrain (copied), sft and a reward stage, complete; a ppo stage on that reward model in the recipe."""
    import shutil

    root = tmp_path_factory.mktemp("with_reward")
    shutil.copytree(pretrained[0] / "runs", root / "runs")
    assert main(["run", str(write_yaml(root / "tiny.yaml", reward_recipe(root / "runs"))), "--stages", "reward"]) == 0
    return root


def reward_recipe(runs_dir) -> dict:
    recipe = tiny_recipe(runs_dir, extra_stages={"reward": REWARD_STAGE, "ppo": PPO_ON_RM})
    recipe["stages"]["sft"]["eval"] = {"enabled": False}
    return recipe


def _resave_as_if_trained_so(stage_dir, change) -> None:
    """Change a complete stage's saved tokenizer files, then record their hashes in its manifest, as if
    the stage had been trained with them: only the vocabulary / template check can tell."""
    import json

    from alignpipe.runfolder.manifests import fingerprint_path, write_json_atomic

    change(stage_dir / "model")
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    for name in manifest["outputs"]:
        if name != "model":
            manifest["outputs"][name] = fingerprint_path(stage_dir / "model" / name)
    write_json_atomic(stage_dir / "manifest.json", manifest)


def _add_a_token(model_dir) -> None:
    import json

    tokenizer_json = model_dir / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"])
    tokenizer_json.write_text(json.dumps(data))


def _copy_of(with_reward, tmp_path):
    import shutil

    shutil.copytree(with_reward / "runs", tmp_path / "runs")
    return load_recipe(write_yaml(tmp_path / "tiny.yaml", reward_recipe(tmp_path / "runs"))), tmp_path / "runs" / "tiny"


@pytest.mark.slow
def test_reward_model_with_another_vocabulary_refused(with_reward, tmp_path):
    recipe, runs_dir = _copy_of(with_reward, tmp_path)
    _resave_as_if_trained_so(runs_dir / "reward", _add_a_token)
    with pytest.raises(RunError, match=r"stage 'reward' was trained with a different tokenizer \(301 tokens\) "
                                       r"than this stage's \(300 tokens\)") as err:
        run_stage(recipe, "ppo")
    assert err.value.key == "stages.ppo.reward_model"
    assert not (runs_dir / "ppo").exists()


@pytest.mark.slow
def test_reward_model_with_another_template_refused(with_reward, tmp_path):
    recipe, runs_dir = _copy_of(with_reward, tmp_path)

    def other_template(model_dir):
        (model_dir / "chat_template.jinja").write_text(EMBEDDED.replace("<|assistant|>", "<|assistant|> "))

    _resave_as_if_trained_so(runs_dir / "reward", other_template)
    with pytest.raises(RunError, match="stage 'reward' was trained with a different chat template") as err:
        run_stage(recipe, "ppo")
    assert err.value.key == "stages.ppo.reward_model"
    assert not (runs_dir / "ppo").exists()


@pytest.mark.slow
def test_parent_with_another_vocabulary_refused(with_reward, tmp_path):
    """A stage's tokenizer is loaded from its parent, so through the runner the two always agree; the
    check is reached by handing the stage a tokenizer of another vocabulary (what a stage that built
    its own would hold)."""
    from alignpipe.stages.context import make_context

    recipe, runs_dir = _copy_of(with_reward, tmp_path)
    ctx = make_context(recipe, "reward")
    tokenizer = ctx.load_tokenizer()
    tokenizer.add_tokens(["zzzz"])
    with pytest.raises(RunError, match=r"stage 'sft' was trained with a different tokenizer \(300 tokens\) "
                                       r"than this stage's \(301 tokens\)") as err:
        check_stage_templates(ctx, tokenizer)
    assert err.value.key == "stages.reward.from"
    assert check_stage_templates(ctx)["tokenizer"]["vocab_size"] == 300  # its own tokenizer passes
