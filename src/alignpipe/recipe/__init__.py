"""The recipe: its typed configs (`schema`), the YAML parser (`parse`), the stage kinds' registry (`kinds`),
data specs (`dataspec`) and chat templates (`templates`). Light to import: no torch, no data loaded."""
