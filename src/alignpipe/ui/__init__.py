"""`alignpipe ui`: a local web page over run folders (runs and lineage, live progress, curves, verdicts,
samples beside the parent's, compare), read-only but for the labelling page it can open."""
