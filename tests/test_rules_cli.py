"""The admin CLI through its real entry point: rules, jobs, destinations; one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, SEGNODE, need_shared
from tests.factories import SeriesSpec, ct_series, write_series

RULE = """\
name: research-ct
description: every thin CT to research
priority: 5
level: series
match:
  all:
    - fact: modality
      equals: CT
    - attribute: SliceThickness
      range: {max: 3}
pipeline: {name: ct-liver, parameters: {tta: true}}
destinations: [sender, archive]
priority_lane: research
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    e["SEGNODE_STORAGE__PATH"] = str(tmp_path / "st")
    e["SEGNODE_DESTINATIONS"] = json.dumps(
        {"archive": {"type": "dimse", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11113}}
    )
    e["USER"] = "tester"
    return e


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SEGNODE, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc


def test_rules_lifecycle_with_history(env: dict[str, str], tmp_path: Path) -> None:
    listed = json.loads(run(env, "rules", "list", "--json").stdout)
    assert [r["name"] for r in listed] == ["ct-liver", "mri-cardiac"]  # shipped defaults, priority order
    rule_file = tmp_path / "r.yaml"
    rule_file.write_text(RULE)
    assert "added research-ct v1" in run(env, "rules", "add", str(rule_file), "--author", "alice").stdout
    shown = json.loads(run(env, "rules", "show", "research-ct", "--json").stdout)
    assert shown["destinations"] == ["sender", "archive"] and shown["priority_lane"] == "research"
    assert shown["parameters"] == {"tta": True}
    assert "level: series" in run(env, "rules", "show", "research-ct").stdout
    run(env, "rules", "disable", "research-ct", "--author", "bob")
    assert json.loads(run(env, "rules", "show", "research-ct", "--json").stdout)["enabled"] is False
    run(env, "rules", "enable", "research-ct")
    rule_file.write_text(RULE.replace("priority: 5", "priority: 7"))
    assert "now v4" in run(env, "rules", "edit", "research-ct", str(rule_file), "--author", "carol").stdout
    history = json.loads(run(env, "rules", "history", "research-ct", "--json").stdout)
    assert [(h["version"], h["action"], h["author"]) for h in history] == [
        (1, "add", "alice"),
        (2, "disable", "bob"),
        (3, "enable", "tester"),
        (4, "edit", "carol"),
    ]
    assert "priority: 7" in history[-1]["definition"]
    text_history = run(env, "rules", "history", "research-ct").stdout
    assert "v2" in text_history and "by bob" in text_history
    run(env, "rules", "remove", "research-ct")
    assert "research-ct" not in run(env, "rules", "list").stdout
    assert len(json.loads(run(env, "rules", "history", "research-ct", "--json").stdout)) == 5


@pytest.mark.parametrize(
    ("args", "content", "fragment"),
    [
        (["rules", "add"], "name: x\nmatch: {fact: modality, like: CT}\npipeline: ct-liver\n", "match.like"),
        (
            ["rules", "add"],
            "name: x\nmatch: {fact: modality, equals: CT}\npipeline: nope\n",
            "unknown pipeline",
        ),
        (
            ["rules", "add"],
            "name: x\nmatch: {fact: modality, equals: CT}\npipeline: ct-liver\ndestinations: [pacs]\n",
            "unknown destination 'pacs'",
        ),
        (
            ["rules", "add"],
            "name: x\nmatch: {attribute: Modality, regex: '('}\npipeline: ct-liver\n",
            "invalid regular expression",
        ),
        (["rules", "add"], "name: x\nmatch: [\n", "not valid YAML"),
        (
            ["rules", "edit", "ct-liver"],
            "name: other\nmatch: {fact: modality, equals: CT}\npipeline: ct-liver\n",
            "defines rule 'other', not 'ct-liver'",
        ),
    ],
)
def test_rule_errors_are_one_clear_line(
    env: dict[str, str], tmp_path: Path, args: list[str], content: str, fragment: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    proc = run(env, *args, str(f), ok=False)
    assert fragment in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_other_user_errors(env: dict[str, str], tmp_path: Path) -> None:
    assert "no rule named 'ghost'" in run(env, "rules", "show", "ghost", ok=False).stderr
    assert "no rule named 'ghost'" in run(env, "rules", "enable", "ghost", ok=False).stderr
    assert "cannot read" in run(env, "rules", "add", str(tmp_path / "missing.yaml"), ok=False).stderr
    f = tmp_path / "dup.yaml"
    f.write_text("name: ct-liver\nmatch: {fact: modality, equals: CT}\npipeline: ct-liver\n")
    assert "exists already" in run(env, "rules", "add", str(f), ok=False).stderr
    assert "not a duration" in run(env, "rules", "backtest", "--since", "a week", ok=False).stderr
    assert "not a job state" in run(env, "jobs", "list", "--state", "sleeping", ok=False).stderr
    assert "no job '999'" in run(env, "jobs", "show", "999", ok=False).stderr


def test_rules_test_explains_without_touching_the_database(env: dict[str, str], tmp_path: Path) -> None:
    ct = ct_series(SeriesSpec(n=22, description="ABDOMEN"))
    for ds in ct:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    folder = tmp_path / "dicom"
    write_series(ct, folder)
    (folder / "notes.txt").write_text("not dicom")
    proc = run(env, "rules", "test", str(folder), "--explain")
    assert "matched: ct-liver" in proc.stdout
    assert "PASS fact modality equals 'CT'  found='CT'" in proc.stdout
    assert "FAIL fact modality equals 'MR'" in proc.stdout
    assert "skipped" in proc.stdout and "notes.txt" in proc.stdout
    assert not (tmp_path / "st").exists()  # no database was created
    data = json.loads(run(env, "rules", "test", str(folder), "--json").stdout)
    assert data["series"][0]["matched"] == ["ct-liver"]
    assert data["series"][0]["facts"]["instance_count"] == 22
    # a candidate rule file can be dry-run before it is added
    rule_file = tmp_path / "r.yaml"
    rule_file.write_text(RULE.replace("range: {max: 3}", "range: {max: 2}"))
    proc = run(env, "rules", "test", str(folder), "--rules", str(rule_file), "--explain")
    assert "matched: no rule" in proc.stdout
    assert "FAIL SliceThickness in range value <= 2.0  found=2.5" in proc.stdout.replace("'2.5'", "2.5")
    assert not (tmp_path / "st").exists()
    assert "no DICOM series" in run(env, "rules", "test", str(tmp_path / "empty-missing"), ok=False).stderr


def test_rules_test_on_real_series(env: dict[str, str]) -> None:
    ct = need_shared("liver", "totalsegmentator_example", "example_ct_dicom")
    mr = need_shared("cardiac", "sunnybrook", "SCD0000101", "dicom")
    data = json.loads(run(env, "rules", "test", str(ct), str(mr), "--json").stdout)
    matched = {s["series_description"] or s["series_uid"]: s["matched"] for s in data["series"]}
    assert ["ct-liver"] in matched.values() and ["mri-cardiac"] in matched.values()


def test_destinations_list(env: dict[str, str]) -> None:
    rows = json.loads(run(env, "destinations", "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["sender", "archive"]
    assert rows[1]["target"] == "ARCHIVE@127.0.0.1:11113"
    assert "archive" in run(env, "destinations", "list").stdout
