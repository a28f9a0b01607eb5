"""Issue 16's fal shapes as the unmodified `fal_client` sees them; run by tests/test_fal_client.py like
tests/fal_client_script.py (the environment points the client here). Prints one JSON object."""

import json
import sys

import fal_client

FLASH = "fal-ai/flux-2/flash/edit"
image_uri, webhook_url = sys.argv[1], sys.argv[2]
out = {}

# lax input, as fal's framework validates: numbers as strings or floats, booleans as strings; any integer seed
lax = {"prompt": "p", "image_urls": [image_uri], "image_size": {"width": 512.0, "height": "512"}, "seed": "-7"}
result = fal_client.run(FLASH, arguments={**lax, "num_images": 1.0, "enable_safety_checker": "false"})
out["lax"] = {"seed": result["seed"], "width": result["images"][0]["width"]}


def failure(call):
    try:
        call()
        return None
    except fal_client.client.FalClientHTTPError as exc:
        return {
            "status": exc.status_code,
            "request_id": exc.response_headers.get("x-fal-request-id"),
            "body": exc.response.json(),
        }


# queue-time validation: submit accepts a body without its prompt; the result is the 422
handle = fal_client.submit(FLASH, arguments={"image_urls": [image_uri]})
out["invalid_queued"] = {**failure(handle.get), "expected": handle.request_id}
# a webhook URL the SSRF guard refuses: 422 at submit
out["refused_webhook"] = failure(lambda: fal_client.submit(FLASH, arguments=lax, webhook_url=webhook_url))
# an endpoint this server does not serve
out["unknown"] = failure(lambda: fal_client.run("fal-ai/flux-2-pro", arguments={"prompt": "p"}))
print(json.dumps(out))
