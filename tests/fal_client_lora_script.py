"""Runs the unmodified `fal_client` against this server for the LoRA endpoints (tests/test_loras.py).

stdin: a JSON list of [name, endpoint_id, arguments]; each is run with `fal_client.subscribe` (the queue), in
order. Prints one JSON object: each name's result, or {status_code, detail} for an error answer. Run in a fresh
interpreter because fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST at import.
"""

import json
import sys

import fal_client

out = {}
for name, endpoint, arguments in json.load(sys.stdin):
    try:
        out[name] = fal_client.subscribe(endpoint, arguments=arguments)
    except fal_client.client.FalClientHTTPError as exc:
        out[name] = {"status_code": exc.status_code, "detail": exc.response.json()["detail"]}
print(json.dumps(out))
