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
