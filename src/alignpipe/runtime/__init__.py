"""How a run uses the machine: processes and ranks (`distributed`), threads (`threads`), padding-free batches
(`padding_free`), progress lines (`progress`) and experiment trackers (`tracking`)."""
