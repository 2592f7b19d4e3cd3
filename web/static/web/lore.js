// The lorebook screens: the list (#/lore: import, new, active, export, delete) and
// a simple editor of one book's entries (#/lore/<id>). The API is /api/v1/lorebooks
// (docs/cards.md, "Lore"). A book is kept in the shape it came in (SillyTavern's
// world info, entries by uid; or the card spec's character_book, a list); the
// editor changes only the fields it shows and keeps every other key as it was.

import { base64OfText, readText, restDownload, restGet, restPost } from "./rest.js";
import { t } from "./i18n.js";

const $ = (selector) => document.querySelector(selector);

let ui = null;     // from app.js: {toast, showError, describe, confirmDialog, showView}
let books = [];    // the list, as the server last gave it
let open = null;   // the book being edited: {id, name, active, data, rows: [{item, uid}]}

function bookPath(id) { return `/api/v1/lorebooks/${id}`; }

// ---------------------------------------------------------------- the two shapes

/** World info keeps entries in an object by uid; a character_book in a list. */
function isWorldInfo(data) { return !Array.isArray(data.entries); }

/** The fields the editor shows, read from an entry of either shape. */
function fieldsOf(item, worldInfo) {
  const list = (value) => (Array.isArray(value) ? value : typeof value === "string" && value ? [value] : [])
    .filter((key) => typeof key === "string");
  return worldInfo ? {
    keys: list(item.key), secondary: list(item.keysecondary), content: String(item.content ?? ""),
    constant: item.constant === true, order: typeof item.order === "number" ? item.order : 100,
    enabled: !item.disable, comment: typeof item.comment === "string" ? item.comment : "",
  } : {
    keys: list(item.keys), secondary: list(item.secondary_keys), content: String(item.content ?? ""),
    constant: item.constant === true, order: typeof item.insertion_order === "number" ? item.insertion_order : 100,
    enabled: item.enabled !== false, comment: typeof item.comment === "string" ? item.comment : "",
  };
}

/** Write the editor's fields into an entry of either shape (its other keys stay). Secondary keys count only
 * when an entry is selective, so an entry with some is made selective, and one without them is not. */
function writeFields(item, fields, worldInfo) {
  if (worldInfo) {
    Object.assign(item, { key: fields.keys, keysecondary: fields.secondary, content: fields.content,
      constant: fields.constant, order: fields.order, disable: !fields.enabled, selective: fields.secondary.length > 0 });
  } else {
    Object.assign(item, { keys: fields.keys, secondary_keys: fields.secondary, content: fields.content,
      constant: fields.constant, insertion_order: fields.order, enabled: fields.enabled,
      selective: fields.secondary.length > 0 });
  }
}

function newItem(worldInfo, uid) {
  return worldInfo
    ? { uid, key: [], keysecondary: [], comment: "", content: "", constant: false, selective: false, order: 100, disable: false }
    : { keys: [], secondary_keys: [], content: "", extensions: {}, enabled: true, insertion_order: 100, constant: false, selective: false };
}

// ---------------------------------------------------------------- the list

function entriesLabel(count) { return count === 1 ? t("lore.one_entry") : t("lore.entries_count", { count }); }

function button(label, className, handler, ariaLabel) {
  const item = document.createElement("button");
  item.type = "button";
  item.className = className;
  item.textContent = label;
  if (ariaLabel) item.setAttribute("aria-label", ariaLabel);
  item.addEventListener("click", handler);
  return item;
}

function renderList() {
  const items = books.map((book) => {
    const item = document.createElement("li");
    item.className = "item";
    item.dataset.id = String(book.id);
    const text = document.createElement("div");
    text.className = "item-text";
    const name = document.createElement("a");
    name.className = "item-name";
    name.href = `#/lore/${book.id}`;
    name.textContent = book.name;
    const count = document.createElement("p");
    count.className = "item-desc";
    count.textContent = entriesLabel(book.entries);
    text.append(name, count);
    const actions = document.createElement("div");
    actions.className = "item-actions";
    const active = document.createElement("label");
    active.className = "check small-check";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = book.active;
    box.setAttribute("aria-label", `${t("lore.active")}: ${book.name}`);
    box.addEventListener("change", () => setActive(book, box));
    const activeText = document.createElement("span");
    activeText.textContent = t("lore.active");
    activeText.setAttribute("aria-hidden", "true");
    active.append(box, activeText);
    actions.append(
      active,
      button(t("lore.export"), "ghost small", () => exportBook(book), `${t("lore.export")}: ${book.name}`),
      button(t("common.delete"), "ghost small danger", () => deleteBook(book), `${t("common.delete")}: ${book.name}`),
    );
    item.append(text, actions);
    return item;
  });
  $("#lore-list").replaceChildren(...items);
  $("#lore-empty").hidden = books.length > 0;
}

async function setActive(book, box) {
  box.disabled = true;
  try {
    const saved = await restPost(bookPath(book.id), { active: box.checked });
    book.active = saved.active;
    ui.toast(t(saved.active ? "lore.now_active" : "lore.now_inactive", { name: book.name }));
  } catch (exc) {
    ui.showError(exc);
  }
  box.checked = book.active;
  box.disabled = false;
  box.closest(".item").dataset.active = String(book.active); // what the server has: the tests wait on it
}

function exportBook(book) {
  restDownload(`${bookPath(book.id)}/export`, `${book.name}.json`).catch(ui.showError);
}

async function deleteBook(book) {
  if (!(await ui.confirmDialog(t("lore.confirm_delete", { name: book.name }), t("common.delete")))) return;
  try {
    await restPost(`${bookPath(book.id)}/delete`);
    ui.toast(t("editor.deleted", { name: book.name }));
    if (location.hash === "#/lore") await openLore(null);
    else location.hash = "#/lore";
  } catch (exc) {
    ui.showError(exc);
  }
}

async function importFiles(files) {
  for (const file of files) {
    try {
      const book = await restPost("/api/v1/lorebooks/import", { file: base64OfText(await readText(file)) });
      ui.toast(t("lore.imported", { name: book.name }));
    } catch (exc) {
      ui.toast(`${file.name}: ${ui.describe(exc)}`, "error");
    }
  }
  await openLore(null);
}

async function newBook() {
  const taken = new Set(books.map((book) => book.name));
  let name = t("lore.new_name");
  for (let n = 2; taken.has(name); n += 1) name = `${t("lore.new_name")} ${n}`;
  try {
    const book = await restPost("/api/v1/lorebooks/import", { file: base64OfText(JSON.stringify({ entries: {} })), name });
    location.hash = `#/lore/${book.id}`;
  } catch (exc) {
    ui.showError(exc);
  }
}

// ---------------------------------------------------------------- one book's editor

function field(labelKey, control, extraClass = "") {
  const label = document.createElement("label");
  if (extraClass) label.className = extraClass;
  const text = document.createElement("span");
  text.textContent = t(labelKey);
  if (extraClass.includes("check")) label.append(control, " ", text);
  else label.append(text, control);
  return label;
}

function input(name, value, type = "text") {
  const item = document.createElement("input");
  item.type = type;
  item.name = name;
  if (type === "checkbox") item.checked = value;
  else item.value = value;
  return item;
}

function entryElement(row, index) {
  const fields = fieldsOf(row.item, isWorldInfo(open.data));
  const box = document.createElement("fieldset");
  box.className = "entry";
  const legend = document.createElement("legend");
  legend.textContent = t("lore.entry_title", { number: index + 1 });
  const keys = input("keys", fields.keys.join(", "));
  keys.placeholder = t("lore.keys_ph");
  const secondary = input("secondary", fields.secondary.join(", "));
  const content = document.createElement("textarea");
  content.name = "content";
  content.rows = 3;
  content.value = fields.content;
  const order = input("order", String(fields.order), "number");
  order.step = "1";
  const flags = document.createElement("div");
  flags.className = "entry-flags";
  flags.append(
    field("lore.enabled", input("enabled", fields.enabled, "checkbox"), "check"),
    field("lore.constant", input("constant", fields.constant, "checkbox"), "check"),
    field("lore.order", order, "order-field"),
  );
  const remove = button(t("lore.delete_entry"), "ghost small danger", () => {
    readEntries();
    open.rows.splice(open.rows.indexOf(row), 1);
    renderEntries();
    $("#lore-add-entry").focus();
  }, `${t("lore.delete_entry")} ${index + 1}`);
  const actions = document.createElement("div");
  actions.className = "form-actions";
  actions.append(flags, remove);
  box.append(legend, field("lore.keys", keys), field("lore.secondary", secondary), field("lore.content", content), actions);
  return box;
}

function renderEntries() {
  $("#lore-entries").replaceChildren(...open.rows.map(entryElement));
  $("#lore-no-entries").hidden = open.rows.length > 0;
}

function splitKeys(text) {
  return text.split(",").map((key) => key.trim()).filter(Boolean);
}

/** The entries' fields as the page shows them, written into the rows' entries. */
function readEntries() {
  const worldInfo = isWorldInfo(open.data);
  [...$("#lore-entries").children].forEach((box, index) => {
    const value = (name) => box.querySelector(`[name=${name}]`);
    const order = Number(value("order").value);
    writeFields(open.rows[index].item, {
      keys: splitKeys(value("keys").value), secondary: splitKeys(value("secondary").value),
      content: value("content").value, constant: value("constant").checked, enabled: value("enabled").checked,
      order: Number.isFinite(order) && value("order").value.trim() !== "" ? order : 100,
    }, worldInfo);
  });
}

function addEntry() {
  readEntries();
  const worldInfo = isWorldInfo(open.data);
  const uids = open.rows.map((row) => Number(row.uid)).filter(Number.isFinite);
  const uid = worldInfo ? (uids.length ? Math.max(...uids) + 1 : 0) : null;
  open.rows.push({ item: newItem(worldInfo, uid), uid: worldInfo ? String(uid) : null });
  renderEntries();
  $("#lore-entries").lastElementChild.querySelector("[name=keys]").focus();
}

/** The book's JSON with the page's entries: the same shape, every key the editor does not show kept. */
function bookWithEntries() {
  readEntries();
  const data = { ...open.data };
  if (isWorldInfo(data)) data.entries = Object.fromEntries(open.rows.map((row) => [row.uid, row.item]));
  else data.entries = open.rows.map((row) => row.item);
  return data;
}

async function onSave(event) {
  event.preventDefault();
  const form = $("#lore-form");
  const error = $("#lore-error");
  error.hidden = true;
  const name = form.elements.name.value.trim();
  if (!name) {
    error.textContent = t("editor.required", { fields: t("lore.name") });
    error.hidden = false;
    form.elements.name.focus();
    return;
  }
  const save = $("#lore-save");
  save.disabled = true;
  try {
    const saved = await restPost(bookPath(open.id), { name, active: form.elements.active.checked, data: bookWithEntries() });
    ui.toast(t("editor.saved"));
    showBook(saved);
    form.dataset.saved = String(Number(form.dataset.saved || 0) + 1); // the tests wait on it
  } catch (exc) {
    error.textContent = ui.describe(exc);
    error.hidden = false;
  } finally {
    save.disabled = false;
  }
}

function showBook(book) {
  const data = JSON.parse(JSON.stringify(book.data)); // the editor's own copy
  const rows = isWorldInfo(data)
    ? Object.entries(data.entries || {}).filter(([, item]) => item && typeof item === "object").map(([uid, item]) => ({ item, uid }))
    : data.entries.filter((item) => item && typeof item === "object").map((item) => ({ item, uid: null }));
  open = { id: book.id, name: book.name, data, rows };
  const form = $("#lore-form");
  form.elements.name.value = book.name;
  form.elements.active.checked = book.active;
  $("#lore-title").textContent = t("lore.edit_title", { name: book.name });
  document.title = `${$("#lore-title").textContent} · rpserver`;
  renderEntries();
}

/** Show the lorebook screen: the list (`which` null), or the editor of lorebook `which`. */
export async function openLore(which) {
  const view = $("#view-lore");
  view.setAttribute("aria-busy", "true");
  ui.showView("view-lore");
  const editing = Boolean(which);
  $("#lore-list-box").hidden = editing;
  $("#lore-form").hidden = true;
  $("#lore-head-tools").hidden = editing;
  try {
    if (editing) {
      showBook(await restGet(bookPath(which)));
      $("#lore-form").hidden = false;
      $("#lore-form").elements.name.focus();
    } else {
      open = null;
      $("#lore-title").textContent = t("lore.title");
      document.title = `${t("lore.title")} · rpserver`;
      books = (await restGet("/api/v1/lorebooks")).lorebooks;
      renderList();
    }
  } catch (exc) {
    ui.showError(exc);
    if (editing) location.hash = "#/lore";
    return;
  }
  view.setAttribute("aria-busy", "false");
}

/** After a language switch: the words this module wrote (the entries keep what is typed in them). */
export function relabelLore() {
  if ($("#view-lore").hidden) return;
  if (open && !$("#lore-form").hidden) {
    readEntries();
    $("#lore-title").textContent = t("lore.edit_title", { name: open.name });
    renderEntries();
  } else {
    $("#lore-title").textContent = t("lore.title");
    renderList();
  }
}

/** Wire the lorebook screens once; `tools` are app.js's toasts, dialogs and views. */
export function installLore(tools) {
  ui = tools;
  const picker = $("#lore-file");
  picker.addEventListener("change", () => {
    const files = [...picker.files];
    picker.value = "";
    importFiles(files);
  });
  $("#lore-new").addEventListener("click", newBook);
  $("#lore-add-entry").addEventListener("click", addEntry);
  $("#lore-form").addEventListener("submit", onSave);
  $("#lore-export").addEventListener("click", () => exportBook(open));
  $("#lore-delete").addEventListener("click", () => deleteBook(open));
}
