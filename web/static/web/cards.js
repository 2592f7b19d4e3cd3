import { ApiError, session } from "./api.js";

// Character cards in the web client: importing by the file picker or by dropping
// files onto the gallery, exporting as PNG or JSON (docs/cards.md). (The module
// line stays first: collectstatic's hashing reads "import"/"export" in a comment
// above it as the start of a statement and rewrites its URL twice.) The files go
// to /api/v1/characters/..., which answers the envelope at the real HTTP
// status; the token travels in the Authorization header, never in a URL.

function authorization() {
  const current = session.load();
  return current ? { Authorization: `Token ${current.token}` } : {};
}

async function envelopeOf(response) {
  try {
    return await response.json();
  } catch {
    return { data: null, message: `the server answered with HTTP ${response.status}`, code: response.status };
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Import one card file; the new character's name, or an ApiError with the server's message. */
export async function importCard(file) {
  const body = JSON.stringify({ file: await readAsDataUrl(file) });
  let response;
  try {
    response = await fetch("/api/v1/characters/import", {
      method: "POST", body, credentials: "omit", cache: "no-store",
      headers: { "Content-Type": "application/json", ...authorization() },
    });
  } catch (exc) {
    throw new ApiError(String(exc.message || exc), 0);
  }
  const envelope = await envelopeOf(response);
  if (envelope.code !== 200) throw new ApiError(`${file.name}: ${envelope.message}`, envelope.code);
  return envelope.data.name;
}

/** Download the character `name` as a card file (`format` "png" or "json"). */
export async function exportCard(name, format) {
  const route = `/api/v1/characters/${encodeURIComponent(name)}/export?format=${format}`;
  let response;
  try {
    response = await fetch(route, { headers: authorization(), credentials: "omit", cache: "no-store" });
  } catch (exc) {
    throw new ApiError(String(exc.message || exc), 0);
  }
  if (!response.ok) {
    const envelope = await envelopeOf(response);
    throw new ApiError(envelope.message, envelope.code);
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Card import on the page: the file input `picker`, and files dropped on `dropZone`
 * (which gets the class "dropping" while files are dragged over it). Each file is
 * imported in turn; `onImported(name)` after each success, `onError(error)` after each failure.
 */
export function installCardImport(picker, dropZone, onImported, onError) {
  const importAll = async (files) => {
    for (const file of files) {
      try {
        onImported(await importCard(file));
      } catch (exc) {
        onError(exc);
      }
    }
  };
  picker.addEventListener("change", () => {
    const files = [...picker.files];
    picker.value = "";
    importAll(files);
  });
  dropZone.addEventListener("dragover", (event) => {
    if (![...event.dataTransfer.types].includes("Files")) return;
    event.preventDefault();
    dropZone.classList.add("dropping");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dropping"));
  dropZone.addEventListener("drop", (event) => {
    if (!event.dataTransfer.files.length) return;
    event.preventDefault();
    dropZone.classList.remove("dropping");
    importAll([...event.dataTransfer.files]);
  });
}
