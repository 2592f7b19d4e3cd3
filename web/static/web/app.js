// rpserver's web client: coming in, the characters, the editor and the chat.
// Plain ES modules, no build step. Routes live in the URL's hash:
//   #/            the gallery          #/new, #/edit/<name>   the editor
//   #/chat/<name> a chat           #/personas[/new|/<id>]  personas (personas.js)
//   #/lore[/<id>]  lorebooks (lore.js)

import { ApiError, call, get, session, stream, whenExpired } from "./api.js";
import { fromServer, otherLanguage, setLanguage, t, translatePage } from "./i18n.js";
import { fillAvatar, renderMessageText } from "./text.js";
import { exportCard, installCardImport } from "./cards.js";
import { loadSampling, openSettings, setSamplingFields } from "./settings.js";
import { readAvatar } from "./avatar.js";
import { installPersonas, openPersonas, relabelPersonas, showChatPersona } from "./personas.js";
import { installLore, openLore, relabelLore } from "./lore.js";
import { installTransfer } from "./transfer.js";
import { decorateCard, galleryDrawn, installGalleryFilter } from "./gallery-filter.js";

const $ = (selector) => document.querySelector(selector);

const state = {
  config: { demo_model: false, allow_signup: true, max_avatar_bytes: 2 * 1024 * 1024, guest_max_avatar_bytes: 256 * 1024 },
  characters: [],
  chatName: null,      // the character whose chat is open
  chat: [],            // its rounds: [[user text or null, character text], ...]
  reply: null,         // the reply streaming now: {controller, round, prompt}
  editing: null,       // the editor's character: {name, avatar, avatarChanged} or null for a new one
  authMode: "login",
};

// ---------------------------------------------------------------- messages

// At most this many toasts at once: a burst of failures shows the newest few, never a wall.
const MAX_TOASTS = 3;

/** A short message at the top of the page. The same words already showing are not shown twice. */
function toast(text, kind = "info") {
  const box = $("#toasts");
  let item = [...box.children].find((shown) => shown.textContent === text && shown.dataset.kind === kind);
  if (item) {
    clearTimeout(Number(item.dataset.timer));
    box.append(item); // the newest goes last
  } else {
    item = document.createElement("div");
    item.className = `toast ${kind}`;
    item.dataset.kind = kind;
    item.textContent = text;
    item.addEventListener("click", () => item.remove());
    box.append(item);
    while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
  }
  item.dataset.timer = String(setTimeout(() => item.remove(), kind === "error" ? 6000 : 3500));
}

/** Words for an error, written for people and in the page's language (i18n.js maps the API's messages). */
function describe(error) {
  if (!(error instanceof ApiError)) return t("error.other", { message: String(error && error.message ? error.message : error) });
  if (error.network) return t("error.network");
  if (error.code >= 500) return t("error.server", { message: error.message });
  const known = fromServer(error.message);
  if (known) return known;
  if (error.expired) return t("error.expired");
  if (error.rateLimited) return t("error.rate");
  return t("error.other", { message: error.message });
}

function showError(error) {
  if (error instanceof ApiError && error.expired) return; // handled: back to login
  toast(describe(error), "error");
}

function confirmDialog(text, okLabel) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel || t("common.delete");
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// ---------------------------------------------------------------- coming in

function showAuth(message) {
  stopReply();
  $("#app").hidden = true;
  $("#auth").hidden = false;
  setAuthMode(state.authMode);
  const error = $("#auth-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("#auth-form").user_name.focus();
}

function setAuthMode(mode) {
  if (!state.config.allow_signup) mode = "login";
  state.authMode = mode;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("#tab-signup").hidden = !state.config.allow_signup;
  $("#auth .tabs").hidden = !state.config.allow_signup; // one tab alone is no choice
  const submit = $("#auth-submit");
  submit.dataset.i18n = mode === "signup" ? "auth.create" : "auth.login";
  submit.textContent = t(submit.dataset.i18n);
  $("#auth-form").password.autocomplete = mode === "signup" ? "new-password" : "current-password";
}

async function enter(route, fields, guest) {
  const error = $("#auth-error");
  error.hidden = true;
  const buttons = document.querySelectorAll("#auth button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const data = await call(route, fields);
    session.save(data.user_name, data.token, guest);
    $("#auth-form").reset();
    showApp();
  } catch (exc) {
    error.textContent = route === "/signup" && exc.code === 403 ? t("auth.signup_off") : describe(exc);
    error.hidden = false;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

function onAuthSubmit(event) {
  event.preventDefault();
  const form = event.target;
  const userName = form.user_name.value.trim();
  const password = form.password.value;
  if (!userName || !password) {
    $("#auth-error").textContent = t("auth.missing");
    $("#auth-error").hidden = false;
    return;
  }
  const route = state.authMode === "signup" ? "/signup" : "/login";
  enter(route, { user_name: userName, password }, false);
}

async function logout() {
  const current = session.load();
  // A guest has no password: once the token goes, so do their characters and chats.
  if (current && current.guest && !(await confirmDialog(t("app.confirm_guest_logout"), t("app.logout")))) return;
  stopReply();
  try {
    await call("/logout");
  } catch {
    // The token may already be gone; logging out locally is what matters.
  }
  session.clear();
  location.hash = "#/";
  showAuth();
}

function expired() {
  session.clear();
  showAuth(t("error.expired"));
}

// ---------------------------------------------------------------- the app frame

function showApp() {
  const current = session.load();
  $("#auth").hidden = true;
  $("#app").hidden = false;
  $("#who").textContent = current.guest ? `${t("app.guest")} · ${current.user_name}` : current.user_name;
  $("#who").title = current.user_name;
  refreshCharacters().then(route);
}

async function refreshCharacters() {
  try {
    const data = await call("/web/characters");
    state.characters = data.list || [];
  } catch (exc) {
    showError(exc);
  }
  renderCharacters();
}

function characterAvatar(name) {
  const found = state.characters.find((c) => c.char_name === name);
  return found ? found.avatar : null;
}

function chatHref(name) { return `#/chat/${encodeURIComponent(name)}`; }

function renderCharacters() {
  const cards = $("#cards");
  const side = $("#side-list");
  const cardTemplate = $("#tpl-card").content;
  const sideTemplate = $("#tpl-side-item").content;
  const cardItems = [];
  const sideItems = [];
  for (const character of state.characters) {
    const name = character.char_name;
    const card = cardTemplate.cloneNode(true).firstElementChild;
    card.querySelector(".card-link").href = chatHref(name);
    card.querySelector(".card-name").textContent = name;
    card.querySelector(".card-desc").textContent = character.description || "";
    fillAvatar(card.querySelector(".avatar"), name, character.avatar);
    const edit = card.querySelector(".card-edit");
    edit.href = `#/edit/${encodeURIComponent(name)}`;
    edit.setAttribute("aria-label", `${t("chat.edit_character")}: ${name}`);
    edit.title = t("chat.edit_character");
    decorateCard(card, character);
    cardItems.push(card);
    const item = sideTemplate.cloneNode(true).firstElementChild;
    const link = item.querySelector(".side-item");
    link.href = chatHref(name);
    link.dataset.name = name;
    item.querySelector(".side-name").textContent = name;
    fillAvatar(item.querySelector(".avatar"), name, character.avatar);
    sideItems.push(item);
  }
  const newCard = $("#tpl-new-card").content.cloneNode(true).firstElementChild;
  translatePage(newCard);
  cards.replaceChildren(...cardItems, newCard);
  galleryDrawn(state.characters);
  side.replaceChildren(...sideItems);
  markCurrent();
}

function markCurrent() {
  for (const link of document.querySelectorAll(".side-link")) {
    if (location.hash.startsWith(link.getAttribute("href"))) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const link of document.querySelectorAll(".side-item")) {
    if (link.dataset.name === state.chatName && !$("#view-chat").hidden) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function showView(id) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== id;
  document.body.dataset.view = id;
}

async function route() {
  if (!session.load()) {
    if ($("#auth").hidden) showAuth();
    return;
  }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [, kind, ...rest] = hash.split("/");
  let name = null;
  try {
    name = rest.length ? decodeURIComponent(rest.join("/")) : null;
  } catch {
    // A hand-typed address with a broken %-escape: show the gallery.
  }
  if (kind !== "chat" || name !== state.chatName) stopReply();
  if (kind === "chat" && name) await openChat(name);
  else if (kind === "new") openEditor(null);
  else if (kind === "edit" && name) await openEditor(name);
  else if (kind === "personas") await openPersonas(name);
  else if (kind === "lore") await openLore(name);
  else {
    state.chatName = null;
    showView("view-gallery");
    document.title = "rpserver";
  }
  markCurrent();
}

// ---------------------------------------------------------------- the editor

const REQUIRED = ["bot", "user", "greeting", "bot_persona"];
const LABELS = { bot: "editor.name", user: "editor.user", greeting: "editor.greeting", bot_persona: "editor.persona" };

async function openEditor(name) {
  const form = $("#editor-form");
  form.reset();
  form.setAttribute("aria-busy", "true");  // until the character's fields are in
  $("#editor-error").hidden = true;
  state.editing = { name, avatar: null, avatarChanged: false };
  const title = $("#editor-title");
  if (name) {
    title.removeAttribute("data-i18n");
    title.textContent = t("editor.edit_title", { name });
  } else {
    title.dataset.i18n = "editor.new_title";
    title.textContent = t("editor.new_title");
  }
  $("#editor-delete").hidden = !name;
  $("#export-png").hidden = $("#export-json").hidden = $("#character-chat-import").hidden = !name;
  $("#editor-overwrite").hidden = !name;
  showView("view-editor");
  showChatPersona(null);
  if (name) {
    try {
      const data = await call("/characters/get", { character_name: name });
      if (state.editing.name !== name) return;
      form.bot.value = data.bot ?? name;
      form.user.value = data.user ?? "";
      form.greeting.value = data.greeting ?? "";
      form.bot_persona.value = data.bot_persona ?? "";
      form.example_message.value = data.example_message ?? "";
      form.use_qa.checked = !!data.use_qa && data.use_qa !== "0" && data.use_qa !== "false";
      state.editing.avatar = data.avatar || null;
    } catch (exc) {
      showError(exc);
      location.hash = "#/";
      return;
    }
  }
  document.title = `${title.textContent} · rpserver`;
  showEditorAvatar();
  if (name) showChatPersona(name, form.user.value);
  form.setAttribute("aria-busy", "false");
  form.bot.focus();
}

function showEditorAvatar() {
  const form = $("#editor-form");
  fillAvatar($("#editor-avatar"), form.bot.value || "?", state.editing.avatar);
  $("#avatar-remove").hidden = !state.editing.avatar;
}

/** The most an avatar may weigh for this person: the server stores a re-encoded copy, so aim a little lower. */
function avatarLimit() {
  const current = session.load();
  const limit = current && current.guest
    ? Math.min(state.config.max_avatar_bytes, state.config.guest_max_avatar_bytes)
    : state.config.max_avatar_bytes;
  return Math.floor(limit * 0.85);
}

async function onAvatarChosen(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    state.editing.avatar = await readAvatar(file, avatarLimit());
    state.editing.avatarChanged = true;
    showEditorAvatar();
  } catch {
    toast(t("editor.avatar_bad"), "error");
  }
}

async function onEditorSubmit(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("#editor-error");
  const fields = {
    bot: form.bot.value.trim(),
    user: form.user.value.trim(),
    greeting: form.greeting.value.trim(),
    bot_persona: form.bot_persona.value.trim(),
    example_message: form.example_message.value.trim(),
    use_qa: form.use_qa.checked ? "1" : "0",
  };
  const missing = REQUIRED.filter((name) => !fields[name]);
  if (missing.length) {
    error.textContent = t("editor.required", { fields: missing.map((name) => t(LABELS[name])).join(", ") });
    error.hidden = false;
    form[missing[0]].focus();
    return;
  }
  const editing = state.editing;
  const renamed = editing.name && editing.name !== fields.bot;
  // Leaving `avatar` out keeps the stored one; a new name is a new character, so it gets it sent.
  if (editing.avatarChanged || renamed || !editing.name) fields.avatar = editing.avatar || "";
  const save = $("#editor-save");
  save.disabled = true;
  try {
    await call("/characters/save", fields);
    if (renamed) await call("/characters/del", { character_name: editing.name });
    toast(t("editor.saved"));
    await refreshCharacters();
    state.chatName = null;
    location.hash = chatHref(fields.bot);
  } catch (exc) {
    error.textContent = describe(exc);
    error.hidden = false;
  } finally {
    save.disabled = false;
  }
}

async function deleteCharacter() {
  const name = state.editing && state.editing.name;
  if (!name) return;
  if (!(await confirmDialog(t("editor.confirm_delete", { name }), t("common.delete")))) return;
  try {
    await call("/characters/del", { character_name: name });
    toast(t("editor.deleted", { name }));
    await refreshCharacters();
    location.hash = "#/";
  } catch (exc) {
    showError(exc);
  }
}

// ---------------------------------------------------------------- the chat

async function openChat(name) {
  const sameChat = state.chatName === name && !$("#view-chat").hidden;
  if (sameChat) return;
  state.chatName = name;
  $("#chat-name").textContent = name;
  fillAvatar($("#chat-avatar"), name, characterAvatar(name));
  document.title = `${name} · rpserver`;
  $("#messages").replaceChildren();
  showView("view-chat");
  try {
    await loadChat(name);
  } catch (exc) {
    showError(exc);
    if (!(exc instanceof ApiError && exc.expired)) location.hash = "#/";
    return;
  }
  scrollToEnd();
  if (matchMedia("(hover: hover)").matches) $("#prompt").focus();
}

// While another tab (or request) is writing a reply for this chat, the page asks this often whether it is done.
const FOLLOW_MS = 1000;

/**
 * Show the chat as the server keeps it. When a reply is being written for it elsewhere (another tab, the
 * Vue UI), say so where the reply will appear, and load the chat again once it is done. The text of a reply
 * streams only to the request that asked for it, so this page shows it when it is stored.
 */
async function loadChat(name) {
  const data = await call("/web/chat", { character_name: name });
  if (state.chatName !== name || state.reply) return;
  state.chat = data.chat || [];
  renderChat();
  if (!data.busy) return;
  const waiting = messageElement("bot", state.chat.length, t("chat.writing_elsewhere"));
  waiting.classList.add("elsewhere");
  waiting.querySelector(".bubble").classList.add("streaming");
  $("#messages").append(waiting);
  scrollToEnd();
  setBusy(true, { stoppable: false });
  document.body.dataset.reply = "elsewhere";
  const following = state.following = {};
  setTimeout(async () => {
    if (state.following !== following || state.chatName !== name || $("#view-chat").hidden) return;
    state.following = null;
    try {
      await loadChat(name);
    } catch (exc) {
      showError(exc);
    }
  }, FOLLOW_MS);
}

function nearBottom() {
  const list = $("#messages");
  return list.scrollHeight - list.scrollTop - list.clientHeight < 90;
}

function scrollToEnd() {
  const list = $("#messages");
  list.scrollTop = list.scrollHeight;
}

function messageElement(role, round, text, streaming = false) {
  const item = $("#tpl-message").content.cloneNode(true).firstElementChild;
  if (streaming) item.querySelector(".bubble").classList.add("streaming");
  const current = session.load();
  item.classList.add(role);
  item.dataset.round = String(round);
  const name = role === "bot" ? state.chatName : current.user_name;
  if (role === "bot") fillAvatar(item.querySelector(".avatar"), name, characterAvatar(name));
  else fillAvatar(item.querySelector(".avatar"), current.guest ? t("chat.you") : current.user_name, null);
  item.querySelector(".speaker-name").textContent = role === "bot" ? state.chatName : t("chat.you");
  setBubbleText(item.querySelector(".bubble"), text);
  return item;
}

function setBubbleText(bubble, text) {
  if (text === "" && !bubble.classList.contains("streaming")) {
    const empty = document.createElement("span");
    empty.className = "empty";
    empty.textContent = t("chat.empty_reply");
    bubble.replaceChildren(empty);
  } else {
    renderMessageText(bubble, text);
  }
}

function actionButton(label, handler) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.addEventListener("click", handler);
  return button;
}

function renderChat() {
  const items = [];
  const last = state.chat.length - 1;
  state.chat.forEach(([userText, botText], round) => {
    if (userText !== null && userText !== undefined) items.push(messageElement("user", round, userText));
    const bot = messageElement("bot", round, botText ?? "");
    const actions = bot.querySelector(".message-actions");
    if (round === last && round > 0) {
      actions.append(
        actionButton(t("chat.regenerate"), regenerate),
        actionButton(t("chat.edit"), () => editLastReply(bot)),
      );
    } else if (round < last) {
      bot.classList.add("past");
      bot.querySelector(".speaker-actions").append(actionButton(t("chat.rewind"), () => rewind(round)));
    }
    items.push(bot);
  });
  $("#messages").replaceChildren(...items);
  setBusy(false);
  document.body.dataset.reply = "idle"; // the chat on the page is what the server keeps
}

/** While a reply is being written: Stop instead of Send (for this page's own reply), the chat's tools off. */
function setBusy(busy, { stoppable = true } = {}) {
  $("#send").hidden = busy && stoppable;
  $("#send").disabled = busy;
  $("#stop").hidden = !busy || !stoppable;
  for (const button of document.querySelectorAll("#messages .message-actions button, #messages .speaker-actions button, .chat-tools button")) {
    button.disabled = busy;
  }
}

function stopReply() {
  if (state.reply) state.reply.controller.abort();
  state.following = null;
}

/**
 * Stream a reply into `bubble`. `route` is /chat/reply or /chat/resay.
 * Returns the final text, or null when it was stopped or failed.
 */
async function streamInto(bubble, route, fields) {
  const controller = new AbortController();
  const name = state.chatName;
  state.reply = { controller };
  document.body.dataset.reply = "streaming";
  bubble.classList.add("streaming");
  bubble.closest(".message").dataset.state = "streaming";
  setBusy(true);
  const sampling = loadSampling(session.load().user_name, name);
  try {
    const final = await stream(route, { character_name: name, ...sampling, ...fields }, (text) => {
      const stick = nearBottom();
      bubble.dataset.received = text.length;  // what has come, before markdown (which may hide a `*`)
      renderMessageText(bubble, text);
      if (stick) scrollToEnd();
    }, controller.signal);
    return final;
  } catch (exc) {
    if (exc.name === "AbortError") toast(t("chat.stopped"));
    else showError(exc);
    return null;
  } finally {
    state.reply = null;
    bubble.classList.remove("streaming");
    bubble.closest(".message").dataset.state = "done";
  }
}

/** After a stopped or failed reply: what the server kept (once it has let go of the chat, if it still holds it). */
async function reloadChat(name) {
  try {
    await loadChat(name);
  } catch (exc) {
    showError(exc);
    if (state.chatName === name) renderChat();
  }
}

async function send(event) {
  if (event) event.preventDefault();
  const box = $("#prompt");
  const prompt = box.value.trim();
  if (!prompt || state.reply || document.body.dataset.reply === "elsewhere") return;
  const name = state.chatName;
  box.value = "";
  fitComposer();
  const list = $("#messages");
  const round = state.chat.length;
  list.append(messageElement("user", round, prompt));
  const bot = messageElement("bot", round, "", true);
  list.append(bot);
  scrollToEnd();
  const final = await streamInto(bot.querySelector(".bubble"), "/chat/reply", { prompt });
  if (state.chatName !== name) return;
  if (final === null) {
    if (!box.value) box.value = prompt; // nothing was kept: give the words back
    fitComposer();
    await reloadChat(name);
    return;
  }
  state.chat.push([prompt, final]);
  const stick = nearBottom();
  renderChat();
  if (stick) scrollToEnd();
}

async function regenerate() {
  if (state.reply) return;
  const name = state.chatName;
  const last = $("#messages").lastElementChild;
  last.querySelector(".message-actions").replaceChildren();
  const final = await streamInto(last.querySelector(".bubble"), "/chat/resay", {});
  if (state.chatName !== name) return;
  if (final === null) {
    await reloadChat(name);
    return;
  }
  state.chat[state.chat.length - 1][1] = final;
  renderChat();
}

function editLastReply(item) {
  const bubble = item.querySelector(".bubble");
  const last = state.chat[state.chat.length - 1];
  const box = document.createElement("div");
  box.className = "edit-box";
  const text = document.createElement("textarea");
  text.value = last[1] ?? "";
  text.rows = Math.min(10, Math.max(3, text.value.split("\n").length + 1));
  text.setAttribute("aria-label", t("chat.edit"));
  const buttons = document.createElement("div");
  buttons.className = "form-actions";
  const cancel = actionButton(t("common.cancel"), renderChat);
  cancel.className = "ghost small";
  const save = actionButton(t("common.save"), async () => {
    const message = text.value.trim();
    if (!message) return text.focus();
    save.disabled = true;
    try {
      await call("/chat/tamper", { character_name: state.chatName, message });
      last[1] = message;
    } catch (exc) {
      showError(exc);
    }
    renderChat();
  });
  save.className = "primary small";
  buttons.append(cancel, save);
  box.append(text, buttons);
  bubble.replaceWith(box);
  item.querySelector(".message-actions").replaceChildren();
  text.addEventListener("keydown", (event) => {
    if (event.key === "Escape") renderChat();
  });
  text.focus();
}

async function rewind(round) {
  if (state.reply) return;
  if (!(await confirmDialog(t("chat.confirm_rewind"), t("chat.confirm_rewind_ok")))) return;
  try {
    await call("/chat/back", { character_name: state.chatName, log_index: round });
    state.chat = state.chat.slice(0, round + 1);
  } catch (exc) {
    showError(exc);
  }
  renderChat();
  scrollToEnd();
}

async function resetChat() {
  if (state.reply) return;
  const name = state.chatName;
  if (!(await confirmDialog(t("chat.confirm_reset", { name }), t("chat.confirm_reset_ok")))) return;
  try {
    const data = await call("/chat/reset", { character_name: name });
    state.chat = data.chat || [];
  } catch (exc) {
    showError(exc);
  }
  renderChat();
}

async function showContext() {
  try {
    const data = await call("/debug/token", { character_name: state.chatName });
    $("#context-count").textContent = t("context.count", { count: data.token_count });
    $("#context-text").textContent = data.token_state;
    $("#context-dialog").showModal();
    const pre = $("#context-text");
    pre.scrollTop = pre.scrollHeight;
  } catch (exc) {
    showError(exc);
  }
}

function fitComposer() {
  const box = $("#prompt");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight + 2, 180)}px`;
}

function onPromptKey(event) {
  // Enter sends, Shift+Enter is a new line; Enter that ends an IME composition (Chinese input) does neither.
  if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
  event.preventDefault();
  send();
}

// ---------------------------------------------------------------- start

function wire() {
  document.addEventListener("click", (event) => {
    const target = event.target.closest("[data-action]");
    if (!target) return;
    const actions = {
      "switch-language": () => { setLanguage(otherLanguage()); relabel(); },
      guest: () => enter("/login/tmp", {}, true),
      logout,
      settings: () => openSettings(session.load().user_name, state.chatName),
      context: showContext,
      "edit-character": () => { location.hash = `#/edit/${encodeURIComponent(state.chatName)}`; },
      reset: resetChat,
      "dismiss-demo": dismissDemoNote,
    };
    if (actions[target.dataset.action]) actions[target.dataset.action]();
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => { setAuthMode(tab.dataset.mode); $("#auth-error").hidden = true; });
  }
  $("#auth-form").addEventListener("submit", onAuthSubmit);
  $("#editor-form").addEventListener("submit", onEditorSubmit);
  $("#editor-form").bot.addEventListener("input", () => { if (!state.editing.avatar) showEditorAvatar(); });
  $("#avatar-input").addEventListener("change", onAvatarChosen);
  $("#avatar-remove").addEventListener("click", () => {
    state.editing.avatar = null;
    state.editing.avatarChanged = true;
    showEditorAvatar();
  });
  $("#editor-delete").addEventListener("click", deleteCharacter);
  $("#export-png").addEventListener("click", () => exportCard(state.editing.name, "png").catch(showError));
  $("#export-json").addEventListener("click", () => exportCard(state.editing.name, "json").catch(showError));
  installCardImport($("#card-file"), $("#view-gallery"), (name) => {
    toast(t("cards.imported", { name }));
    refreshCharacters();
  }, showError);
  $("#composer").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", onPromptKey);
  $("#prompt").addEventListener("input", fitComposer);
  $("#stop").addEventListener("click", stopReply);
  window.addEventListener("hashchange", route);
  whenExpired(expired);
  installPersonas({ toast, showError, describe, confirmDialog, showView, avatarLimit });
  installLore({ toast, showError, describe, confirmDialog, showView });
  installTransfer({
    chatName: () => state.chatName, editingName: () => state.editing?.name, userName: () => session.load().user_name,
    toast, showError, openChat: (name) => { location.hash = chatHref(name); },
    chatImported: (name) => loadChat(name).then(scrollToEnd), accountImported: refreshCharacters,
  });
  installGalleryFilter();
}

/** After a language switch: the static labels, and what the script wrote. */
function relabel() {
  if (!$("#app").hidden) {
    renderCharacters();
    if (!$("#view-chat").hidden && !state.reply) renderChat();
    if (!$("#view-editor").hidden && state.editing && state.editing.name) {
      $("#editor-title").textContent = t("editor.edit_title", { name: state.editing.name });
    }
    relabelPersonas();
    relabelLore();
    showAppLabels();
  } else {
    setAuthMode(state.authMode);
  }
}

function showAppLabels() {
  const current = session.load();
  if (current) $("#who").textContent = current.guest ? `${t("app.guest")} · ${current.user_name}` : current.user_name;
}

// The demo-model note, once dismissed, stays away on this browser.
const DEMO_NOTE_KEY = "rpserver.demo_note";

function dismissDemoNote() {
  localStorage.setItem(DEMO_NOTE_KEY, "dismissed");
  $("#demo-note").hidden = true;
}

async function start() {
  translatePage();
  wire();
  try {
    state.config = { ...state.config, ...(await get("/web/config")) };
  } catch {
    // An older server without the config route: the defaults do.
  }
  setSamplingFields(state.config.sampling);
  $("#demo-note").hidden = !state.config.demo_model || localStorage.getItem(DEMO_NOTE_KEY) === "dismissed";
  if (session.load()) showApp();
  else showAuth();
}

start();
