// rpserver's legacy API, as the web client speaks it.
//
// Every route is a POST of form fields; the answer is the envelope
// {"data", "message", "code"} at HTTP 200, so `code` is what counts. The token
// travels in the Authorization header (never in a URL) and is kept in
// localStorage so that a reload stays logged in.

import { language } from "./i18n.js";

const SESSION_KEY = "rpserver.session";

export class ApiError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
  get expired() { return this.code === 403; }
  get rateLimited() { return this.code === 429; }
  get busy() { return this.code === 400 && /already being generated/i.test(this.message); }
  get network() { return this.code === 0; }
}

export const session = {
  load() {
    try {
      const saved = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
      return saved && saved.token ? saved : null;
    } catch {
      return null;
    }
  },
  save(userName, token, guest) {
    localStorage.setItem(SESSION_KEY, JSON.stringify({ user_name: userName, token, guest: !!guest }));
  },
  clear() { localStorage.removeItem(SESSION_KEY); },
};

let onExpired = () => {};

/** Called once with a function to run when the server says the token is no good (code 403). */
export function whenExpired(callback) { onExpired = callback; }

function request(route, fields, signal) {
  // The page's language, not only the browser's: a new account's starter characters speak it.
  const headers = {
    "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8",
    "Accept-Language": language === "zh" ? "zh-CN" : "en",
  };
  const current = session.load();
  if (current) headers.Authorization = `Token ${current.token}`;
  const body = new URLSearchParams();
  for (const [name, value] of Object.entries(fields || {})) {
    if (value !== undefined && value !== null) body.append(name, String(value));
  }
  return fetch(route, { method: "POST", headers, body, signal, credentials: "omit", cache: "no-store" });
}

function checked(envelope, route) {
  if (envelope && envelope.code === 200) return envelope.data;
  const code = envelope && typeof envelope.code === "number" ? envelope.code : 500;
  const error = new ApiError((envelope && envelope.message) || `HTTP error on ${route}`, code);
  if (error.expired && session.load() && !route.startsWith("/login") && route !== "/signup") onExpired(error);
  throw error;
}

async function readEnvelope(response, route) {
  try {
    return await response.json();
  } catch {
    return { data: null, message: `the server answered ${route} with HTTP ${response.status}`, code: response.status >= 500 ? 500 : 400 };
  }
}

/** POST a route; its `data`, or an ApiError with the server's message. */
export async function call(route, fields = {}) {
  let response;
  try {
    response = await request(route, fields);
  } catch (exc) {
    throw new ApiError(String(exc.message || exc), 0);
  }
  return checked(await readEnvelope(response, route), route);
}

/** GET a JSON route that answers in the envelope (the client's config, a chat's context). */
export async function get(route) {
  const headers = { "Accept-Language": language === "zh" ? "zh-CN" : "en" };
  const current = session.load();
  if (current) headers.Authorization = `Token ${current.token}`;
  let response;
  try {
    response = await fetch(route, { headers, credentials: "omit", cache: "no-store" });
  } catch (exc) {
    throw new ApiError(String(exc.message || exc), 0);
  }
  return checked(await readEnvelope(response, route), route);
}

/**
 * POST a streaming route (/chat/reply, /api/v1/chats/<id>/swipe ...) and follow its Server-Sent Events.
 *
 * Each frame is "\n\ndata: " + the whole reply so far, so the text shown is
 * simply the last frame. `onText` gets it as it grows; the promise ends with
 * the final reply. Aborting `signal` disconnects: the legacy routes then keep
 * nothing of the reply, the REST API's keep what was written. An error before the stream starts comes back as an
 * envelope and rejects with an ApiError.
 */
export async function stream(route, fields, onText, signal) {
  let response;
  try {
    response = await request(route, fields, signal);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(String(exc.message || exc), 0);
  }
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) return checked(await readEnvelope(response, route), route);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const marker = "\n\ndata: ";
  let received = "";
  let shown = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    received += decoder.decode(value, { stream: true });
    const last = received.lastIndexOf(marker);
    if (last < 0) continue;
    // Keep only the newest frame: the rest of the text is history.
    received = received.slice(last);
    // A reply never holds a blank line, so one here is the start of a frame still arriving.
    let text = received.slice(marker.length);
    const partial = text.indexOf("\n\n");
    if (partial >= 0) text = text.slice(0, partial);
    if (text !== shown) {
      shown = text;
      onText(text);
    }
  }
  received += decoder.decode();
  const last = received.lastIndexOf(marker);
  return last < 0 ? (shown ?? "") : received.slice(last + marker.length);
}
