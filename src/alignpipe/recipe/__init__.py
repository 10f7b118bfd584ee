"""The recipe: its schema and parser (`schema`), the stage kinds' registry (`kinds`), data specs (`dataspec`)
and chat templates (`templates`). Light to import: no torch, no data loaded."""
