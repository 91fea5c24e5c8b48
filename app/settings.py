"""Service configuration: environment variables (DMFNET_*) or CLI flags, validated once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.images.imaging import DEFAULT_MAX_PIXELS
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE


class ServiceSettings(BaseSettings):
    """Everything ``dmfnet serve`` can be told; a bad value stops start-up with a clear message."""

    # hide_input_in_errors: a validation error must never echo a value back (the API key above all).
    model_config = SettingsConfigDict(env_prefix="DMFNET_", extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    weights: str | None = Field(
        None, description="full (shipped DM-FNet, the default), fast (shipped distilled tier), a file or "
                          "random:CONFIG; a comma list (full,fast) serves each, requests pick with `tier`")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default cuda when present")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    runtime: Literal["torch", "onnxruntime", "openvino"] | None = Field(
        None, description="torch, onnxruntime or openvino; default: onnxruntime for an fp32 pipeline on CPU, "
                          "torch for bf16 and CUDA (measured)")
    chunk_size: int | None = Field(None, ge=1, le=512, description="images per network call (default: by device and "
                                                                  "precision)")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: torch's choice)")
    model_process: bool = Field(
        True, description="run the model in its own process, so the HTTP layer's Python work never holds up "
                          "the model's operator dispatch (one GIL each)")
    tile_size: int = Field(DEFAULT_TILE, ge=32, le=4096, description="larger images are fused in tiles of this size")
    tile_overlap: int = Field(DEFAULT_OVERLAP, ge=0, le=2048, description="pixels shared by neighbouring tiles")

    max_batch_size: int = Field(8, ge=1, le=256, description="pairs fused together at most")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="how long the first request waits for company")
    queue_size: int = Field(64, ge=1, le=100_000, description="pairs waiting at most; beyond: 503 + Retry-After")
    request_timeout_s: float = Field(
        300.0, gt=0, le=86_400,
        description="deadline per request from its arrival, queue and compute (504 after; work is stopped)")
    stall_after_s: float = Field(
        360.0, gt=0, le=86_400, description="/readyz turns 503 while one batch has held the model this long")
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600,
        description="after SIGTERM: time for queued and running work to finish; then it is answered 503")
    ready_max_wait_s: float = Field(
        30.0, gt=0, le=86_400,
        description="/readyz turns 503 (busy) while new work would wait longer than this (estimated)")
    memory_budget_mb: int | None = Field(
        None, ge=16, description="decoded image memory all requests may hold (default: half of what the memory "
                                 "limit leaves after the model); beyond: 503, or 413 for a pair that never fits")
    max_batch_pairs: int = Field(32, ge=1, le=1000, description="pairs accepted by one /fuse/batch call")

    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="open HTTP connections at most (idle and slow ones are closed first "
                                              "to make room; when all are busy: 503)")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="request headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body idle this long is dropped")
    min_body_rate: int = Field(8192, ge=0, description="bytes/s a request body must average once it has had "
                               "body_timeout_s (else 408; such uploads are closed first when connections run "
                               "short); 0: no minimum")

    png_compress_level: int = Field(1, ge=0, le=9, description="deflate level of fused PNGs: 1-3 use ISA-L "
                                    "(256 px RGB: ~0.6 ms, 81 kB), 4-9 zlib (6: 10 ms, 72 kB), 0 stores")

    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body limit (413 beyond)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=64 * 64, description="per image (413 beyond)")

    api_key: SecretStr | None = Field(None, description="when set, X-API-Key is required (health exempt)")
    api_key_file: Path | None = Field(None, description="read the API key from this file (Docker/compose secrets)")
    metrics_require_key: bool = False
    log_json: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    warmup: bool = Field(True, description="one warm-up batch before /readyz turns 200")

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("api_key must be at least 16 characters (or unset to disable auth)")
        return v

    @model_validator(mode="after")
    def _key_from_file(self) -> ServiceSettings:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("set api_key or api_key_file, not both")
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"api_key_file {self.api_key_file}: {exc.strerror}") from None
            self.api_key = self._long_enough(SecretStr(key))
        return self
