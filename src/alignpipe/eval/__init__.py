"""The parts of a policy stage's evaluation: which prompts (`prompts`), response health (`health`),
statistics over prompts (`stats`), verifiers and judges (`verifiers`, `judges`) and lm-eval (`lm_eval`).
`alignpipe.eval.policy` samples and puts them together."""
