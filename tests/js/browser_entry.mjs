// Bundled for the browser by tests/test_fal_client_browser.py (esbuild): @fal-ai/client, unmodified, in a page
// served from another origin than the server, reaching it through fal's proxy convention.
import { fal } from "@fal-ai/client";

window.runFal = async (proxyUrl, pngBase64) => {
  fal.config({ proxyUrl }); // in a browser the client always goes through the proxy
  const bytes = Uint8Array.from(atob(pngBase64), (c) => c.charCodeAt(0));
  const uploaded = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
  const statuses = [];
  const result = await fal.subscribe("fal-ai/flux-2/flash/edit", {
    input: { prompt: "Change the weather to winter", image_urls: [uploaded], image_size: "square", seed: 4 },
    logs: true,
    onQueueUpdate: (update) => statuses.push(update.status),
  });
  return { uploaded, data: result.data, requestId: result.requestId, statuses };
};
