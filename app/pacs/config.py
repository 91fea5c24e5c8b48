"""PACS settings: a small YAML file and/or DMFNET_PACS_* environment variables, validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WatchRules(BaseModel):
    """Which studies ``dmfnet pacs watch`` fuses: an MR series plus a series of one of these modalities."""

    functional_modalities: list[Literal["CT", "PT", "NM"]] = ["PT", "NM", "CT"]
    mri_description_contains: str | None = None  # e.g. "T2"; None: any MR series
    interval_s: float = Field(30.0, gt=0)


class PacsSettings(BaseSettings):
    """Where the PACS is, how to reach it, and where fusion happens."""

    model_config = SettingsConfigDict(env_prefix="DMFNET_PACS_", extra="forbid")

    transport: Literal["dicomweb", "dimse"] = "dicomweb"
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"
    dicomweb_user: str | None = None
    dicomweb_password: str | None = None
    host: str = "127.0.0.1"
    port: int = 4242
    called_aet: str = "ORTHANC"
    calling_aet: str = "DMFNET"
    timeout_s: float = 60.0
    retries: int = Field(4, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0)
    # Fusion: a running service (URL) or, when unset, the model in this process.
    service_url: str | None = None
    service_api_key: str | None = None
    service_api_key_file: Path | None = None  # Docker/compose secret holding the service's API key
    weights: str | None = None
    watch: WatchRules = Field(default_factory=WatchRules)

    @model_validator(mode="after")
    def _key_from_file(self) -> PacsSettings:
        if self.service_api_key_file is not None and self.service_api_key is None:
            try:
                self.service_api_key = self.service_api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"service_api_key_file {self.service_api_key_file}: {exc.strerror}") from None
        return self


def load_pacs_settings(path: str | Path | None = None, **overrides) -> PacsSettings:
    """Settings from a YAML file (if given), then environment, then explicit overrides."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PacsSettings(**data)
