"""The reward model: its artifact (`artifact`: save, load, score), its pairs and its metrics."""
