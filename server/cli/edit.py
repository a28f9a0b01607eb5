"""`flux2-server edit IMAGE... --prompt ...`: one edit, in this process or on a running server, with a step bar.
`flux2-server edit --prompt ... --endpoint fal-ai/flux-2` (no IMAGE): text to image, the same way.

Locally the model is loaded here (from --weights, or the tiny model where there is no GPU and no weights) and
called through the server's own edit service (server/service/edit.py): the endpoint's input schema, sizing,
refusals and notices are the API's. With --url the
request goes through that server's queue (images sent as data URIs) and the bar follows its status stream's
step logs; the result's images are downloaded.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
import sys
import time
from pathlib import Path

import pydantic

from server.cli.flags import add_setting_flags
from server.endpoints import BY_ID, Endpoint

# --endpoint's short names (the edit endpoints); any served endpoint id is taken too (text to image: fal-ai/flux-2...)
SHORT_NAMES = {
    "edit": "fal-ai/flux-2/edit",
    "turbo": "fal-ai/flux-2/turbo/edit",
    "flash": "fal-ai/flux-2/flash/edit",
    "lora-edit": "fal-ai/flux-2/lora/edit",
}
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def endpoint_of(args: argparse.Namespace) -> Endpoint:
    return BY_ID[SHORT_NAMES.get(args.endpoint, args.endpoint)]


def check_endpoint_images(args: argparse.Namespace) -> None:
    """An edit endpoint gets IMAGE files, a text-to-image one none: said before anything loads or is sent."""
    endpoint = endpoint_of(args)
    if endpoint.takes_images and not args.images:
        text_to_image = [e.endpoint_id for e in BY_ID.values() if e.profile == endpoint.profile and not e.takes_images]
        hint = f", or --endpoint {text_to_image[0]} for text to image" if text_to_image else ""
        raise SystemExit(f"error: {endpoint.endpoint_id} edits images: give 1-4 IMAGE files{hint}")
    if not endpoint.takes_images and args.images:
        raise SystemExit(f"error: {endpoint.endpoint_id} is text to image: it takes no IMAGE")


def parse_lora(value: str) -> tuple[str, float | None]:
    """`PATH[:SCALE]`: a local .safetensors file, a URL or a name in the server's LoRA library, and its scale."""
    path, _, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if path else (value, None)
    except ValueError:  # a colon of a URL (https://...), not a scale
        return value, None


def lora_entries(args: argparse.Namespace, local_file_url) -> list[dict] | None:
    """`--lora` values as the endpoint's `loras`: a local file becomes `local_file_url(path)` (a data URI for a
    local run, an upload to the server with --url); URLs and library names are sent as given."""
    if not args.lora:
        return None
    entries = []
    for path, scale in args.lora:
        source = local_file_url(Path(path)) if Path(path).is_file() else path
        entries.append({"path": source} | ({"scale": scale} if scale is not None else {}))
    return entries


def input_body(args: argparse.Namespace, image_urls: list[str], loras: list[dict] | None = None):
    """The endpoint's own input model, so the CLI takes exactly the ranges and defaults the API does."""
    endpoint = endpoint_of(args)
    fields = {
        "prompt": args.prompt,
        "image_urls": image_urls,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "num_images": args.num_images,
        "image_size": args.image_size,
        "num_inference_steps": args.steps,
        "output_format": FORMATS.get(args.output.suffix.lower()),
        "loras": loras,
    }
    accepted = set(endpoint.input_model.model_fields) - set(getattr(endpoint.input_model, "IGNORED", ()))
    given = {k: v for k, v in fields.items() if v is not None and k in accepted}
    if loras is not None and "loras" not in given:
        raise SystemExit(
            f"error: --lora is for the LoRA endpoints only (lora-edit, fal-ai/flux-2/lora), not {args.endpoint}"
        )
    if args.steps is not None and "num_inference_steps" not in given:
        raise SystemExit(
            f"error: --steps is for the base endpoints only (edit, fal-ai/flux-2); {args.endpoint} runs a fixed schedule"
        )
    if args.output.suffix.lower() not in FORMATS:
        raise SystemExit(f"error: -o must end in one of {', '.join(FORMATS)}")
    try:
        return endpoint.input_model.model_validate(given)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"error: {problems}") from None


def parse_size(value: str):
    """`square_hd` (a fal size name) or `WIDTHxHEIGHT`."""
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    return {"width": int(match[1]), "height": int(match[2])} if match else value


def output_paths(output: Path, count: int) -> list[Path]:
    return [output] if count == 1 else [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


def progress_bar(total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="denoising", file=sys.stderr)


def edit_local(args: argparse.Namespace) -> int:
    """The model loaded here, called through the server's own edit service (the same prepare -> run -> finish
    as a request): images in as data URIs, the output back as data URIs (sync_mode), nothing stored."""
    import asyncio
    import tempfile

    import httpx

    from server.config import Settings
    from server.errors import ServerError
    from server.files.outputs import OutputStore
    from server.service.edit import EditService
    from server.service.metrics import Metrics
    from server.service.model import Model, load_model
    from server.service.runner import ModelRunner

    loras = lora_entries(args, data_uri)  # a local LoRA file travels in the request, as the images do
    body = input_body(args, [data_uri(p) for p in args.images], loras).model_copy(update={"sync_mode": True})
    weights_dir = args.weights or _default_weights()
    if weights_dir is None:
        return 2
    check_weights(weights_dir)
    print(f"loading {weights_dir} ...", file=sys.stderr)
    settings = Settings(**{k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k) is not None})
    model = Model()
    model.loaded(ModelRunner(load_with_a_bar(settings, weights_dir, load_model)))  # as the server loads it
    profile = endpoint_of(args).profile

    async def run(outputs: OutputStore):
        async with httpx.AsyncClient() as client:  # unused: every input is a data URI
            service = EditService(settings, model, outputs, client, Metrics(model))
            prepared = await service.prepare(profile, body, "http://localhost/", lambda message: None)
            with progress_bar() as bar:

                def on_step(step: int, total: int) -> None:
                    bar.total = total
                    bar.update(step - bar.n)

                result = await service.run(prepared, on_step, lambda message: print(message, file=sys.stderr))
            return prepared, result, await service.finish(prepared, result)

    try:
        with tempfile.TemporaryDirectory() as nowhere:  # sync_mode: the output store writes nothing
            prepared, result, output = asyncio.run(run(OutputStore(Path(nowhere))))
    except ServerError as exc:
        raise SystemExit(f"error: {exc.answer().message}") from None
    finally:
        model.shutdown()
    paths = output_paths(args.output, len(output.images))
    for image, path in zip(output.images, paths, strict=True):
        path.write_bytes(fetch_image(image.url, {}))
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in output.timings.items())
    call = prepared.call
    print(f"seed {output.seed}, {call.width}x{call.height}, {result.steps} steps, {timings}")
    if result.has_nsfw_concepts is not None:
        print(f"has_nsfw_concepts {result.has_nsfw_concepts}")
    for notice in output.notices:
        print(f"notice: {notice}")
    for path in paths:
        print(path)
    return 0


def load_with_a_bar(settings, weights_dir: Path, load_model):
    """The model loaded as the server loads it (checker, adapters), a bar following the bytes read and the stage;
    log lines print above the bar."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with (
        logging_redirect_tqdm(),
        tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", file=sys.stderr) as bar,
    ):

        def on_progress(progress) -> None:
            bar.total = progress.bytes_total
            bar.set_description(f"loading: {progress.stage} {progress.component or ''}".rstrip())
            bar.update(progress.bytes_read - bar.n)

        return load_model(settings, weights_dir, on_progress)


def _default_weights() -> Path | None:
    import torch

    from server.cli.tiny import ensure_tiny

    if torch.cuda.is_available():
        print("error: a GPU is present but no weights were given: pass --weights DIR", file=sys.stderr)
        return None
    print("no --weights and no GPU: using the TINY random-weight model (its images are noise)", file=sys.stderr)
    return ensure_tiny()


def check_images(paths: list[Path]) -> None:
    """Every input exists and decodes as an image: found now, before a model loads or a request is sent."""
    import PIL.Image

    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file" if not path.exists() else f"error: {path} is not a file")
        try:
            with PIL.Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for unreadable or corrupt images
            raise SystemExit(f"error: {path} is not an image PIL can read ({exc})") from None


def check_weights(weights_dir: Path) -> None:
    """The weights verify (`flux2-server weights verify`) before the minutes a load takes."""
    from weights.verify import verify

    report = verify(weights_dir)
    if not report.ok:
        problems = "; ".join(report.problems[:3]) + (" ..." if len(report.problems) > 3 else "")
        raise SystemExit(f"error: {weights_dir} can't be loaded: {problems} (see `flux2-server weights verify`)")


def server_error(response) -> str:
    """One line for an error answer: its status and the server's own message (fal's `detail`)."""
    try:
        answer = response.json()
    except ValueError:  # not JSON: another kind of server, or a proxy's page
        answer = None
    detail = answer.get("detail", response.text) if isinstance(answer, dict) else response.text
    if isinstance(detail, list):  # a validation error: the first problem is enough to act on
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" for d in detail)
    hint = " (check --key or $FAL_KEY)" if response.status_code in (401, 403) else ""
    return f"error: the server answered {response.status_code}: {' '.join(str(detail).split())}{hint}"


def data_uri(path: Path) -> str:
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def edit_remote(args: argparse.Namespace) -> int:
    import httpx

    endpoint_id = endpoint_of(args).endpoint_id
    key = args.key or os.environ.get("FAL_KEY")
    headers = {"Authorization": f"Key {key}"} if key else {}
    base = args.url.rstrip("/")
    try:
        with httpx.Client(headers=headers, timeout=httpx.Timeout(60, read=None)) as client:
            loras = lora_entries(args, lambda path: upload(client, base, path))  # local LoRA files: uploaded
            body = input_body(args, [data_uri(p) for p in args.images], loras)
            submitted = client.post(
                f"{base}/queue/{endpoint_id}", json=body.model_dump(mode="json", exclude_unset=True)
            )
            if submitted.status_code != 200:
                raise SystemExit(server_error(submitted))
            handle = submitted.json()
            print(f"request {handle['request_id']} queued at position {handle['queue_position']}", file=sys.stderr)
            status = follow(client, handle["status_url"] + "/stream")
            result = client.get(handle["response_url"])
            if result.status_code != 200:
                raise SystemExit(server_error(result))
            output = result.json()
            images = [fetch_image(image["url"], headers) for image in output["images"]]
    except httpx.ConnectError as exc:
        raise SystemExit(f"error: no server answers at {args.url} ({exc}): is `flux2-server serve` running?") from None
    except httpx.HTTPStatusError as exc:
        raise SystemExit(server_error(exc.response)) from None
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: talking to {args.url} failed: {type(exc).__name__}: {exc}") from None
    paths = output_paths(args.output, len(images))
    for image, path in zip(images, paths, strict=True):
        path.write_bytes(image)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in output["timings"].items())
    waited = (status or {}).get("metrics", {}).get("inference_time")
    print(f"seed {output['seed']}, {timings}" + (f" (queue inference_time {waited:.2f} s)" if waited else ""))
    for notice in output.get("notices", []):
        print(f"notice: {notice}")
    for path in paths:
        print(path)
    return 0


def upload(client, base: str, path: Path) -> str:
    """A local file uploaded through the server's storage emulation (fal's upload flow); its URL on the server."""
    target = client.post(
        f"{base}/storage/upload/initiate",
        json={"content_type": "application/octet-stream", "file_name": path.name},
    )
    if target.status_code != 200:
        raise SystemExit(server_error(target))
    put = client.put(target.json()["upload_url"], content=path.read_bytes())
    if put.status_code >= 300:
        raise SystemExit(server_error(put))
    return target.json()["file_url"]


def follow(client, stream_url: str) -> dict | None:
    """Read the status stream (server-sent events) to COMPLETED, moving the bar with the status's `progress`."""
    last = None
    with progress_bar() as bar, client.stream("GET", stream_url, params={"logs": 0}) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(server_error(response))
        for line in response.iter_lines():  # logs=0: the bar needs only `progress`
            if not line.startswith("data:"):
                continue
            last = json.loads(line.removeprefix("data:"))
            progress = last.get("progress")
            if progress:
                bar.total = progress["total"]
                bar.update(progress["step"] - bar.n)
            bar.set_postfix_str(last["status"].lower().replace("_", " "))
    return last


def fetch_image(url: str, headers: dict) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.partition(",")[2])
    import httpx

    response = httpx.get(url, headers=headers, timeout=60)
    response.raise_for_status()
    return response.content


def cmd_edit(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check_endpoint_images(args)
    check_images(args.images)  # before a model loads (minutes) or a request is sent
    code = edit_remote(args) if args.url else edit_local(args)
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return code


def add_parser(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser(
        "edit", help="edit images (or generate one from text) once: locally (loads the model) or on a server (--url)"
    )
    edit.add_argument(
        "images", nargs="*", type=Path, metavar="IMAGE", help="1-4 reference images (none: text to image)"
    )
    edit.add_argument("--prompt", "-p", required=True)
    edit.add_argument(
        "--endpoint",
        choices=[*SHORT_NAMES, *BY_ID],
        default="edit",
        metavar="ENDPOINT",
        help="edit (default), turbo, flash or lora-edit (the edit endpoints), or any endpoint id: fal-ai/flux-2, "
        "fal-ai/flux-2/turbo, fal-ai/flux-2/flash, fal-ai/flux-2/lora are text to image (no IMAGE)",
    )
    edit.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        metavar="PATH[:SCALE]",
        help="lora-edit and fal-ai/flux-2/lora: a LoRA (a local .safetensors file, a URL, or a name in the server's "
        "LoRA library) and its scale (default 1); up to 3",
    )
    edit.add_argument("--seed", type=int)
    edit.add_argument("--steps", type=int, help="num_inference_steps (edit and fal-ai/flux-2 only; 4-50, default 28)")
    edit.add_argument("--guidance-scale", type=float)
    edit.add_argument("--num-images", type=int)
    edit.add_argument("--image-size", type=parse_size, help="a fal size name (square_hd, ...) or WIDTHxHEIGHT")
    edit.add_argument(
        "-o", "--output", type=Path, default=Path("edited.png"), help="png, jpg or webp (default edited.png)"
    )
    edit.add_argument("--url", help="a running flux2-server (e.g. http://gpu-box:8000); default: run locally")
    edit.add_argument("--key", help="API key for --url (default: $FAL_KEY)")
    edit.add_argument(
        "--weights", type=Path, help="local run: FLUX.2 [dev] directory (default: tiny model without GPU)"
    )
    add_setting_flags(edit, ["device", "dtype"])  # a local run's model, as `serve` takes them
    edit.set_defaults(func=cmd_edit)
