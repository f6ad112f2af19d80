"""``segnode config example``: a complete, commented YAML config built from the settings model itself."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from node.settings import SECTIONS


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, SecretStr):
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, Enum):
        return json.dumps(value.value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _section_lines(model: type[BaseModel], indent: int, env_path: str) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    instance = model()
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        env = f"SEGNODE_{env_path}__{name.upper()}"
        if isinstance(value, BaseModel):
            lines.append(f"{pad}# {field.description or name}")
            lines.append(f"{pad}{name}:")
            lines.extend(_section_lines(type(value), indent + 1, f"{env_path}__{name.upper()}"))
            continue
        lines.append(f"{pad}# {field.description}  (env {env})")
        lines.append(f"{pad}{name}: {_yaml_value(value)}")
    return lines


def example_config() -> str:
    out = [
        "# segnode configuration. Every key can be overridden by an environment variable",
        "# SEGNODE_<SECTION>__<KEY>, e.g. SEGNODE_DIMSE__PORT=104. Unknown keys are errors.",
        "",
    ]
    for section, model in SECTIONS.items():
        out.append(f"{section}:")
        out.extend(_section_lines(model, 1, section.upper()))
        out.append("")
    out += [
        "# Where results go. Rules name these (or 'sender' = the AE/host that sent the study).",
        "# 'sender' replies to the calling AE title at the calling host; its port is that of a dimse",
        "# destination below with the same ae_title, else dispatch.sender_port.",
        "# More destinations can be added at run time: segnode destinations add NAME --type ...",
        "# (a name defined here wins over an added one).",
        "destinations: {}",
        "#  pacs:",
        "#    type: dimse            # C-STORE",
        "#    ae_title: PACS",
        "#    host: pacs.example.org",
        "#    port: 104",
        "#    tls: false",
        "#  orthanc-web:",
        "#    type: dicomweb         # STOW-RS",
        "#    url: http://127.0.0.1:8042/dicom-web",
        "#    token: null            # or username/password for basic auth",
        "",
    ]
    return "\n".join(out)
