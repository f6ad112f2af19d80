"""Settings: YAML file, environment overrides, validation messages, the example config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from node.config_example import example_config
from node.settings import ConfigError, load_settings
from tests.conftest import REPO, SEGNODE


def test_defaults_and_sqlite_default_under_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGNODE_STORAGE__PATH", str(tmp_path))
    s = load_settings()
    assert s.node.ae_title == "SEGNODE"
    assert s.dimse.allowed_calling_aets == []
    assert s.completion.quiet_seconds == 5
    assert s.database_url == f"sqlite:///{(tmp_path / 'segnode.db').resolve()}"


def test_yaml_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "SITE_AI"},
                "dimse": {"port": 4242, "allowed_calling_aets": ["PACS"], "max_pdu": 65536},
                "dicomweb": {"token": "s3cret", "port": 8081},
                "storage": {"path": str(tmp_path / "st")},
                "database": {"url": "postgresql+psycopg://u@127.0.0.1/db"},
                "completion": {"quiet_seconds": 2.5},
            }
        )
    )
    monkeypatch.setenv("SEGNODE_DIMSE__PORT", "11113")
    monkeypatch.setenv("SEGNODE_DIMSE__ALLOWED_CALLING_AETS", '["PACS", "CT1"]')
    s = load_settings(cfg)
    assert s.node.ae_title == "SITE_AI"
    assert s.dimse.port == 11113  # environment beats the file
    assert s.dimse.max_pdu == 65536  # the rest of the section still comes from the file
    assert s.dimse.allowed_calling_aets == ["PACS", "CT1"]
    assert s.dicomweb.token is not None and s.dicomweb.token.get_secret_value() == "s3cret"
    assert s.database_url == "postgresql+psycopg://u@127.0.0.1/db"
    assert s.completion.quiet_seconds == 2.5


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("dimse:\n  port: 70000\n", "dimse.port = 70000: Input should be less than or equal to 65535"),
        ("node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "node.ae_title = 'THIS_TITLE_IS_TOO_LONG'"),
        ("dimse:\n  prot: 104\n", "dimse.prot = 104: unknown key; allowed keys here: acse_timeout"),
        (
            "completion:\n  quiet_seconds: -1\n",
            "completion.quiet_seconds = -1: Input should be greater than 0",
        ),
        ("bogus: {}\n", "bogus = {...}: unknown key"),
        ("- a\n- b\n", "must be a mapping of sections"),
        ("dimse: [\n", "is not valid YAML"),
        ("dimse:\n  tls:\n    enabled: true\n", "certificate is required when tls.enabled is true"),
    ],
)
def test_invalid_config_names_key_value_and_allowed(tmp_path: Path, yaml_text: str, expected: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expected in str(err.value)


def test_env_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGNODE_COMPLETION__QUIET_SECONDS", "soon")
    with pytest.raises(
        ConfigError, match=r"completion.quiet_seconds = 'soon': Input should be a valid number"
    ):
        load_settings()


def test_example_config_is_complete_and_loads(tmp_path: Path) -> None:
    text = example_config()
    for key in (
        "ae_title",
        "host",
        "port",
        "allowed_calling_aets",
        "max_pdu",
        "token",
        "path",
        "url",
        "quiet_seconds",
    ):
        assert f"  {key}:" in text
    assert text.count("# ") > 20  # every key carries its comment
    cfg = tmp_path / "example.yaml"
    cfg.write_text(text)
    s = load_settings(cfg)
    assert s.dimse.port == 11112


def test_serve_with_invalid_config_fails_at_startup(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dimse:\n  port: -5\n")
    proc = subprocess.run(
        [*SEGNODE, "serve", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 2
    assert "dimse.port = -5" in proc.stderr
    assert "Traceback" not in proc.stderr
