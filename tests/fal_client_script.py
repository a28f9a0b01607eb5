"""Runs the unmodified `fal_client` against this server; the environment points it here (see README).

Run by tests/test_fal_client.py in a fresh interpreter, because fal_client reads FAL_RUN_HOST and
FAL_QUEUE_RUN_HOST once, at import. Prints one JSON object with what each call returned.
"""

import asyncio
import json
import sys
import time

import fal_client

image_uri = sys.argv[1]
args = {"prompt": "Change the weather to winter", "image_urls": [image_uri], "image_size": "square", "seed": 5}
out = {}

updates = []
out["subscribe"] = fal_client.subscribe(
    "fal-ai/flux-2/edit",
    arguments={**args, "num_inference_steps": 6},
    with_logs=True,
    on_queue_update=lambda update: updates.append(
        {"type": type(update).__name__, "logs": [log["message"] for log in getattr(update, "logs", None) or []]}
    ),
)
out["subscribe_updates"] = updates

handle = fal_client.submit("fal-ai/flux-2/turbo/edit", arguments=args)
out["submit_id"] = handle.request_id
out["status_types"] = [type(s).__name__ for s in handle.iter_events(with_logs=True, interval=0.05)]
out["result"] = fal_client.result("fal-ai/flux-2/turbo/edit", handle.request_id)
out["status_by_id"] = type(fal_client.status("fal-ai/flux-2/turbo/edit", handle.request_id, with_logs=True)).__name__

slow = fal_client.submit("fal-ai/flux-2/edit", arguments={**args, "num_inference_steps": 50, "image_size": "square_hd"})
# running once the model took it (before, it may wait IN_QUEUE while its inputs are fetched: a queued cancel)
while type(fal_client.status("fal-ai/flux-2/edit", slow.request_id)).__name__ != "InProgress":
    time.sleep(0.02)
queued = fal_client.submit("fal-ai/flux-2/flash/edit", arguments=args)
fal_client.cancel("fal-ai/flux-2/flash/edit", queued.request_id)
slow.cancel()
for name, h in (("cancelled_queued", queued), ("cancelled_running", slow)):
    final = list(h.iter_events(with_logs=True, interval=0.05))[-1]
    try:
        h.get()
        out[name] = {"error": None}
    except fal_client.client.FalClientHTTPError as exc:
        out[name] = {
            "error": final.error,
            "error_type": final.error_type,
            "status_code": exc.status_code,
            "steps_logged": sum("step" in log["message"] for log in final.logs),
        }

out["run"] = fal_client.run("fal-ai/flux-2/flash/edit", arguments=args)

# fal_client's uploads go to fal's own hosts; a local file travels as a data URI instead (tens of MB here)
big = fal_client.encode_file(sys.argv[2])
out["large_data_uri_chars"] = len(big)
out["large"] = fal_client.subscribe("fal-ai/flux-2/flash/edit", arguments={**args, "image_urls": [big]})


async def async_calls():
    client = fal_client.AsyncClient()
    result = await client.subscribe("fal-ai/flux-2/flash/edit", arguments=args, with_logs=True)
    handle = await client.submit("fal-ai/flux-2/flash/edit", arguments=args)
    return result, await handle.get()


out["async_subscribe"], out["async_get"] = asyncio.run(async_calls())
print(json.dumps(out))
