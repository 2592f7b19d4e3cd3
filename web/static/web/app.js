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
import { fillControls, pairsOf, roundsOf } from "./tree.js";

const $ = (selector) => document.querySelector(selector);

const state = {
  config: { demo_model: false, allow_signup: true, max_avatar_bytes: 2 * 1024 * 1024, guest_max_avatar_bytes: 256 * 1024 },
  characters: [],
  chatName: null,      // the character whose chat is open
  branch: null,        // the fork shown (its chat id), or null for the character's main chat
  chat: [],            // its rounds: [[user text or null, character text], ...]
  tree: null,          // the same chat as the tree's REST API shows it: {id, messages, can_undo, ...}
  rounds: [],          // per round: {user, bot}, the tree view's messages (their round ids, alternatives)
  chats: [],           // the character's chats: the main one first, then its forks
  keeping: false,      // after a Stop: the server is storing what was written
  idleWaiters: [],     // whenIdle()'s promises, resolved when the chat is next shown as the server keeps it
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
  // A fork: #/branch/<chat id>/<name>.
  const branch = kind === "branch" && /^\d+$/.test(rest[0] || "") ? Number(rest[0]) : null;
  if (branch) {
    try {
      name = decodeURIComponent(rest.slice(1).join("/")) || null;
    } catch {
      name = null;
    }
  }
  const chatKind = kind === "chat" || (kind === "branch" && branch);
  if (!chatKind || name !== state.chatName || branch !== state.branch) stopReply();
  if (chatKind && name) await openChat(name, branch);
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

async function openChat(name, branch = null) {
  const sameChat = state.chatName === name && state.branch === branch && !$("#view-chat").hidden;
  if (sameChat) return;
  state.chatName = name;
  state.branch = branch;
  $("#chat-name").textContent = name;
  fillAvatar($("#chat-avatar"), name, characterAvatar(name));
  document.title = `${name} · rpserver`;
  $("#messages").replaceChildren();
  document.body.dataset.reply = "loading"; // until the chat is shown (renderChat)
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
  const branch = state.branch;
  const data = await call("/web/chat", { character_name: name, chat: branch ?? undefined });
  if (state.chatName !== name || state.branch !== branch || state.reply) return;
  state.tree = data.tree;
  state.chats = data.chats || [];
  state.rounds = roundsOf(data.tree);
  state.chat = pairsOf(state.rounds);
  renderChat();
  if (!data.busy) {
    state.keeping = false;
    for (const resolve of state.idleWaiters.splice(0)) resolve();
    return;
  }
  // After this page's own Stop, the server is storing what was written; else another tab is writing.
  const waiting = messageElement("bot", state.chat.length, t(state.keeping ? "tree.keeping" : "chat.writing_elsewhere"));
  waiting.classList.add("elsewhere");
  waiting.querySelector(".bubble").classList.add("streaming");
  $("#messages").append(waiting);
  scrollToEnd();
  setBusy(true, { stoppable: false });
  document.body.dataset.reply = "elsewhere";
  const following = state.following = {};
  setTimeout(async () => {
    if (state.following !== following || state.chatName !== name || state.branch !== branch || $("#view-chat").hidden) return;
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
  const message = state.rounds[round] && state.rounds[round][role === "bot" ? "bot" : "user"];
  if (message) item.dataset.id = String(message.round);
  const name = role === "bot" ? state.chatName : current.user_name;
  if (role === "bot") fillAvatar(item.querySelector(".avatar"), name, characterAvatar(name));
  else fillAvatar(item.querySelector(".avatar"), current.guest ? t("chat.you") : current.user_name, null);
  item.querySelector(".speaker-name").textContent = role === "bot" ? state.chatName : t("chat.you");
  setBubbleText(item.querySelector(".bubble"), text);
  return item;
}

function setBubbleText(bubble, text) {
  if ((text === "" || text === null) && !bubble.classList.contains("streaming")) {
    const empty = document.createElement("span");
    empty.className = "empty";
    empty.textContent = t(text === null ? "tree.no_reply_yet" : "chat.empty_reply");
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
    const tree = state.rounds[round] || {};
    if (userText !== null && userText !== undefined) {
      const user = messageElement("user", round, userText);
      if (tree.user) fillControls(user.querySelector(".message-actions"), tree.user, { round, on: controlsOf(round, "user", user) });
      items.push(user);
    }
    const bot = messageElement("bot", round, botText ?? "");
    if (tree.bot && tree.bot.pending) {
      bot.classList.add("pending");
      setBubbleText(bot.querySelector(".bubble"), null);
    }
    if (tree.bot) fillControls(bot.querySelector(".message-actions"), tree.bot, { round, on: controlsOf(round, "bot", bot) });
    if (round < last) {
      bot.classList.add("past");
      // Rewind is the legacy /chat/back, which knows only the main chat.
      if (!state.branch) bot.querySelector(".speaker-actions").append(actionButton(t("chat.rewind"), () => rewind(round)));
    }
    items.push(bot);
  });
  if (state.tree && state.tree.can_undo) items.push(undoNote());
  $("#messages").replaceChildren(...items);
  showBranch();
  setBusy(false);
  document.body.dataset.reply = "idle"; // the chat on the page is what the server keeps
}

/**
 * Once the chat on the page is what the server keeps and nothing holds it (after a Stop: once the
 * server has stored what was written). loadChat resolves it when the server says the chat is free.
 */
function whenIdle() {
  if (document.body.dataset.reply === "idle") return Promise.resolve();
  return new Promise((resolve) => state.idleWaiters.push(resolve));
}

/** What each control under the message `item` (round `round`, "user" or "bot") does. */
function controlsOf(round, role, item) {
  const message = state.rounds[round][role];
  const on = {
    switchTo: (roundId) => changeTree("switch", { round: roundId }),
    edit: () => editMessage(item, message),
  };
  if (role === "bot") {
    on.swipe = () => replyAgain(round, "swipe");
    on.continue = () => replyAgain(round, "continue");
    on.fork = () => fork(message);
  } else {
    on.delete = () => deleteMessage(message);
  }
  return on;
}

/** While a reply is being written: Stop instead of Send (for this page's own reply), the chat's tools off. */
function setBusy(busy, { stoppable = true } = {}) {
  $("#send").hidden = busy && stoppable;
  $("#send").disabled = busy;
  $("#stop").hidden = !busy || !stoppable;
  for (const button of document.querySelectorAll("#messages button, .chat-tools button, .chat-tools select, #draft")) {
    button.disabled = busy || button.dataset.ends === "true";
  }
}

function stopReply() {
  if (state.reply) state.reply.controller.abort();
  state.following = null;
}

/**
 * Stream a reply into `bubble`. `route` is one of the REST API's streams (reply, swipe, continue).
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
    // Stop: the server keeps what was written so far as the reply (the REST API's streams).
    if (exc.name === "AbortError") {
      state.keeping = !!bubble.textContent.trim();
      toast(t(state.keeping ? "chat.stopped" : "chat.stopped_empty"));
    }
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
    for (const resolve of state.idleWaiters.splice(0)) resolve(); // (what the page had: no use waiting)
  }
}

/** The REST API's route for chat operation `operation` on the chat shown (docs/conversation-tree.md). */
function chatRoute(operation) { return `/api/v1/chats/${state.tree.id}/${operation}`; }

async function send(event) {
  if (event) event.preventDefault();
  const box = $("#prompt");
  const prompt = box.value.trim();
  if (!prompt || state.reply || document.body.dataset.reply === "elsewhere" || !state.tree) return;
  const name = state.chatName;
  box.value = "";
  fitComposer();
  const list = $("#messages");
  list.querySelector(".undo-note")?.remove(); // a new message makes the deletion final
  const round = state.chat.length;
  list.append(messageElement("user", round, prompt));
  const bot = messageElement("bot", round, "", true);
  list.append(bot);
  scrollToEnd();
  // Through the tree's REST API: on Stop the server keeps what was written as the reply.
  const final = await streamInto(bot.querySelector(".bubble"), chatRoute("reply"), { prompt });
  if (state.chatName !== name) return;
  const stick = final !== null || nearBottom();
  await reloadChat(name);
  await whenIdle(); // (after a Stop the server may still be storing what was written)
  if (state.chatName !== name) return;
  // Stopped before a word was written (or failed): nothing was kept, so the words go back to the box.
  const kept = state.chat.length > round && state.chat[round][0] === prompt;
  if (!kept && !box.value) {
    box.value = prompt;
    fitComposer();
  }
  if (stick) scrollToEnd();
}

/**
 * A new reply in place of round `round`'s (kind "swipe": another version, or the reply of a message
 * that has none yet) or that reply continued (kind "continue"). The later messages leave the page
 * while it is written; they stay in the tree with the old version.
 */
async function replyAgain(round, kind) {
  if (state.reply || document.body.dataset.reply === "elsewhere") return;
  const name = state.chatName;
  const message = state.rounds[round].bot;
  const item = $(`#messages .message.bot[data-round="${round}"]`);
  let next = item.nextElementSibling;
  while (next) {
    const later = next.nextElementSibling;
    next.remove();
    next = later;
  }
  item.classList.remove("pending", "past");
  item.querySelector(".message-actions").replaceChildren();
  item.querySelector(".speaker-actions").replaceChildren();
  const bubble = item.querySelector(".bubble");
  if (kind === "swipe") bubble.replaceChildren();
  await streamInto(bubble, chatRoute(kind), { round: message.round });
  if (state.chatName !== name) return;
  await reloadChat(name);
}

/** A change that is not a reply (switch, delete, undo): the server answers the chat as it is now. */
async function changeTree(operation, fields = {}) {
  if (state.reply || document.body.dataset.reply === "elsewhere") return;
  const name = state.chatName;
  setBusy(true, { stoppable: false });
  try {
    await call(chatRoute(operation), fields);
  } catch (exc) {
    showError(exc);
  }
  if (state.chatName === name) await reloadChat(name);
}

/** Edit any message, the person's or the character's: the edited text becomes a new version of it. */
function editMessage(item, message) {
  if (state.reply) return;
  const bubble = item.querySelector(".bubble");
  const box = document.createElement("div");
  box.className = "edit-box";
  const text = document.createElement("textarea");
  text.value = message.text ?? "";
  text.rows = Math.min(10, Math.max(3, text.value.split("\n").length + 1));
  text.setAttribute("aria-label", t(message.role === "user" ? "tree.edit_message" : "tree.edit_reply"));
  const buttons = document.createElement("div");
  buttons.className = "form-actions";
  const cancel = actionButton(t("common.cancel"), renderChat);
  cancel.className = "ghost small";
  const save = actionButton(t("common.save"), async () => {
    const value = text.value.trim();
    if (!value) return text.focus();
    if (value === (message.text ?? "").trim()) return renderChat(); // nothing changed: no new version
    const name = state.chatName;
    save.disabled = cancel.disabled = true;
    try {
      await call(chatRoute("edit"), { round: message.round, role: message.role, text: value });
    } catch (exc) {
      showError(exc);
      save.disabled = cancel.disabled = false;
      return;
    }
    if (state.chatName !== name) return;
    await reloadChat(name);
    // The person's edited message has no reply yet: ask for it, as sending it would have.
    const round = state.rounds.findIndex((r) => r.user && r.user.text === value && r.bot.pending);
    if (message.role === "user" && round > 0) await replyAgain(round, "swipe");
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

/** Delete the person's message, its reply and all that follows; a note offers to undo it. */
async function deleteMessage(message) {
  await changeTree("delete", { round: message.round });
  $("#messages .undo-note button")?.focus();
}

function undoNote() {
  const note = document.createElement("li");
  note.className = "undo-note";
  const text = document.createElement("span");
  text.textContent = t("tree.deleted");
  note.append(text, actionButton(t("tree.undo"), () => changeTree("undo")));
  return note;
}

/** A new chat from this message on (a fork: it shares the states kept so far, nothing is copied). */
async function fork(message) {
  if (state.reply || document.body.dataset.reply === "elsewhere") return;
  const name = state.chatName;
  setBusy(true, { stoppable: false });
  let created;
  try {
    created = await call(chatRoute("fork"), { round: message.round });
  } catch (exc) {
    showError(exc);
    if (state.chatName === name) await reloadChat(name);
    return;
  }
  toast(t("tree.forked"));
  location.hash = branchHref(name, created.id);
}

function branchHref(name, id) {
  return id ? `#/branch/${id}/${encodeURIComponent(name)}` : chatHref(name);
}

/** The chat head's choice between the main chat and its branches (forks), when there are any. */
function showBranch() {
  const select = $("#chat-branch");
  const forks = state.chats.filter((chat) => chat.is_fork);
  select.hidden = !forks.length;
  const options = [new Option(t("tree.main_chat"), "")];
  forks.forEach((chat, index) => options.push(new Option(t("tree.branch_n", { n: index + 1 }), String(chat.id))));
  select.replaceChildren(...options);
  select.value = state.branch ? String(state.branch) : "";
  $("#chat-name").textContent = state.chatName;
}

function onBranchChosen(event) {
  location.hash = branchHref(state.chatName, Number(event.target.value) || null);
}

async function rewind(round) {
  if (state.reply) return;
  if (!(await confirmDialog(t("chat.confirm_rewind"), t("chat.confirm_rewind_ok")))) return;
  const name = state.chatName;
  try {
    await call("/chat/back", { character_name: name, log_index: round });
  } catch (exc) {
    showError(exc);
  }
  await reloadChat(name);
  scrollToEnd();
}

async function resetChat() {
  if (state.reply) return;
  const name = state.chatName;
  if (state.branch) { // a fork goes; the main chat stays
    if (!(await confirmDialog(t("tree.confirm_discard"), t("common.delete")))) return;
    try {
      await call(chatRoute("discard"));
    } catch (exc) {
      showError(exc);
      return;
    }
    location.hash = chatHref(name);
    return;
  }
  if (!(await confirmDialog(t("chat.confirm_reset", { name }), t("chat.confirm_reset_ok")))) return;
  try {
    await call("/chat/reset", { character_name: name });
  } catch (exc) {
    showError(exc);
  }
  await reloadChat(name);
}

/** Draft: the model writes the person's next message into the box (stored nowhere), to change or send. */
async function draft() {
  if (state.reply || document.body.dataset.reply === "elsewhere" || !state.tree) return;
  const box = $("#prompt");
  const controller = new AbortController();
  state.reply = { controller };
  document.body.dataset.reply = "drafting";
  setBusy(true);
  const before = box.value;
  try {
    const sampling = loadSampling(session.load().user_name, state.chatName);
    const final = await stream(chatRoute("impersonate"), sampling, (text) => {
      box.value = text;
      fitComposer();
    }, controller.signal);
    box.value = final;
  } catch (exc) {
    if (exc.name !== "AbortError") {
      showError(exc);
      box.value = before;
    }
  } finally {
    state.reply = null;
    fitComposer();
    setBusy(false);
    document.body.dataset.reply = "idle";
    box.focus();
  }
}

async function showContext() {
  try {
    // The main chat through the legacy route (it names a character that is gone); a fork through its own.
    const data = state.branch ? await get(chatRoute("context"))
      : await call("/debug/token", { character_name: state.chatName });
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
  $("#draft").addEventListener("click", draft);
  $("#chat-branch").addEventListener("change", onBranchChosen);
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
