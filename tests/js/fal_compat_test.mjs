// What @fal-ai/client sees of issue 16's fal shapes, through the server's proxy (unmodified client, Node).
// Usage: node fal_compat_test.mjs PROXY_URL IMAGE.png   Prints one JSON object; tests/test_fal_client_js.py checks it.
import { readFileSync } from "node:fs";
import { fal, ApiError, ValidationError } from "@fal-ai/client";

const [proxyUrl, imagePath] = process.argv.slice(2);
fal.config({ proxyUrl: { url: proxyUrl, when: "always" }, credentials: process.env.FAL_KEY });
const image = `data:image/png;base64,${readFileSync(imagePath).toString("base64")}`;
const FLASH = "fal-ai/flux-2/flash/edit";
const out = {};

async function failure(call) {
  try {
    await call();
    return null;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    return {
      status: error.status,
      requestId: error.requestId,
      validation: error instanceof ValidationError,
      body: error.body,
    };
  }
}

// submit: fal's IN_QUEUE answer; numbers as strings (lax input); a negative seed echoed as given
const submitted = await fal.queue.submit(FLASH, {
  input: { prompt: "p", image_urls: [image], image_size: "square", seed: "-3", num_images: "1" },
});
out.submitted = { status: submitted.status, sameGatewayId: submitted.gateway_request_id === submitted.request_id };
let status;
do {
  status = await fal.queue.status(FLASH, { requestId: submitted.request_id });
} while (status.status !== "COMPLETED");
const result = await fal.queue.result(FLASH, { requestId: submitted.request_id });
out.result = { seed: result.data.seed, requestId: result.requestId, expected: submitted.request_id };

// queue-time validation: accepted with an id, the result is the 422, ApiError.requestId names the request
const invalid = await fal.queue.submit(FLASH, { input: { image_urls: [image] } });
do {
  status = await fal.queue.status(FLASH, { requestId: invalid.request_id });
} while (status.status !== "COMPLETED");
out.invalidQueued = { ...(await failure(() => fal.queue.result(FLASH, { requestId: invalid.request_id }))), expected: invalid.request_id };

// a sync call refused at once still has a request id; cancel of an unknown id; an unknown endpoint
out.invalidRun = await failure(() => fal.run(FLASH, { input: { prompt: "p", image_urls: [image], num_images: 9 } }));
out.cancelUnknown = await failure(() =>
  fal.queue.cancel(FLASH, { requestId: "00000000-0000-0000-0000-000000000000" }),
);
out.unknownEndpoint = await failure(() => fal.run("fal-ai/flux-2-pro", { input: { prompt: "p" } }));

console.log(JSON.stringify(out));
