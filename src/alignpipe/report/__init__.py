"""The run's report: the document (`document`), its figures (`figures`) and the plotting (`plots`)."""
