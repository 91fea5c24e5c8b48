"""PACS settings: a small YAML file and/or DMFNET_PACS_* environment variables, validated with pydantic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WatchRules(BaseModel):
    """Which studies ``dmfnet pacs watch`` fuses (an MR series plus a series of one of these modalities), how
    it lists them, and how it survives outages."""

    model_config = {"extra": "forbid"}

    functional_modalities: list[Literal["CT", "PT", "NM"]] = ["PT", "NM", "CT"]
    mri_description_contains: str | None = None  # e.g. "T2"; None: any MR series
    mri_prefer: list[str] = Field(default_factory=list, description="description patterns (regex, case-blind), "
                                  "best first; then the series with most images")
    mri_exclude: str | None = Field(None, description="MR series whose description matches are skipped")
    min_mr_slices: int = Field(4, ge=1, description="fewer images: a localizer/scout (often 3), skipped")
    max_mr_series: int = Field(1, ge=1, description="MR series fused per study (each with every partner)")
    since: str | None = Field(None, description="date window: YYYYMMDD or '7d' (days back); None: every study")
    page_size: int = Field(100, ge=1, description="studies per query page; keep at or below the PACS's cap")
    concurrency: int = Field(1, ge=1, le=64, description="studies in flight at once")
    decisions_file: Path | None = Field(None, description="remembered refusals (default: in cache_dir)")
    interval_s: float = Field(30.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0, description="longest wait between passes during an outage")
    health_port: int | None = Field(None, ge=0, le=65535, description="serve /healthz and /metrics here")
    stale_after_s: float = Field(900.0, gt=0, description="/healthz 503 when no pass succeeded for this long")


class PacsSettings(BaseSettings):
    """Where the PACS is, how to reach it, and where fusion happens."""

    # nested keys from the environment too: DMFNET_PACS_WATCH__HEALTH_PORT=9100
    model_config = SettingsConfigDict(env_prefix="DMFNET_PACS_", extra="forbid", env_nested_delimiter="__")

    transport: Literal["dicomweb", "dimse"] = "dicomweb"
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"
    dicomweb_user: str | None = None
    dicomweb_password: str | None = None
    host: str = "127.0.0.1"
    port: int = 4242
    called_aet: str = "ORTHANC"
    calling_aet: str = "DMFNET"
    timeout_s: float = 60.0
    retries: int = Field(12, ge=0, le=100, description="transient errors: attempts after the first, at most")
    backoff_s: float = Field(0.5, ge=0, description="first wait; doubles per attempt")
    backoff_max_s: float = Field(15.0, ge=0, description="longest single wait")
    retry_total_s: float = Field(90.0, ge=0, description="give up once retrying would pass this many seconds")
    functional_window: Literal["full", "suv", "series"] = Field(
        "full", description="PT/NM grey levels: full quantitative range (default), fixed SUVbw range, or the "
                            "series' own window")
    suv_max: float = Field(15.0, gt=0, description="top of the fixed SUVbw range (functional_window: suv)")
    registration: Literal["none", "rigid"] = Field(
        "none", description="series in different Frames of Reference: refuse (none) or register rigidly (rigid); "
                            "the YAML key 'register' is accepted too")
    register_max_rotation_deg: float = Field(15.0, gt=0, le=180, description="refuse registrations rotating more")
    register_max_translation_mm: float = Field(60.0, gt=0, description="refuse registrations moving more (mm, "
                                               "beyond the centre-of-mass alignment)")
    cache_dir: Path | None = Field(None, description="fused-slice cache (default: $XDG_CACHE_HOME/dmfnet/pacs)")
    service_batch_size: int = Field(8, ge=1, le=1000, description="slices per /fuse/batch call to the service")
    # Fusion: a running service (URL) or, when unset, the model in this process.
    service_url: str | None = None
    service_api_key: str | None = None
    service_api_key_file: Path | None = None  # Docker/compose secret holding the service's API key
    weights: str | None = None
    functional_frame: int | Literal["last"] | None = Field(
        None, description="4-D functional series (dynamic PET frames): fuse time point N (0-based, acquisition "
                          "order) or the last; None: refuse them")
    watch: WatchRules = Field(default_factory=WatchRules)
    # dmfnet pacs listen: the DICOM node a PACS or scanner pushes to (docs/pacs.md)
    listen_ae_title: str = Field("DMFNET", min_length=1, max_length=16)
    listen_port: int = Field(11112, ge=0, le=65535)
    listen_allowed_aets: list[str] = Field(default_factory=list, description="calling AE titles accepted; "
                                           "others are rejected at association (required to listen)")
    listen_allowed_hosts: list[str] = Field(default_factory=list, description="peer addresses accepted (empty: any)")
    spool_dir: Path | None = Field(None, description="received instances (default: cache_dir/spool)")
    stable_age_s: float = Field(60.0, ge=0, description="a study is fused once no instance arrived for this long")
    listen_quota_mb: int = Field(10240, ge=1, description="spool size; beyond it C-STORE answers 0xA700")
    listen_min_free_mb: int = Field(256, ge=0, description="free disk kept; below it C-STORE answers 0xA700")
    listen_failed_policy: Literal["keep", "remove"] = Field("keep", description="a study that cannot be fused")
    listen_failed_retention_s: float = Field(7 * 86400.0, gt=0, description="kept failed studies removed after")
    listen_incomplete_retention_s: float = Field(2 * 86400.0, gt=0, description="a study an association cut "
                                                 "short, never re-sent, is removed after this long quiet")
    listen_retry_max_s: float = Field(300.0, gt=0, description="longest wait between attempts to send a study")
    listen_poll_s: float = Field(1.0, gt=0, description="how often the spool is looked at")
    listen_health_port: int | None = Field(None, ge=0, le=65535, description="/healthz /readyz /metrics here")

    def listen_spool_dir(self) -> Path:
        """``spool_dir``, else ``spool`` in the cache folder."""
        if self.spool_dir is not None:
            return self.spool_dir
        return (self.cache_dir or default_cache_dir()) / "spool"

    def frame_index(self) -> int | None:
        """``functional_frame`` as the reader's index (-1: the last)."""
        return -1 if self.functional_frame == "last" else self.functional_frame

    @model_validator(mode="before")
    @classmethod
    def _register_alias(cls, data):
        if isinstance(data, dict) and "register" in data:
            data = dict(data)
            value = data.pop("register")
            data.setdefault("registration", value)
        return data

    @model_validator(mode="after")
    def _key_from_file(self) -> PacsSettings:
        if self.service_api_key_file is not None and self.service_api_key is None:
            try:
                self.service_api_key = self.service_api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"service_api_key_file {self.service_api_key_file}: {exc.strerror}") from None
        return self


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dmfnet/pacs (or ~/.cache/dmfnet/pacs)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmfnet" / "pacs"


def load_pacs_settings(path: str | Path | None = None, **overrides) -> PacsSettings:
    """Settings from a YAML file (if given), then environment, then explicit overrides."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PacsSettings(**data)
