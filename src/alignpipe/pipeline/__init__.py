"""Running a recipe: its plan (`plan`), the stage processes (`processes`), the runner (`runner`), the checks
before a run (`validate`, `eval_checks`) and the gates after each stage (`gates`)."""
