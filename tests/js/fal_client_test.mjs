// Runs the unmodified @fal-ai/client against this server through fal's proxy convention.
// Usage: node fal_client_test.mjs PROXY_URL IMAGE.png   (FAL_KEY in the environment)
// Prints one JSON object with what each call returned; tests/test_fal_client_js.py checks it.
import { readFileSync } from "node:fs";
import { fal } from "@fal-ai/client";

const [proxyUrl, imagePath] = process.argv.slice(2);
fal.config({ proxyUrl: { url: proxyUrl, when: "always" }, credentials: process.env.FAL_KEY });

const out = {};
const image = new Blob([readFileSync(imagePath)], { type: "image/png" });
out.uploadedUrl = await fal.storage.upload(image);

const input = { prompt: "Change the weather to winter", image_urls: [out.uploadedUrl], image_size: "square", seed: 9 };
const updates = [];
const subscribed = await fal.subscribe("fal-ai/flux-2/edit", {
  input: { ...input, num_inference_steps: 5 },
  logs: true,
  onQueueUpdate: (update) => updates.push({ status: update.status, logs: (update.logs || []).map((l) => l.message) }),
});
out.subscribe = { data: subscribed.data, requestId: subscribed.requestId, updates };

const { request_id } = await fal.queue.submit("fal-ai/flux-2/turbo/edit", { input });
let status;
do {
  status = await fal.queue.status("fal-ai/flux-2/turbo/edit", { requestId: request_id, logs: true });
} while (status.status !== "COMPLETED");
out.queue = {
  requestId: request_id,
  finalStatus: status.status,
  steps: status.logs.filter((l) => l.message.startsWith("step ")).length,
  result: (await fal.queue.result("fal-ai/flux-2/turbo/edit", { requestId: request_id })).data,
};

const stream = await fal.queue.streamStatus("fal-ai/flux-2/flash/edit", {
  requestId: (await fal.queue.submit("fal-ai/flux-2/flash/edit", { input })).request_id,
  logs: true,
});
const streamed = [];
stream.on("data", (event) => streamed.push(event.status));
out.streamDone = (await stream.done()).status;
out.streamed = streamed;

const slow = await fal.queue.submit("fal-ai/flux-2/edit", { input: { ...input, num_inference_steps: 50, image_size: "square_hd" } });
const queued = await fal.queue.submit("fal-ai/flux-2/flash/edit", { input });
await fal.queue.cancel("fal-ai/flux-2/flash/edit", { requestId: queued.request_id });
await fal.queue.cancel("fal-ai/flux-2/edit", { requestId: slow.request_id });
out.cancelled = [];
for (const [endpoint, id] of [["fal-ai/flux-2/flash/edit", queued.request_id], ["fal-ai/flux-2/edit", slow.request_id]]) {
  let s;
  do {
    s = await fal.queue.status(endpoint, { requestId: id, logs: true });
  } while (s.status !== "COMPLETED");
  out.cancelled.push({ error_type: s.error_type, steps: s.logs.filter((l) => l.message.startsWith("step ")).length });
}

out.run = (await fal.run("fal-ai/flux-2/flash/edit", { input })).data;
console.log(JSON.stringify(out));
