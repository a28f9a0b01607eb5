"""Server settings: command-line flags override FLUX2_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from weights.layout import SAFETY_CHECKER_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUX2_")

    weights: Path | None = None  # a diffusers-layout FLUX.2 directory; None with tiny=True serves the tiny model
    tiny: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")  # output files live under <data_dir>/files
    public_url: str | None = None  # base of output file URLs; default: the URL the request came in on
    device: str | None = None  # e.g. "cuda:1"; default CUDA when present, else CPU
    dtype: str | None = None  # e.g. "bfloat16"; default bf16 on CUDA, fp32 on CPU
    fetch_timeout_s: float = 30.0  # per input image URL, redirects and the whole body included
    fetch_max_redirects: int = 5
    # hosts (exact, or *.domain) and CIDR networks that image URLs and webhooks may reach even though they are
    # loopback/private/link-local/...; e.g. "assets.studio.lan,10.20.0.0/16". Default: public addresses only.
    fetch_allow: str | None = None
    max_input_image_bytes: int = 64 * 1024 * 1024  # per input image, data URIs included
    max_input_pixels: int = 64_000_000  # width x height, checked from the header before decoding
    max_upload_bytes: int = 256 * 1024 * 1024  # a file uploaded through the storage emulation
    max_body_bytes: int = 128 * 1024 * 1024  # any other request body (413 beyond; Content-Length or streamed)
    rate_limit: str | None = None  # per API key (or client address), e.g. "20/second;600/minute"; none: no limit
    max_pending_per_key: int | None = None  # sync edits in flight + queued requests not completed; none: no limit
    ssl_certfile: Path | None = None  # with ssl_keyfile: serve https (fal's Python client speaks only https)
    ssl_keyfile: Path | None = None
    api_keys: str | None = None  # comma-separated; set: every API route needs `Authorization: Key <key>`
    api_keys_file: Path | None = None  # one key per line (keeps keys out of the environment and `ps`)
    cors_origins: str | None = None  # comma-separated origins allowed to call from a browser; none: CORS closed
    retention_s: float = 7 * 24 * 3600  # finished queue requests, their logs and files are kept this long
    retention_sweep_every_s: float = 600.0
    webhook_backoff_s: float = 1.0  # first retry delay of a failed webhook; doubles each attempt (6 attempts)
    job_timeout_s: float | None = 1800.0  # a job running longer is stopped at its next step and failed (504)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line (time, level, request_id, ...)
    # The queue: None (default) is the embedded SQLite queue under data_dir; redis://host:port/db is a Redis shared
    # by API front-ends (`serve --queue`) and GPU workers (`worker --queue`).
    queue: str | None = None
    queue_visibility_timeout_s: float = 30.0  # a worker silent this long has died: its request runs elsewhere
    worker_heartbeat_ttl_s: float = 10.0  # a worker missing from /health this long after its last heartbeat is gone
    # Output files: None (default) is <data_dir>/files; file:///DIR a directory shared by all processes;
    # s3://bucket/prefix?endpoint_url=...&urls=presigned|proxy an S3-compatible bucket (see server/file_storage.py)
    storage: str | None = None
    # Run turbo/flash on the base weights at their reduced step counts when their distilled adapter is missing
    # (logged at start-up, stated in /health and every such response's notices). Off: those endpoints answer 503.
    allow_undistilled: bool = False
    profiles: str | None = None  # comma-separated profiles this process's model serves (default: all)
    # When the served profiles all use one distilled adapter (e.g. turbo,flash), fuse it into the weights at load:
    # each step then costs a base step. Off: keep it unfused (switchable, with the low-rank matmuls per step).
    fuse_adapter: bool = True

    @field_validator("weights", "queue", "storage", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """FLUX2_WEIGHTS="" unsets what an image's environment sets (an API front-end loads no model)."""
        return None if value == "" else value

    # An image-classification model directory with an "nsfw" label (pipelines.safety); default
    # <weights>/safety_checker when present. None there: requests with enable_safety_checker answer 503 ...
    safety_checker: Path | None = None
    safety_threshold: float = 0.5  # flagged when the classifier's P(nsfw) >= this
    # ... unless the operator turns the checker off: then they are served unchecked, has_nsfw_concepts false.
    disable_safety_checker: bool = False

    def safety_checker_dir(self, weights_dir: Path) -> Path | None:
        """The checker to load: the configured one, else <weights>/safety_checker if present; None if off."""
        if self.disable_safety_checker:
            return None
        if self.safety_checker is not None:
            return self.safety_checker
        default = Path(weights_dir) / SAFETY_CHECKER_DIR
        return default if default.is_dir() else None

    # Speed and memory (pipelines.runtime): see README "Speed and memory".
    memory_mode: str = "auto"  # auto | full | multi-gpu | offload-text-encoder | model-offload | group-offload
    text_encoder_device: str | None = None  # e.g. cuda:1: the text encoder on a second GPU (multi-gpu)
    quantization: str = "auto"  # none | int8 | fp8 | int4 | auto (transformer; auto: README "Plans by card")
    memory_reserve_gb: float | None = None  # GPU memory kept for activations; unset: estimated by request size
    attention_backend: str | None = None  # a diffusers attention backend, e.g. _native_cudnn, flash, _flash_3
    compile: bool = False  # regional torch.compile of the transformer (compiled at start-up)
    compile_mode: str | None = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    acceleration_regular: str | None = None  # cache spec of acceleration "regular" (pipelines.acceleration)
    acceleration_high: str | None = None  # cache spec of acceleration "high"
    # One switch for fp8 + cuDNN attention + regional compile (Ada/Hopper; what applies elsewhere): auto | on | off.
    # auto is off until a GPU run shows it pays; quantization, attention_backend and compile, when set, override it.
    fast_path: str = "auto"
    # warm-up calls with compile: REFS[:PROFILE[:LEVEL]],...; `adapters`/`levels`: each distilled adapter loaded
    # unfused / each acceleration level (pipelines.fastpath)
    compile_warm_up: str = "1,4,adapters,levels"
    compile_cache_dir: Path | None = None  # inductor's persistent compile cache; default <data_dir>/compile-cache
    # Load full-size weights (> 8 GiB) for the CPU when torch sees no GPU (e.g. a driver too old for torch's CUDA);
    # off: serve refuses, naming the driver and torch's CUDA version. The tiny model always runs on the CPU.
    allow_cpu: bool = False

    def runtime_options(self):
        """The speed and memory settings, as pipelines.runtime takes them (each field is a setting of that name),
        with the names of those set explicitly (flags or FLUX2_* variables), which the fast path leaves alone."""
        from dataclasses import fields

        from pipelines.runtime import RuntimeOptions

        values = {f.name: getattr(self, f.name) for f in fields(RuntimeOptions) if f.name != "explicit"}
        values["compile_cache_dir"] = str(self.compile_cache_dir or self.data_dir / "compile-cache")
        return RuntimeOptions(**values, explicit=frozenset(self.model_fields_set))

    def keys(self) -> list[str]:
        from server.auth import parse_keys

        keys = parse_keys(self.api_keys)
        if self.api_keys_file is not None:
            keys += parse_keys(",".join(self.api_keys_file.read_text().splitlines()))
        return keys
