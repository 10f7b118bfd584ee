"""Comparisons on a policy's own samples: sample responses from the `from:` stage, have a labeller rank them,
write preference pairs that a reward or dpo stage reads as `data: {from: <this stage>}`.

    label:
      from: sft                      # the policy whose samples are labelled
      data: {embedded: rl_prompts}   # its prompts: the training side of the split only
      samples_per_prompt: 2          # 2-4, sampled with the evaluation's protocol (eval: temperature, top_p, ...)
      labeller: embedded             # embedded | module:function | judge:<eval judge> | human (labelling/labellers.py)
      second_labeller: null          # also label with this one and report the agreement
      cut_off_pairs: true            # false: leave out pairs whose rejected response was cut off (no end of turn)

The folder holds `samples.jsonl` (every sample), `queue.jsonl` (the pairs of different responses to one prompt,
in a seeded random order), `labels.jsonl` (every verdict, append-only; labelling/queue.py) and `pairs.jsonl`
(the standard pairs format: a verdict `a` or `b` gives a pair; `tie` and `both_bad` give none). The manifest's
metrics hold the hashes of the samples, the labels and the pairs, so a reader of the pairs is re-run when any
changes. A `human` labeller: the stage writes the queue and waits until `min_labels` items (default: all) are
labelled on the page `alignpipe label <this folder>` serves; a killed stage resumes with the same queue.
"""

from __future__ import annotations

# Heavy imports (eval.policy, which imports torch) stay inside the functions that use them: the CLI starts without them.
import random
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.data.loading import load_family
from alignpipe.data.split import prompt_key, recipe_split
from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.labelling import labellers as lab
from alignpipe.labelling.labellers import HUMAN, check_labeller
from alignpipe.labelling.queue import QUEUE_FILE, LabelLog, current, read_log, read_queue, write_queue
from alignpipe.models.loading import device
from alignpipe.recipe.dataspec import PAIRS_FILE
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.reward.onpolicy import failure_type
from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.files import write_jsonl_atomic

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext

SAMPLES_FILE = "samples.jsonl"
EMBEDDED_PROMPTS = ("rl_prompts", "sft", "pairs")  # the world's parts whose (training) prompts can be labelled


@dataclass
class Config(StageConfig):
    labeller: str = "embedded"
    second_labeller: str | None = None
    num_prompts: int = 500  # distinct training prompts sampled (fewer when the data has fewer)
    samples_per_prompt: int = 2
    pairs_per_prompt: int = 0  # queued pairs per prompt (0: every pair of different responses)
    cut_off_pairs: bool = True  # false: no pair whose rejected response was cut off (no end of turn; counted)
    min_labels: int = 0  # human: the stage completes when this many items are labelled (0: the whole queue)
    poll_s: float = 1.0  # human: how often the stage looks at the label log


@dataclass
class NoTrainer:
    """A label stage trains nothing: any `trainer:` key is an error."""


def trainer_config_class():
    return NoTrainer


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    if cfg.from_ is None:
        raise RecipeError("a label stage samples from a policy stage", where=where, key=f"{key}.from",
                          fix="add `from: sft` (or another policy stage)")
    if not cfg.data:
        raise RecipeError("a label stage needs prompts", where=where, key=f"{key}.data",
                          fix="add `data: {embedded: rl_prompts}` or a file of prompts")
    if cfg.data.get("embedded") not in (None, *EMBEDDED_PROMPTS):
        raise RecipeError(f"embedded {cfg.data['embedded']!r} has no prompts to label", where=where,
                          key=f"{key}.data.embedded", fix=f"use one of {', '.join(EMBEDDED_PROMPTS)}")
    if not 2 <= cfg.samples_per_prompt <= 4:
        raise RecipeError(f"samples_per_prompt must be 2 to 4, got {cfg.samples_per_prompt}", where=where,
                          key=f"{key}.samples_per_prompt", fix="compare 2, 3 or 4 responses per prompt")
    if cfg.num_prompts < 1 or cfg.min_labels < 0 or cfg.pairs_per_prompt < 0:
        raise RecipeError("num_prompts must be positive, min_labels and pairs_per_prompt 0 or more", where=where,
                          key=key, fix="correct the number")
    check_labeller(recipe, name, cfg.labeller, f"{key}.labeller", where)
    check_labeller(recipe, name, cfg.second_labeller, f"{key}.second_labeller", where)
    if cfg.second_labeller == cfg.labeller:
        raise RecipeError("second_labeller is the labeller again", where=where, key=f"{key}.second_labeller",
                          fix="name another labeller, or remove it")


# --- prompts: the training side only -------------------------------------------------------------------------


def training_prompts(ctx) -> tuple[list, list[dict], int]:
    """(prompts to sample: user texts or conversations, their rows, held-out prompts left out). Embedded data:
    the world's training prompts; a file: its rows on the training side of the recipe's split."""
    limit = ctx.config.num_prompts
    if "embedded" in ctx.config.data:
        world = ctx.world
        part = ctx.config.data["embedded"]
        rows = {"rl_prompts": world.rl_prompts, "sft": world.sft_rows,
                "pairs": lambda: world.preference_rows("train")}[part]()
        heldout = {p["prompt"] for p in world.eval_prompts()} | {t.prompt for t in world.eval_tasks}
        texts, skipped = [], 0
        for row in rows:
            turns = row.get("prompt") or row.get("messages")
            text = next(m["content"] for m in turns if m["role"] == "user")
            if text in heldout:  # never: the world's products use training phrasings only; counted to show it
                skipped += 1
            elif text not in texts:
                texts.append(text)
        texts = texts[:limit]
        return texts, [{} for _ in texts], skipped

    split = recipe_split(ctx.recipe)  # the one split every stage uses: a held-out key is held out everywhere
    seen, prompts, rows, skipped = set(), [], [], 0
    for row in load_family(ctx, "prompts"):
        key = prompt_key(row)
        if split.is_heldout(key):
            skipped += 1
            continue
        if key in seen:
            continue
        seen.add(key)
        prompts.append(row["prompt"])
        rows.append(row)
    return prompts[:limit], rows[:limit], skipped


# --- the queue -------------------------------------------------------------------------------------------


def build_queue(samples, prompts: list, rows: list[dict], per_prompt: int, seed: int) -> list[dict]:
    """Pairs of different responses to the same prompt, each in a seeded random order (a/b)."""
    rng = random.Random(f"alignpipe-label:{seed}")
    by_prompt: dict[int, list[int]] = {}
    for i, p in enumerate(samples.prompt_index):
        by_prompt.setdefault(p, []).append(i)
    items = []
    for p, idx in sorted(by_prompt.items()):
        pairs = [(i, j) for n, i in enumerate(idx) for j in idx[n + 1:]
                 if samples.responses[i].strip() != samples.responses[j].strip()]
        if per_prompt and len(pairs) > per_prompt:
            pairs = rng.sample(pairs, per_prompt)
        for i, j in pairs:
            if rng.random() < 0.5:
                i, j = j, i
            prompt = prompts[p]
            items.append({"id": f"{p}-{i}-{j}", "prompt": samples.prompts[i],
                          "messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                          "a": samples.responses[i], "b": samples.responses[j], "a_ended": samples.ended[i],
                          "b_ended": samples.ended[j], "a_sample": i, "b_sample": j, "row": rows[p]})
    return items


def draw_samples(ctx, prompts: list):
    from alignpipe.eval.policy import sample

    spec, cfg = ctx.config.eval, ctx.config
    policy = ctx.load_model().to(device())
    return sample(policy, ctx.load_tokenizer(), prompts, cfg.samples_per_prompt, spec.max_new_tokens,
                  spec.temperature, spec.top_p, ctx.seed, spec.batch_size, spec.batch_memory_mb, stage=ctx.name)


def write_samples(path, samples) -> None:
    write_jsonl_atomic(path, [{"sample": i, "prompt_index": samples.prompt_index[i], "prompt": samples.prompts[i],
                               "response": samples.responses[i], "ended": samples.ended[i],
                               "tokens": samples.lengths[i]} for i in range(len(samples.responses))])


# --- labelling -------------------------------------------------------------------------------------------


def label_automatically(ctx, labeller, items: list[dict]) -> None:
    """Verdicts for the items this labeller has not labelled yet, appended to the log."""
    done = current(read_log(ctx.dir), labeller.name)
    todo = [it for it in items if it["id"] not in done]
    if not todo:
        return
    verdicts = labeller.label(todo)
    LabelLog(ctx.dir).extend([{"id": it["id"], "verdict": v, "labeller": labeller.name}
                              for it, v in zip(todo, verdicts) if v is not None])


def wait_for_people(ctx, items: list[dict]) -> None:
    """Until `min_labels` (default: all) queued items have a standing human verdict."""
    ids = {it["id"] for it in items}
    target = min(ctx.config.min_labels or len(items), len(items))
    print(f"[alignpipe] stage {ctx.name}: {len(items)} pairs queued; label them with `alignpipe label {ctx.dir}` "
          f"(the stage completes at {target})", file=sys.stderr, flush=True)
    shown = -1
    while True:
        n = len(ids & set(current(read_log(ctx.dir), HUMAN)))
        if n != shown:
            print(f"[alignpipe] stage {ctx.name}: {n} of {target} labelled", file=sys.stderr, flush=True)
            shown = n
        if n >= target:
            return
        time.sleep(ctx.config.poll_s)


def pairs_from(items: list[dict], verdicts: dict[str, str], cut_off: bool = True
               ) -> tuple[list[dict], list[bool], int, int]:
    """Pairs from the verdicts `a` / `b`, whether each rejected response ended its turn, how many were left out
    because a response is empty (no pair can hold an empty response: alignpipe.reward.pairs drops them), and how
    many because the rejected response was cut off (only when `cut_off` is false); both counted in the manifest."""
    out, rejected_ended, empty, cut = [], [], 0, 0
    for it in items:
        v = verdicts.get(it["id"])
        if v not in ("a", "b"):
            continue
        win, lose = (it["a"], it["b"]) if v == "a" else (it["b"], it["a"])
        lose_ended = it["b_ended"] if v == "a" else it["a_ended"]
        if not win.strip() or not lose.strip():
            empty += 1
            continue
        if not cut_off and not lose_ended:
            cut += 1
            continue
        out.append({"prompt": it["messages"], "chosen": [{"role": "assistant", "content": win}],
                    "rejected": [{"role": "assistant", "content": lose}]})
        rejected_ended.append(lose_ended)
    return out, rejected_ended, empty, cut


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    ctx.dir.mkdir(parents=True, exist_ok=True)
    prompts, rows, heldout_skipped = training_prompts(ctx)
    if not prompts:
        raise AlignpipeError("no training prompts to label", where=str(ctx.recipe.path), key=f"stages.{ctx.name}.data",
                             fix="give the stage prompts on the training side of the split")
    if (ctx.dir / QUEUE_FILE).is_file():  # a resumed stage labels the queue it already showed
        items = read_queue(ctx.dir)
        print(f"[alignpipe] stage {ctx.name}: resuming with its queue of {len(items)} pairs", flush=True)
    else:
        samples = draw_samples(ctx, prompts)
        write_samples(ctx.dir / SAMPLES_FILE, samples)
        items = build_queue(samples, prompts, rows, cfg.pairs_per_prompt, ctx.seed)
        write_queue(ctx.dir, items)
    labeller = lab.load_labeller(ctx, cfg.labeller)
    second = lab.load_labeller(ctx, cfg.second_labeller) if cfg.second_labeller else None
    for who in (labeller, second):
        if who is not None and not who.human:
            label_automatically(ctx, who, items)
    if labeller.human or (second is not None and second.human):
        wait_for_people(ctx, items)

    log = read_log(ctx.dir)
    verdicts = current(log, labeller.name)
    pairs, rejected_ended, empty, cut = pairs_from(items, verdicts, cfg.cut_off_pairs)
    write_jsonl_atomic(ctx.dir / PAIRS_FILE, pairs)
    counts = {v: sum(x == v for x in verdicts.values()) for v in lab.VERDICTS}
    metrics = {
        "labeller": labeller.name, "labeller_role": labeller.role, "prompts": len(prompts),
        "heldout_prompts_skipped": heldout_skipped, "samples": read_samples_count(ctx),
        "queue_items": len(items), "labelled": len(verdicts), "verdicts": counts, "pairs": len(pairs),
        "pairs_left_out_empty_response": empty, "pairs_left_out_cut_off": cut,
        "samples_sha256": runs.fingerprint_path(ctx.dir / SAMPLES_FILE) if (ctx.dir / SAMPLES_FILE).is_file() else None,
        "labels_sha256": runs.fingerprint_json(sorted(verdicts.items())),
        "pairs_sha256": runs.fingerprint_path(ctx.dir / PAIRS_FILE),
    }
    if "embedded" in cfg.data:  # what the rejected responses are, by the reward stage's failure types

        types = [failure_type(p["rejected"][0]["content"], e, False) for p, e in zip(pairs, rejected_ended)]
        metrics["pairs_by_rejected_type"] = {t: types.count(t) for t in ("wrong_answer", "style", "cut_off")}
    if second is not None:
        metrics["second_labeller"] = second.name
        metrics.update(lab.agreement(verdicts, current(log, second.name)))
    print(f"[alignpipe] stage {ctx.name}: {len(items)} pairs queued from {len(prompts)} prompts, "
          f"{len(verdicts)} labelled by {labeller.name} ({counts}), {len(pairs)} preference pairs written", flush=True)
    return metrics


def read_samples_count(ctx) -> int:
    path = ctx.dir / SAMPLES_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


# embedded=None: any part of the world gives prompts (training_prompts); policy=False: it saves no model
DECLARES = (StageKind("label", Config, run, trainer_config_class, family="prompts", embedded=None, policy=False,
                      provides="pairs", check=check),)
