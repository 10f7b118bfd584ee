"""The reward-model report (held-out pairwise accuracy, on-policy accuracy, the wrong-answer slice) of a DPO stage's
implicit reward in either form PPO can use: `ratio` beta * log(pi_dpo / pi_sft) and `likelihood` beta * log pi_dpo.
The held-out pairs are the world's; the on-policy samples are the ones the run's reward stage judged (its parent's
samples on held-out prompts, `reward/eval_samples.jsonl`), so every reward is scored on the same responses.

    .venv/bin/python scripts/likelihood_reward_report.py runs/ppo-reward '{"habit": "wrong", "habit_share": 0.6}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignpipe.data.world import World, WorldConfig
from alignpipe.recipe.schema import ModelSpec
from alignpipe.reward.implicit import load_implicit_reward
from alignpipe.reward.metrics import judged_metrics
from alignpipe.reward.onpolicy import failure_metrics


def report(reward, pairs: list[dict], samples: list[dict]) -> dict:
    prompts = [p["prompt"] for p in pairs]
    chosen = reward.score(prompts, [p["chosen"][0]["content"] for p in pairs], batch_size=256)
    rejected = reward.score(prompts, [p["rejected"][0]["content"] for p in pairs], batch_size=256)
    out = {"pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)}
    texts = [s["prompt"] for s in samples]
    scores = reward.score([[{"role": "user", "content": t}] for t in texts], [s["response"] for s in samples],
                          batch_size=256)
    passed, ended = [bool(s["judge"]) for s in samples], [bool(s["ended"]) for s in samples]
    on = judged_metrics(texts, scores, passed, [s["tokens"] for s in samples])
    out["onpolicy_accuracy"] = on.get("onpolicy_accuracy")
    fm = failure_metrics(texts, [s["response"] for s in samples], ended, passed, scores)
    out.update({k: fm[k] for k in ("onpolicy_wrong_answer_accuracy", "onpolicy_wrong_answer_pairs")})
    out["style_accuracy"] = fm["onpolicy_accuracy_by_failure_type"]["style"]["accuracy"]
    return out


def main(run: str, world_json: str) -> None:
    run_dir = Path(run)
    world = World(WorldConfig(**json.loads(world_json)))
    pairs = world.preference_rows("eval")
    samples = [json.loads(line) for line in open(run_dir / "reward" / "eval_samples.jsonl")]
    ratio = load_implicit_reward(run_dir / "dpo", ModelSpec())
    print(f"{len(pairs)} held-out pairs, {len(samples)} on-policy samples (sft passes "
          f"{sum(bool(s['judge']) for s in samples) / len(samples):.3f})")
    for name, reward in (("ratio", ratio), ("likelihood", ratio.reference_free())):
        print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in report(reward, pairs, samples).items()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
