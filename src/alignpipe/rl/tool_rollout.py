"""GRPO rollouts that execute tools, through TRL's own `rollout_func=` hook of GRPOTrainer (TRL 1.16): it receives
the per-process prompts (on the transformers path each already repeated num_generations times) and the trainer,
and returns prompt and completion ids, `env_mask` (TRL's tool mask: 0 for tool-turn tokens, which get no loss),
and extra columns the reward functions receive (`final_answer`, `calls`). The episode itself is
models/tool_episode.py.

TRL's built-in `tools=` loop was not used: it parses calls with the tokenizer's `response_template`, which TRL
sets only for the chat templates of known hub models (Qwen3, ...), not for the embedded or a user's template.
RLOOTrainer takes neither hook. alignpipe's own PPO (rl/rollout.py) does not take tools: its rollout samples one
contiguous response per prompt for a value head, and a tool turn in the middle needs per-token masks through its
advantages (GAE over masked positions), value loss and KL; see docs/tools.md.
"""

from __future__ import annotations

from alignpipe.data.tools import Tool
from alignpipe.models.tool_episode import run_episode, sampling_step


def grpo_rollout_func(tools: dict[str, Tool], max_turns: int, max_tokens: int, timeout_s: float = 2.0):
    """TRL GRPOTrainer's `rollout_func(prompts, trainer) -> dict`: one episode per prompt given (TRL repeats each
    prompt num_generations times before the call on the transformers path), with the policy unwrapped."""

    def rollout_func(prompts: list, trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        step = sampling_step(model, trainer.temperature, trainer.top_p)
        episodes = [run_episode(step, trainer.processing_class, p, tools, max_turns, max_tokens, True, timeout_s)
                    for p in prompts]
        if was_training:
            model.train()
        stats = trainer.__dict__.setdefault("_alignpipe_tool_stats", {"calls": 0, "failed": 0, "episodes": 0})
        stats["calls"] += sum(len(e.calls) for e in episodes)
        stats["failed"] += sum(e.failed_calls for e in episodes)
        stats["episodes"] += len(episodes)
        return {"prompt_ids": [e.prompt_ids for e in episodes], "completion_ids": [e.completion_ids for e in episodes],
                "logprobs": None, "env_mask": [e.mask for e in episodes],
                "final_answer": [e.final for e in episodes], "calls": [e.calls for e in episodes]}

    return rollout_func
