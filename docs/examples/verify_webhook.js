// Receive promptq webhooks and verify their Standard Webhooks signature, with Node's own
// crypto module (no npm dependency).
//
//   PROMPTQ_WEBHOOK_SECRET=whsec_... node verify_webhook.js   # listens on 127.0.0.1:8787
//
// Use verify() on its own in any framework: give it the raw body bytes, exactly as received.
// A body parsed and serialised again (express.json(), for one) no longer matches the
// signature; with Express, use express.raw({ type: "application/json" }) on this route.
"use strict";

const crypto = require("node:crypto");
const http = require("node:http");

const TOLERANCE_SECONDS = 5 * 60;

class WebhookVerificationError extends Error {}

// The event ({type, timestamp, data: the job}) if the request is genuine; throws
// WebhookVerificationError otherwise. `headers` as Node gives them (lower-case names);
// `body` a Buffer or string.
function verify(secret, headers, body, nowSeconds = Date.now() / 1000) {
  const header = (name) => {
    const found = Object.keys(headers).find((key) => key.toLowerCase() === name);
    const value = found === undefined ? undefined : headers[found];
    return Array.isArray(value) ? value[0] : value;
  };
  const id = header("webhook-id");
  const timestamp = header("webhook-timestamp");
  const signatures = header("webhook-signature");
  if (!id || !timestamp || !signatures) {
    throw new WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature");
  }
  // A recent timestamp, inside the signed content, is what stops a captured request from
  // being replayed later.
  if (!/^\d+$/.test(timestamp)) {
    throw new WebhookVerificationError("webhook-timestamp is not a number of seconds");
  }
  const age = nowSeconds - Number(timestamp);
  if (age > TOLERANCE_SECONDS) throw new WebhookVerificationError("timestamp too old");
  if (age < -TOLERANCE_SECONDS) throw new WebhookVerificationError("timestamp too new");

  // The key is the base64 part of the whsec_ secret, decoded.
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  if (key.length === 0) throw new Error("the webhook secret is empty or not base64");
  const raw = Buffer.isBuffer(body) ? body : Buffer.from(body, "utf8");
  const expected = crypto
    .createHmac("sha256", key)
    .update(`${id}.${timestamp}.`)
    .update(raw)
    .digest();

  // Several signatures may come, space-separated (for example while a secret is rotated);
  // one valid v1 signature is enough.
  const valid = signatures.split(" ").some((entry) => {
    const comma = entry.indexOf(",");
    if (comma < 0 || entry.slice(0, comma) !== "v1") return false;
    const given = Buffer.from(entry.slice(comma + 1), "base64");
    // timingSafeEqual: a compare that stops at the first wrong byte tells an attacker,
    // through its timing, how much of a forged signature is right.
    return given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
  if (!valid) throw new WebhookVerificationError("no matching signature");

  let event;
  try {
    event = JSON.parse(raw.toString("utf8"));
  } catch {
    throw new WebhookVerificationError("the body is not JSON");
  }
  if (event === null || typeof event !== "object" || Array.isArray(event)) {
    throw new WebhookVerificationError("the body is not a JSON object");
  }
  return event;
}

// Your code goes here.
function handle(webhookId, event) {
  const data = event.data; // the job; for `batch.ended` (subscriptions only), the batch
  let detail;
  if (event.type === "job.succeeded") detail = JSON.stringify(data.output_text);
  else if (event.type === "job.failed") detail = data.error && data.error.message;
  else detail = data.processing_status;
  console.log(`${webhookId}: ${event.type} ${data.id}: ${detail}`);
}

function createServer(secret) {
  // A wrong secret is a setup error: say so now, not on the first webhook.
  if (Buffer.from(secret.replace(/^whsec_/, ""), "base64").length === 0) {
    throw new Error("the webhook secret is empty or not base64");
  }
  // A retried delivery keeps its webhook-id, so a receiver that answered too slowly the
  // first time sees the same event again. In production keep the ids in your database.
  const seen = new Set();
  return http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      let event;
      try {
        event = verify(secret, req.headers, Buffer.concat(chunks));
      } catch (error) {
        if (!(error instanceof WebhookVerificationError)) throw error;
        res.writeHead(401, { "content-type": "text/plain" }).end(`invalid webhook: ${error.message}`);
        return;
      }
      const webhookId = req.headers["webhook-id"];
      if (seen.has(webhookId)) {
        console.log(`${webhookId}: already handled, skipped`);
      } else {
        try {
          handle(webhookId, event);
        } catch (error) {
          // Not marked as seen: promptq gets no 2xx and sends the event again later.
          console.error(`${webhookId}: ${error.stack}`);
          res.writeHead(500, { "content-type": "text/plain" }).end("handler failed");
          return;
        }
        seen.add(webhookId);
        if (seen.size > 10000) seen.delete(seen.values().next().value);
      }
      // Answer quickly: promptq counts only a 2xx within 15 s as delivered.
      res.writeHead(200, { "content-type": "text/plain" }).end("ok");
    });
  });
}

module.exports = { verify, createServer, WebhookVerificationError };

if (require.main === module) {
  const secret = process.env.PROMPTQ_WEBHOOK_SECRET;
  if (!secret) {
    console.error("set PROMPTQ_WEBHOOK_SECRET to the key's whsec_... secret");
    process.exit(1);
  }
  const host = process.env.HOST || "127.0.0.1";
  const port = Number(process.env.PORT || 8787);
  createServer(secret).listen(port, host, () => console.log(`listening on http://${host}:${port}/`));
}
