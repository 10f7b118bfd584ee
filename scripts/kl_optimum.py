"""The judge pass rate of the KL-regularised optimum of PPO against a DPO stage's implicit reward, without PPO:
pi* ~ pi_sft * exp(score / c), estimated by weighting K samples of the sft stage per held-out prompt (the first 100
of the world's eval prompts) by exp(score / c) (self-normalised importance sampling). score is the reward minus 1
for a response that never ended its turn, as PPO scores it. `likelihood` scores beta * log pi_dpo (no reference)
instead of the ratio beta * log(pi_dpo / pi_sft). Prints one line per c and best-of-K by the reward (docs/ppo.md).

    .venv/bin/python scripts/kl_optimum.py runs/default 32 0.2,0.1,0.05 [ratio|likelihood] ['{"seed": 1}']
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from alignpipe.data.world import World, WorldConfig, judge
from alignpipe.eval.policy import sample
from alignpipe.models import loading
from alignpipe.recipe.schema import ModelSpec
from alignpipe.reward.implicit import load_implicit_reward

DEFAULT_WORLD = {"habit": "ramble", "habit_share": 0.45}  # recipes/default.yaml's world


def weighted_pass_rate(by_prompt: dict, score: list[float], ok: list[float], c: float) -> float:
    """Mean over prompts of the exp(score / c)-weighted judge pass rate of that prompt's samples."""
    total = 0.0
    for idx in by_prompt.values():
        top = max(score[i] for i in idx)
        w = [math.exp((score[i] - top) / c) for i in idx]
        total += sum(wi * ok[i] for wi, i in zip(w, idx)) / sum(w)
    return total / len(by_prompt)


def main(run: str, k: int, cs: list[float], form: str = "ratio", world_json: str = "{}") -> None:
    run_dir, spec = Path(run), ModelSpec()
    world = World(WorldConfig(**{**DEFAULT_WORLD, **json.loads(world_json)}))
    sft = loading.load_stage_model(run_dir / "sft", spec).eval()
    tokenizer = loading.load_tokenizer(loading.checkpoint_dir(run_dir / "sft"), spec)
    reward = load_implicit_reward(run_dir / "dpo", spec)
    if form == "likelihood":
        reward = reward.reference_free()
    rows = world.eval_prompts()[:100]
    s = sample(sft, tokenizer, [r["prompt"] for r in rows], k, 32, 1.0, 1.0, 1, 256)
    raw = reward.score([[{"role": "user", "content": p}] for p in s.prompts], s.responses, batch_size=256)
    ok = [float(judge(p, r) and e) for p, r, e in zip(s.prompts, s.responses, s.ended)]
    score = [x - (0.0 if e else 1.0) for x, e in zip(raw, s.ended)]
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(s.prompts):
        by_prompt.setdefault(p, []).append(i)
    print(f"{form}: sft samples pass {sum(ok) / len(ok):.3f} ({len(ok)})")
    for c in cs:
        print(f"c={c}: judge pass rate of the optimum {weighted_pass_rate(by_prompt, score, ok, c):.3f}")
    best = sum(ok[max(idx, key=lambda i: score[i])] for idx in by_prompt.values()) / len(by_prompt)
    print(f"best-of-{k} by the reward: {best:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [float(c) for c in sys.argv[3].split(",")], *sys.argv[4:6])
