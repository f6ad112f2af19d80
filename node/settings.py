"""The node's settings: one typed, validated object built at start-up and passed down.

Sources, highest priority first: explicit keyword arguments, environment variables
``SEGNODE_<SECTION>__<KEY>`` (for example ``SEGNODE_DIMSE__PORT=11112``), the YAML file given
by ``--config``, then the embedded defaults below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "an AE title is 1 to 16 printable ASCII characters, not only spaces and without a backslash"
        )
    return value.strip()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeSection(Section):
    ae_title: str = Field("SEGNODE", description="This node's AE title (called AE for DIMSE peers).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)


class TlsSection(Section):
    enabled: bool = Field(False, description="Serve DIMSE over TLS.")
    certificate: Path | None = Field(None, description="PEM certificate of this node.")
    key: Path | None = Field(None, description="PEM private key of this node.")
    ca: Path | None = Field(
        None,
        description="PEM CA bundle; when given, peers must present a certificate it signed (mutual TLS).",
    )

    @model_validator(mode="after")
    def _files_present(self) -> TlsSection:
        if self.enabled:
            for name in ("certificate", "key"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{name} is required when tls.enabled is true")
            for name in ("certificate", "key", "ca"):
                value = getattr(self, name)
                if value is not None and not Path(value).is_file():
                    raise ValueError(f"{name} file {str(value)!r} does not exist")
        return self


class DimseSection(Section):
    host: str = Field("127.0.0.1", description="Address the DICOM listener binds (0.0.0.0 for all).")
    port: int = Field(11112, ge=0, le=65535, description="DICOM listener port (0 = any free port).")
    check_called_aet: bool = Field(
        True, description="Reject associations whose called AE title is not node.ae_title."
    )
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty accepts any (logged as a warning).",
    )
    max_pdu: int = Field(
        1048576,
        ge=0,
        description="Maximum PDU length we receive, bytes (0 = unlimited). Large PDUs speed up ingest.",
    )
    receivers: int = Field(
        1, ge=1, le=64, description="Receiver processes sharing the port (SO_REUSEPORT); 1 = in-process."
    )
    max_associations: int = Field(64, ge=1, description="Maximum simultaneous associations per receiver.")
    network_timeout: float = Field(60.0, gt=0, description="Seconds without data before an association ends.")
    acse_timeout: float = Field(30.0, gt=0, description="Seconds to wait for association messages.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight associations may take to finish."
    )
    tls: TlsSection = Field(default_factory=lambda: TlsSection())

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]


class DicomwebSection(Section):
    enabled: bool = Field(True, description="Serve STOW-RS and /healthz.")
    host: str = Field("127.0.0.1", description="Address the DICOMweb (STOW-RS) listener binds.")
    port: int = Field(8080, ge=0, le=65535, description="DICOMweb listener port (0 = any free port).")
    token: SecretStr | None = Field(
        None, description="Bearer token required on STOW-RS requests; unset = open."
    )
    max_request_bytes: int = Field(
        8 * 1024**3, gt=0, description="Largest STOW-RS request body accepted, bytes (larger gets 413)."
    )


class StorageSection(Section):
    path: Path = Field(Path("segnode-data"), description="Root folder: spool, database (SQLite), models.")
    min_free_bytes: int = Field(
        256 * 1024**2,
        ge=0,
        description="Refuse new instances (status 0xA700) when less than this would stay free.",
    )
    fsync: bool = Field(
        True,
        description="fsync each instance under its final spool name before acknowledging it, so it "
        "survives power loss (start-up recovery re-records a spool file whose database row was lost); "
        "false: it survives a crash of the node (kill -9), not of the machine.",
    )


class DatabaseSection(Section):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<storage.path>/segnode.db. postgresql+psycopg://...",
    )
    echo: bool = Field(False, description="Log every SQL statement.")


class CompletionSection(Section):
    quiet_seconds: float = Field(
        5.0, gt=0, description="A series is complete this long after its last association was released."
    )
    poll_seconds: float = Field(0.25, gt=0, le=10, description="How often completion is checked.")
    use_count_hints: bool = Field(
        True,
        description="Complete early when ImagesInAcquisition / NumberOfFrames say all instances arrived.",
    )


class DestinationSection(Section):
    type: Literal["dimse", "dicomweb"] = Field(description="dimse (C-STORE) or dicomweb (STOW-RS).")
    description: str = Field("", description="Free text shown in listings.")
    ae_title: str | None = Field(None, description="dimse: the peer's AE title.")
    host: str | None = Field(None, description="dimse: the peer's host name or address.")
    port: int | None = Field(None, ge=1, le=65535, description="dimse: the peer's port.")
    tls: bool = Field(False, description="dimse: use TLS (dimse.tls certificate/key/ca are used).")
    url: str | None = Field(None, description="dicomweb: the STOW-RS base URL (…/dicomweb).")
    token: SecretStr | None = Field(None, description="dicomweb: bearer token.")
    username: str | None = Field(None, description="dicomweb: basic-auth user.")
    password: SecretStr | None = Field(None, description="dicomweb: basic-auth password.")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _complete(self) -> DestinationSection:
        if self.type == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)}")
        elif not self.url or not re.match(r"^https?://", self.url):
            raise ValueError("a dicomweb destination needs url: http(s)://host:port/path")
        return self


class DispatchSection(Section):
    poll_seconds: float = Field(
        0.5, gt=0, le=60, description="How often the dispatcher looks for results to send and retries due."
    )
    backoff_base_seconds: float = Field(
        5.0, gt=0, description="First retry delay; doubles per attempt (with jitter) up to the maximum."
    )
    backoff_max_seconds: float = Field(600.0, gt=0, description="Longest delay between two attempts.")
    jitter: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of each retry delay that is random (0 = none, 1 = full jitter).",
    )
    max_attempts: int = Field(
        10, ge=1, description="Attempts per delivery before it fails for good (then the job is failed)."
    )
    breaker_threshold: int = Field(
        5, ge=1, description="Consecutive transient failures that open a destination's circuit breaker."
    )
    breaker_cooldown_seconds: float = Field(
        60.0, gt=0, description="How long an open breaker waits before one trial delivery (half-open)."
    )
    connect_timeout_seconds: float = Field(
        10.0, gt=0, description="Connecting / association negotiation time limit per attempt."
    )
    timeout_seconds: float = Field(
        120.0, gt=0, description="Time limit for one response (C-STORE response, STOW-RS reply)."
    )
    sender_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the 'sender' destination when no destination has the sender's AE title.",
    )

    @model_validator(mode="after")
    def _backoff(self) -> DispatchSection:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must be at least backoff_base_seconds")
        return self


class ExecutorSection(Section):
    enabled: bool = Field(
        True, description="Run jobs in this node (false: only receive, route and dispatch)."
    )
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes; each keeps its loaded pipelines warm between jobs."
    )
    device: str = Field("cpu", description="Where pipelines run: cpu, cuda or cuda:N.")
    preload_pipelines: bool = Field(
        True,
        description="A new worker imports every pipeline's code (torch, onnxruntime, ...) before its first "
        "job, so that no job waits seconds for imports (costs a few hundred MB of RAM per worker).",
    )
    concurrency: int = Field(
        1, ge=1, le=64, description="Jobs running at once on the device (at most workers)."
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="Device memory the warm models and running jobs may use, MB; a job waits rather "
        "than exceed it (null = no limit).",
    )
    model_memory_mb: dict[str, int] = Field(
        default_factory=dict,
        description="Memory one pipeline needs on the device, MB, by pipeline name (overrides the estimate).",
    )
    default_model_memory_mb: int = Field(
        2048, ge=1, description="Memory estimate, MB, of a pipeline not named in model_memory_mb."
    )
    job_timeout_seconds: float = Field(
        3600.0, gt=0, description="A job still running after this long has its worker killed (then retried)."
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs per job; worker crashes and timeouts retry until this many, then failed."
    )
    lane_ageing_seconds: float = Field(
        300.0,
        gt=0,
        description="Priority ageing: a routine job waiting this long ranks with a new stat job (research "
        "twice as long), so no lane starves.",
    )
    poll_seconds: float = Field(0.2, gt=0, le=10, description="How often the executor looks for work.")
    heartbeat_seconds: float = Field(
        5.0, gt=0, description="How often running jobs' heartbeats are written to the database."
    )
    stale_seconds: float = Field(
        60.0,
        gt=0,
        description="A running job whose heartbeat is older than this (its node died) is queued again.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.match(r"^(cpu|cuda|cuda:\d+)$", value):
            raise ValueError("device is cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _stale(self) -> ExecutorSection:
        if self.stale_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("stale_seconds must be more than twice heartbeat_seconds")
        return self


_DEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


SECTIONS: dict[str, type[Section]] = {
    "node": NodeSection,
    "dimse": DimseSection,
    "dicomweb": DicomwebSection,
    "storage": StorageSection,
    "database": DatabaseSection,
    "completion": CompletionSection,
    "dispatch": DispatchSection,
    "executor": ExecutorSection,
}


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEGNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    node: NodeSection = Field(default_factory=lambda: NodeSection())
    dimse: DimseSection = Field(default_factory=lambda: DimseSection())
    dicomweb: DicomwebSection = Field(default_factory=lambda: DicomwebSection())
    storage: StorageSection = Field(default_factory=lambda: StorageSection())
    database: DatabaseSection = Field(default_factory=lambda: DatabaseSection())
    completion: CompletionSection = Field(default_factory=lambda: CompletionSection())
    dispatch: DispatchSection = Field(default_factory=lambda: DispatchSection())
    executor: ExecutorSection = Field(default_factory=lambda: ExecutorSection())
    destinations: dict[str, DestinationSection] = Field(
        default_factory=dict, description="Where results go, by name; rules name them (or 'sender')."
    )

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, value: dict[str, DestinationSection]) -> dict[str, DestinationSection]:
        for name in value:
            if name == "sender" or not _DEST_NAME.match(name):
                raise ValueError(
                    f"destination name {name!r} is not allowed: 1-64 letters, digits, '-', '_', '.', "
                    "and not 'sender' (reserved for the AE that sent the study)"
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.path / 'segnode.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.storage.path / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Temporary files land here; same filesystem as the spool so a rename is atomic."""
        return self.storage.path / "incoming"


class ConfigError(Exception):
    """A configuration value is invalid; the message names key, value and what is allowed."""


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        value = err.get("input")
        shown = "<missing>" if value is None and err["type"] == "missing" else repr(value)
        if isinstance(value, dict):
            shown = "{...}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section = str(err["loc"][0]) if len(err["loc"]) > 1 else None
            allowed = sorted(SECTIONS[section].model_fields) if section in SECTIONS else sorted(SECTIONS)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        lines.append(f"  {key} = {shown}: {msg}")
    return "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, the YAML file, environment and explicit overrides."""
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if config_file is not None:
        source = f"{config_file} and environment"
        try:
            text = Path(config_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {config_file} must be a mapping of sections ({', '.join(SECTIONS)}), "
                f"not {type(loaded).__name__}"
            )
        data = loaded

    class _WithFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _YamlSource(settings_cls, data))

    try:
        return _WithFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
