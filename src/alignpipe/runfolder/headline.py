"""The headline metrics of a stage: the columns of the terminal table after `alignpipe run` / `show` and of
the report's summary, in this order (each shows only the metrics some stage has)."""

HEADLINE_METRICS = (
    "perplexity",  # pretraining, held out
    "unigram_perplexity",  # its baseline
    "eval_loss",
    "judge_pass_rate",  # the embedded world's judge on sampled held-out answers
    "eot_rate",  # share of samples that end their turn
    "pairwise_accuracy",  # reward model: held-out pairs
    "onpolicy_accuracy",  # reward model: its parent's judged samples
    "onpolicy_wrong_answer_accuracy",  # ... where the failing one has a wrong answer in house style
    "implicit_accuracy",  # dpo / orpo / cpo implicit reward on held-out pairs
    "mean_reward",  # the recipe's reward model on the samples
    "rm_win_rate_vs_sft",
    "refusal_rate_harmful",  # held-out harmful requests refused (alignpipe.eval.safety)
    "over_refusal_rate",  # held-out benign look-alikes refused
    "kl_to_reference",  # nats per response against the stage's start
    "train_loss",
)

# The count each headline rate is a share of (the first of these metrics a stage has), shown beside the rate:
# an accuracy of 1.000 on 2 pairs and one on 300 are not the same finding.
RATE_COUNTS = {
    "judge_pass_rate": ("judge_total",),
    "eot_rate": ("eval_samples",),
    "pairwise_accuracy": ("eval_pairs",),
    "onpolicy_accuracy": ("onpolicy_pairs",),
    "implicit_accuracy": ("implicit_accuracy_n", "pairs_held_out"),
    "rm_win_rate_vs_sft": ("eval_prompts",),  # bootstrapped over prompts
    "refusal_rate_harmful": ("refusal_rate_harmful_n",),  # answers (alignpipe.eval.safety)
    "over_refusal_rate": ("over_refusal_rate_n",),
}


def rate_count(metrics: dict, key: str) -> int | None:
    """How many items the rate `key` was measured on (None: not a rate, or not recorded)."""
    for name in RATE_COUNTS.get(key, ()):
        if isinstance(metrics.get(name), int):
            return metrics[name]
    return None


def with_count(text: str, metrics: dict, key: str) -> str:
    """`text` with its rate's count beside it: `0.882 (n=300)`."""
    n = rate_count(metrics, key)
    return text if n is None or text == "-" else f"{text} (n={n})"
