"""Server settings: command-line flags override FLUX2_* environment variables, which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from weights.layout import SAFETY_CHECKER_DIR

RESTARTS_ENV = "FLUX2_SUPERVISED_RESTARTS"  # set by the supervisor in its child: how often it was started again


def parse_keys(value: str | None) -> list[str]:
    """Items of a comma-separated setting (API keys, CORS origins), blanks dropped."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


class Settings(BaseSettings):
    """Every setting, declared once: its type, default and description. The flags of `serve`, `worker` and `edit`
    (server/cli/flags.py) and README's configuration table are generated from these fields."""

    model_config = SettingsConfigDict(env_prefix="FLUX2_")

    weights: Path | None = Field(
        None, description="FLUX.2 [dev] in diffusers layout; checked by `weights verify` before loading"
    )
    tiny: bool = Field(
        False, description="serve the tiny random-weight model (the default on a machine without CUDA and weights)"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    data_dir: Path = Field(Path("data"), description="output files go to DATA_DIR/files, the SQLite queue beside them")
    public_url: str | None = Field(
        None,
        description="base of the URLs answers hand out (status/result/cancel, files; behind a proxy, NAT, Docker); "
        "default: the request's Host without keys, with keys only a FLUX2_ALLOWED_HOSTS name, else the address "
        "the connection arrived on",
    )
    device: str | None = Field(None, description="torch device, e.g. `cuda:1`; default: CUDA if present, else CPU")
    dtype: str | None = Field(None, description="torch dtype name, e.g. `bfloat16`; default: bf16 on CUDA, fp32 on CPU")
    fetch_timeout_s: float = Field(
        30.0, description="seconds per input image URL, all redirects and the whole body included"
    )
    fetch_max_redirects: int = Field(5, description="redirects followed per input image URL")
    fetch_allow: str | None = Field(
        None,
        description="hosts (`assets.lan`, `*.studio.lan`) and CIDR networks (`10.20.0.0/16`) that image URLs and "
        "webhooks may reach although they are loopback/private/link-local (SECURITY.md); default: public only",
    )
    max_input_image_bytes: int = Field(
        64 * 1024 * 1024, description="bytes per input image (downloaded or in a data URI)"
    )
    max_input_pixels: int = Field(
        64_000_000, description="width × height of an input image, read from its header before decoding"
    )
    max_output_pixels: int = Field(
        2048 * 2048,
        ge=64 * 64,
        description="width × height of an output image (default: the API's largest, 2048²); larger sizes are a 422 "
        "naming image_size. Lower it where the GPU can't hold the largest",
    )
    max_upload_bytes: int = Field(
        256 * 1024 * 1024, description="bytes per file uploaded through the storage emulation"
    )
    max_pending_upload_bytes: int = Field(
        1024 * 1024 * 1024,
        description="bytes of multipart upload parts kept (in the queue) for all uploads not completed (413 beyond)",
    )
    max_body_bytes: int = Field(128 * 1024 * 1024, description="bytes of any request body but uploads (413 beyond)")
    min_free_disk_bytes: int = Field(
        512 * 1024 * 1024,
        description="free bytes the data directory keeps: below it, new requests and uploads are refused (507)",
    )
    read_timeout_s: float = Field(
        30.0, description="seconds a client may send nothing while the server waits for its request head or body"
    )
    max_connections: int = Field(
        512, description="open client connections served at once; beyond, requests are answered 503"
    )
    rate_limit: str | None = Field(
        None, description="per API key (or client address), e.g. `20/second;600/minute` (429 beyond); default: none"
    )
    max_pending_per_key: int | None = Field(
        None, description="sync edits in flight + queued requests not completed, per key (429 beyond); default: none"
    )
    ssl_certfile: Path | None = Field(None, description="serve https with this certificate (see `flux2-server tls`)")
    ssl_keyfile: Path | None = Field(None, description="the certificate's private key")
    api_keys: str | None = Field(
        None,
        description="comma-separated keys; set: every API route needs `Authorization: Key <key>` (environment only, "
        "to keep keys out of `ps`)",
    )
    allow_open_api: bool = Field(
        False,
        description="`serve` listens beyond loopback (`--host 0.0.0.0`) without API keys; off: it refuses to start",
    )
    api_keys_file: Path | None = Field(
        None, description="API keys, one per line, `#` lines ignored (added to FLUX2_API_KEYS)"
    )
    operator_keys: str | None = Field(
        None,
        description="comma-separated operator keys: valid API keys that also see and cancel every caller's requests "
        "(another key sees only its own) (environment only)",
    )
    operator_keys_file: Path | None = Field(
        None, description="operator keys, one per line, `#` lines ignored (added to FLUX2_OPERATOR_KEYS)"
    )
    trusted_proxies: str | None = Field(
        None,
        description="comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto are believed (client "
        "address for rate limits and logs); default: none, not even loopback",
    )
    allowed_hosts: str | None = Field(
        None,
        description="comma-separated names this server is reached under; without API keys, requests whose Host or "
        "Origin is another name are refused (DNS rebinding). IP addresses, `localhost` and PUBLIC_URL's are always "
        "allowed. With keys: the Hosts answers' URLs may name (see PUBLIC_URL)",
    )
    cors_origins: str | None = Field(
        None, description="comma-separated origins whose pages may call the API; default: none (CORS closed)"
    )
    retention_s: float = Field(
        7 * 24 * 3600, description="seconds finished requests, their logs and files are kept (default 7 days)"
    )
    retention_sweep_every_s: float = Field(600.0, description="seconds between sweeps of expired requests and files")
    webhook_backoff_s: float = Field(
        14.0, description="first webhook retry delay in seconds (doubling: 10 attempts over about 2 hours, as fal)"
    )
    webhook_attempts: int = Field(10, description="attempts per webhook delivery (fal: 10)")
    webhook_timeout_s: float = Field(10.0, description="seconds one webhook delivery attempt may take")
    webhook_resume_every_s: float = Field(
        30.0,
        description="seconds between looks for webhook deliveries left by a process that stopped; any process on the "
        "queue resumes one once its lease ran out (its next attempt + WEBHOOK_TIMEOUT_S + this)",
    )
    webhook_user_id: str = Field(
        "flux2-server", description="the user id webhooks are signed for (`X-Fal-Webhook-User-Id`; fal: your account)"
    )
    stream_keepalive_s: float = Field(
        15.0, description="seconds between keep-alive comments on a quiet status stream (as fal's, every 15 s)"
    )
    job_timeout_s: float | None = Field(
        1800.0, description="seconds a job may run; a job running longer is stopped at its next step and failed (504)"
    )
    step_timeout_s: float | None = Field(
        600.0,
        description="seconds one denoising step may take (the first: with fetching the inputs and encoding the prompt; "
        "the last: with storing the files); a job past it is failed (504) and this worker takes nothing new until "
        "the step returns. With Redis, its claim is no longer renewed either",
    )
    breaker_failures: int = Field(
        3,
        description="Redis: after this many failures in a row that are the worker's (not the input's), it stops taking "
        "requests for BREAKER_COOLDOWN_S (/health: `out_of_rotation`); the requests it failed run on other workers. "
        "0: never",
    )
    breaker_cooldown_s: float = Field(
        60.0,
        description="Redis: seconds a worker stays out of rotation; then it tries one request (a failure: out again). "
        "Also how long other workers get first go at a request it failed",
    )
    sync_timeout_s: float = Field(
        3600.0,
        description="seconds a sync call waits for its result (queue wait included); then its request is cancelled "
        "and the call answered 504 (use the queue API for longer jobs). A caller that disconnects cancels it too",
    )
    prefetch_requests: int = Field(
        2,
        ge=0,
        description="queued requests whose inputs are fetched and decoded while the model runs another (they stay "
        "IN_QUEUE until it takes them), and on an idle model a sync request's while it is stored; 0: none, each "
        "fetched when the model is free",
    )
    prefetch_memory_mib: int = Field(
        1024, ge=0, description="MiB of decoded input images held ahead of the model; no more is fetched beyond it"
    )
    output_async: bool = Field(
        True,
        description="encode and store a request's images while the model runs the next; off: before it takes the next",
    )
    encode_threads: int = Field(
        4, ge=1, description="threads encoding and storing output images, a request's side by side"
    )
    png_encoder: Literal["fpng", "pillow"] = Field(
        "fpng",
        description="`fpng`: fast PNGs (~20x Pillow's speed, ~14 % larger files than Pillow's default level 6); "
        "`pillow`: Pillow at PNG_COMPRESS_LEVEL",
    )
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of the `pillow` PNG encoder (1: fastest that compresses; 9: smallest)"
    )
    supervise: bool = Field(
        True,
        description="run `serve`/`worker` in a child process that is started again if it dies; off: in this "
        "process (restarting left to your process manager)",
    )
    log_level: str = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per line (time, level, request_id, ...)"
    )
    queue: str | None = Field(
        None,
        description="`redis://HOST:PORT/DB`: the queue shared by front-ends and workers (scale-out); default: the "
        "embedded SQLite queue under DATA_DIR. `serve` without --weights/--tiny then serves the API alone",
    )
    queue_visibility_timeout_s: float = Field(
        30.0, description="Redis: seconds a worker may be silent before its request runs on another"
    )
    queue_timeout_s: float = Field(
        5.0, description="Redis: seconds to connect or for a reply before the queue counts as unreachable (503)"
    )
    queue_retry_max_s: float = Field(
        30.0,
        description="Redis unreachable: the longest wait between a worker's tries to record a result or take work "
        "(doubling from 0.5 s); it holds a finished result meanwhile",
    )
    queue_unserved_timeout_s: float = Field(
        600.0,
        description="API front-end: queued requests for a profile no live worker has served for this long are failed "
        "(503); submits for a profile no live worker serves are refused at once (503 with Retry-After)",
    )
    queue_ca_file: Path | None = Field(
        None, description="`rediss://` queue: CA certificate (PEM) the Redis server's certificate is checked against"
    )
    worker_heartbeat_ttl_s: float = Field(
        10.0, description="seconds a worker stays in `/health`'s list after its last heartbeat"
    )
    storage: str | None = Field(
        None,
        description="where output files go: `file:///DIR` (a shared directory) or "
        "`s3://BUCKET/PREFIX?endpoint_url=...&urls=presigned|proxy`; default: DATA_DIR/files",
    )
    allow_undistilled: bool = Field(
        False,
        description="run turbo/flash on the base weights when their distilled adapter is missing (stated in "
        "/health and each response's notices); off: they answer 503",
    )
    profiles: str | None = Field(None, description="comma-separated profiles this process's model serves; default: all")
    fuse_adapter: bool = Field(
        True,
        description="when the served profiles all use one distilled adapter (`turbo,flash`), fuse it into the "
        "weights at load (each step costs a base step); off: keep it switchable",
    )
    # LoRA endpoints (pipelines.loras, server.service.loras): see README "LoRAs".
    lora_dir: Path | None = Field(
        None,
        description="LoRA library: a `loras[].path` that is not a URL names a `.safetensors` file in this folder "
        "(`style` or `style.safetensors`, subfolders too; a folder holding one file names it); default: none, URLs only",
    )
    max_lora_bytes: int = Field(
        1024 * 1024 * 1024, description="bytes of one LoRA file (downloaded, uploaded or in the library)"
    )
    lora_fetch_timeout_s: float = Field(300.0, description="seconds per LoRA URL, all redirects and the body included")
    max_loaded_loras: int = Field(
        4,
        ge=3,
        description="LoRAs kept loaded beside the transformer (switched per request without reloading); the least "
        "recently used is unloaded beyond",
    )

    @field_validator("weights", "queue", "storage", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """FLUX2_WEIGHTS="" unsets what an image's environment sets (an API front-end loads no model)."""
        return None if value == "" else value

    safety_checker: Path | None = Field(
        None,
        description="NSFW image classifier directory (transformers, an `nsfw` label); default: "
        "WEIGHTS/safety_checker if present. Without one, enable_safety_checker requests answer 503",
    )
    safety_threshold: float = Field(0.5, description="flag an image when the classifier's P(nsfw) ≥ this")
    disable_safety_checker: bool = Field(
        False, description="serve unchecked: has_nsfw_concepts false, and a notice says so"
    )

    def safety_checker_dir(self, weights_dir: Path) -> Path | None:
        """The checker to load: the configured one, else <weights>/safety_checker if present; None if off."""
        if self.disable_safety_checker:
            return None
        if self.safety_checker is not None:
            return self.safety_checker
        default = Path(weights_dir) / SAFETY_CHECKER_DIR
        return default if default.is_dir() else None

    # Several GPUs (pipelines.gpu_groups, pipelines.parallel): see README "Several GPUs in one box".
    gpus: str | None = Field(
        None,
        description="`all` or GPU indices like `0,1,2,3`: one model per GPU (replicas), each taking requests from "
        "the same queue; with `--device cpu`, that many CPU processes; default: one model in this process",
    )
    parallel: Literal["none", "context"] = Field(
        "none", description="`context`: split each request across a group of GPUs (Ulysses context parallel)"
    )
    group_size: int | None = Field(None, description="GPUs per context-parallel group (default: all of --gpus)")

    # Speed and memory (pipelines.runtime): see README "Speed and memory".
    memory_mode: str = Field(
        "auto", description="`auto`, `full`, `multi-gpu`, `offload-text-encoder`, `model-offload`, `group-offload`"
    )
    text_encoder_device: str | None = Field(None, description="e.g. `cuda:1`: the text encoder on a second GPU")
    quantization: str = Field(
        "auto",
        description="transformer weights: `none`, `int8`, `fp8`, `int4` (torchao), or `auto`: the plan per card "
        "(README: Plans by card), which may also cut and quantize the text encoder",
    )
    memory_reserve_gb: float | None = Field(
        None, description="GiB of GPU memory kept for activations; unset: estimated from the request size"
    )
    attention_backend: str | None = Field(
        None, description="e.g. `_native_cudnn`, `flash`, `_flash_3` (`*_hub` refused); default: diffusers' (SDPA)"
    )
    compile: bool = Field(False, description="regional `torch.compile` of the transformer blocks (at start-up)")
    compile_mode: str | None = Field(
        None, description="torch.compile mode, e.g. `max-autotune-no-cudagraphs` (CUDA-graph modes are refused)"
    )
    acceleration_regular: str | None = Field(
        None, description="cache spec of acceleration `regular`, or `none` to turn it off (README: Speed and memory)"
    )
    acceleration_high: str | None = Field(None, description="cache spec of acceleration `high`, or `none`")
    fast_path: str = Field(
        "auto",
        description="one switch for fp8 + cuDNN attention + regional compile (Ada/Hopper; what applies elsewhere): "
        "`auto`, `on`, `off`; `auto` is off until a GPU run shows it pays; quantization, attention_backend and "
        "compile, when set, override their part",
    )
    compile_warm_up: str = Field(
        "1,4,adapters,levels",
        description="warm-up calls with compile: `REFS[:PROFILE[:LEVEL]],...` (REFS 0-4; 0: text to image); "
        "`adapters`/`levels`: each distilled adapter loaded unfused / each acceleration level",
    )
    compile_cache_dir: Path | None = Field(
        None, description="inductor's persistent compile cache; default `<data_dir>/compile-cache`"
    )
    allow_cpu: bool = Field(
        False,
        description="load full-size weights (> 8 GiB) on the CPU when torch sees no GPU (e.g. a driver too old for "
        "torch's CUDA); off: serve refuses, naming the driver and torch's CUDA version",
    )

    def runtime_options(self):
        """The speed and memory settings, as pipelines.runtime takes them (each field is a setting of that name),
        with the names of those set explicitly (flags or FLUX2_* variables), which the fast path leaves alone."""
        from dataclasses import fields

        from pipelines.runtime import RuntimeOptions

        values = {f.name: getattr(self, f.name) for f in fields(RuntimeOptions) if f.name != "explicit"}
        values["compile_cache_dir"] = str(self.compile_cache_dir or self.data_dir / "compile-cache")
        return RuntimeOptions(**values, explicit=frozenset(self.model_fields_set))

    def keys(self) -> list[str]:
        """Every key that opens the API: the API keys and the operator keys."""
        return _keys(self.api_keys, self.api_keys_file) + self.operators()

    def operators(self) -> list[str]:
        """The keys that see every caller's requests (see server/http/auth.py)."""
        return _keys(self.operator_keys, self.operator_keys_file)


def _keys(listed: str | None, file: Path | None) -> list[str]:
    keys = parse_keys(listed)
    if file is not None:
        lines = file.read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return keys
