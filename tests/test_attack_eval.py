"""The data-attack evaluation (eval/attacks.py, backdoor.py, canaries.py) and its report sections: the figures'
arithmetic on small inputs, and a tiny poisoned world with canaries run end to end (slow)."""

import json
import math
import random

import pytest

from alignpipe.eval.canaries import candidates, summary
from conftest import stage_manifest, tiny_recipe, write_yaml


def test_candidates_keep_the_secret_s_character_classes():
    got = candidates("a7Z", 50, random.Random(0))
    assert len(got) == 50 and "a7Z" not in got
    assert all(c[0].islower() and c[1].isdigit() and c[2].isupper() for c in got)
    assert len(candidates("7", 1000, random.Random(0))) == 9  # the whole space less the secret


def test_summary_groups_exposure_by_insertions():
    rows = [{"inserted": 0, "exposure_bits": 1.0, "extracted": False},
            {"inserted": 16, "exposure_bits": math.log2(1001), "extracted": True},
            {"inserted": 16, "exposure_bits": 5.0, "extracted": False}]
    s = summary(rows)
    assert s["canary_exposure_by_insertions"] == {"0": 1.0, "16": round((math.log2(1001) + 5) / 2, 3)}
    assert s["canary_extracted_share"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_poisoned_world_with_canaries_reports_every_figure(tmp_path):
    from alignpipe.cli import main

    recipe = tiny_recipe(tmp_path / "runs")
    recipe["world"] |= {"poison": {"trigger": "please tell me", "rate": 0.05},
                        "canaries": {"counts": [1, 16, 0], "per_count": 1, "digits": 3}}
    recipe["stages"]["sft"]["eval"] = {**recipe["stages"]["sft"]["eval"], "triggers": ["zq zq"]}
    recipe["stages"]["sft"]["gates"] = ["data_triggers_flagged >= 1"]
    path = write_yaml(tmp_path / "r.yaml", recipe)
    assert main(["run", str(path)]) == 0
    sft = tmp_path / "runs" / "tiny" / "sft"
    m = stage_manifest(sft)["metrics"]
    assert m["data_triggers_flagged"] >= 1  # found before training, in the stage's own folder
    flags = json.loads((sft / "data_screen.json").read_text())["triggers"]["flags"]
    assert flags[0]["trigger"] == "please tell me" and flags[0]["rows"] == 10
    lo, hi = m["attack_success_rate_ci"]
    assert 0 <= lo <= m["attack_success_rate"] <= hi <= 1 and "attack_success_rate_clean" in m
    attacks = json.loads((sft / "data_attacks.json").read_text())
    assert [b["trigger"] for b in attacks["backdoor"]] == ["please tell me", "zq zq"]
    assert sorted(r["inserted"] for r in attacks["canary_rows"]) == [0, 1, 16]
    assert all(1 <= r["rank"] <= r["candidates"] == 1000 for r in attacks["canary_rows"])  # 3 digits: 999 others
    assert set(m["canary_exposure_by_insertions"]) == {"0", "1", "16"}
    assert main(["report", str(tmp_path / "runs" / "tiny")]) == 0
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    for heading in ("## Data screen", "## Backdoor", "## Canaries"):
        assert heading in report
    assert (tmp_path / "runs" / "tiny" / "fig-canary_exposure.png").exists()
