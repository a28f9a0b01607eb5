"""Runs the unmodified `fal_client` against this server's text-to-image endpoints (fal-ai/flux-2, /turbo, /flash).

Run by tests/test_fal_client.py in a fresh interpreter (fal_client reads FAL_RUN_HOST and FAL_QUEUE_RUN_HOST at
import). Prints one JSON object with what each call returned.
"""

import json

import fal_client

out = {}
for endpoint in ("fal-ai/flux-2", "fal-ai/flux-2/turbo", "fal-ai/flux-2/flash"):
    updates = []
    steps = {"num_inference_steps": 5} if endpoint == "fal-ai/flux-2" else {}
    result = fal_client.subscribe(
        endpoint,
        arguments={"prompt": "A lighthouse at dusk", "seed": 3, "image_size": "square", **steps},
        with_logs=True,
        on_queue_update=lambda update, updates=updates: updates.append(
            [log["message"] for log in getattr(update, "logs", None) or []]
        ),
    )
    out[endpoint] = {"result": result, "logs": updates[-1] if updates else []}

# submit, then status and result by id (fal_client builds those URLs from the endpoint id itself)
handle = fal_client.submit("fal-ai/flux-2/flash", arguments={"prompt": "A lighthouse at dusk", "seed": 3})
out["status_by_id"] = type(fal_client.status("fal-ai/flux-2/flash", handle.request_id)).__name__
handle.get()
out["default_size"] = fal_client.result("fal-ai/flux-2/flash", handle.request_id)  # fal's default: landscape_4_3

out["run"] = fal_client.run(
    "fal-ai/flux-2/turbo", arguments={"prompt": "A lighthouse at dusk", "seed": 3, "image_size": "square"}
)
print(json.dumps(out))
