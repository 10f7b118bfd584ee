"""Comparisons on a policy's own samples: the `label` stage's queue, its labellers, the pairs it writes, and
the local labelling page (`alignpipe label`). See docs/labelling.md."""
