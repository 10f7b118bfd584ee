"""Run folders: a stage's manifest and fingerprints (`manifests`), its versions (`versions`), the run's lock
(`lock`), the metrics a run shows first (`headline`), and the one atomic writer and JSONL reader (`files`)."""
