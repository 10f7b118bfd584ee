"""How well a trained reward model orders its own training pairs from a label stage, by what the rejected
response is (a wrong house-style answer, or anything else): does it fail on held-out prompts only (memorising)
or not fit them at all? Distinct pairs, at most 400 of each kind; prints one line per kind.

    .venv/bin/python scripts/reward_train_fit.py runs/onpolicy/reward/model runs/onpolicy/label
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignpipe.reward.artifact import load_reward_dir, score
from alignpipe.reward.onpolicy import failure_type


def main(model_dir: str, label_dir: str, cap: int = 400) -> None:
    artifact = load_reward_dir(Path(model_dir))
    lines = (Path(label_dir) / "pairs.jsonl").read_text().splitlines()
    distinct = {}
    for pair in (json.loads(line) for line in lines if line.strip()):
        key = (pair["prompt"][0]["content"], pair["chosen"][0]["content"], pair["rejected"][0]["content"])
        distinct.setdefault(key, pair)
    kinds: dict[str, list[dict]] = {}
    for pair in distinct.values():  # a pair's rejected response ended its turn or it would not be house style
        wrong = failure_type(pair["rejected"][0]["content"], True, False) == "wrong_answer"
        kinds.setdefault("wrong_answer" if wrong else "other", []).append(pair)
    for kind, pairs in sorted(kinds.items()):
        pairs = pairs[:cap]
        prompts = [p["prompt"] for p in pairs]
        chosen = score(artifact, prompts, [p["chosen"][0]["content"] for p in pairs])
        rejected = score(artifact, prompts, [p["rejected"][0]["content"] for p in pairs])
        right = sum(c > r for c, r in zip(chosen, rejected))
        print(f"{kind}: {len(pairs)} distinct training pairs, ordered right {right / len(pairs):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
