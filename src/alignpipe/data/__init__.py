"""Data: the embedded task world (`world`), dataset formats and sources, the held-out split, validation reports."""
