import { ApiError, session } from "./api.js";

// rpserver's own REST API (/api/v1/...: personas, lorebooks) as the web client
// speaks it. (The module line stays first, as in cards.js: collectstatic's hashing
// reads "import" in a comment above it as a statement.) JSON in, the envelope
// {"data", "message", "code"} out at the real HTTP status; the token travels in
// the Authorization header, never in a URL.

function headers(extra = {}) {
  const current = session.load();
  return current ? { ...extra, Authorization: `Token ${current.token}` } : extra;
}

async function send(route, init) {
  let response;
  try {
    response = await fetch(route, { credentials: "omit", cache: "no-store", ...init });
  } catch (exc) {
    throw new ApiError(String(exc.message || exc), 0);
  }
  return response;
}

async function envelope(response) {
  let body;
  try {
    body = await response.json();
  } catch {
    body = { data: null, message: `the server answered with HTTP ${response.status}`, code: response.status };
  }
  if (body.code !== 200) throw new ApiError(body.message, body.code);
  return body.data;
}

/** GET a route of /api/v1; its `data`, or an ApiError with the server's message. */
export async function restGet(route) {
  return envelope(await send(route, { headers: headers() }));
}

/** POST `body` (JSON) to a route of /api/v1; its `data`, or an ApiError. */
export async function restPost(route, body = {}) {
  return envelope(await send(route, {
    method: "POST", body: JSON.stringify(body), headers: headers({ "Content-Type": "application/json" }),
  }));
}

/** GET a file from a route of /api/v1 and hand it to the browser as a download named `fileName`. */
export async function restDownload(route, fileName) {
  const response = await send(route, { headers: headers() });
  if (!response.ok) await envelope(response); // throws the server's message
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = fileName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A file's text, read in the browser. */
export function readText(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsText(file);
  });
}

/** A string as base64 (UTF-8), as the import routes take files. */
export function base64OfText(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}
