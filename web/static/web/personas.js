// The persona manager (#/personas, #/personas/new, #/personas/<id>) and the choice
// of who the person is in one character's chat (in that character's editor).
// The API is /api/v1/personas and /api/v1/characters/<name>/persona (docs/cards.md).

import { restGet, restPost } from "./rest.js";
import { t } from "./i18n.js";
import { fillAvatar } from "./text.js";
import { readAvatar } from "./avatar.js";

const $ = (selector) => document.querySelector(selector);

let ui = null;           // from app.js: {toast, showError, describe, confirmDialog, showView, avatarLimit}
let personas = [];       // as the server last listed them
let editing = null;      // the form's persona: {id or null, avatar, avatarChanged}
let chatCharacter = null; // the character whose chat the editor's choice is about
let chosenNow = "";      // the select's value as the server has it ("" = the default)

function personaPath(id) { return `/api/v1/personas/${id}`; }
function chatPersonaPath(name) { return `/api/v1/characters/${encodeURIComponent(name)}/persona`; }

async function loadPersonas() {
  personas = (await restGet("/api/v1/personas")).personas;
  return personas;
}

// ---------------------------------------------------------------- the list

function renderList() {
  const items = personas.map((persona) => {
    const item = document.createElement("li");
    item.className = "item";
    item.dataset.id = String(persona.id);
    const avatar = document.createElement("span");
    avatar.className = "avatar";
    fillAvatar(avatar, persona.name, persona.avatar);
    const text = document.createElement("div");
    text.className = "item-text";
    const name = document.createElement("a");
    name.className = "item-name";
    name.href = `#/personas/${persona.id}`;
    name.textContent = persona.name;
    text.append(name);
    if (persona.default) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = t("personas.is_default");
      text.append(" ", badge);
    }
    const description = document.createElement("p");
    description.className = "item-desc";
    description.textContent = persona.description;
    text.append(description);
    const actions = document.createElement("div");
    actions.className = "item-actions";
    if (!persona.default) {
      const makeDefault = document.createElement("button");
      makeDefault.type = "button";
      makeDefault.className = "ghost small";
      makeDefault.textContent = t("personas.make_default");
      makeDefault.setAttribute("aria-label", `${t("personas.make_default")}: ${persona.name}`);
      makeDefault.addEventListener("click", () => makeDefaultPersona(persona));
      actions.append(makeDefault);
    }
    const edit = document.createElement("a");
    edit.className = "button ghost small";
    edit.href = `#/personas/${persona.id}`;
    edit.textContent = t("chat.edit");
    edit.setAttribute("aria-label", `${t("chat.edit")}: ${persona.name}`);
    actions.append(edit);
    item.append(avatar, text, actions);
    return item;
  });
  $("#persona-list").replaceChildren(...items);
  $("#persona-empty").hidden = personas.length > 0;
}

async function makeDefaultPersona(persona) {
  const ok = await ui.confirmDialog(t("personas.confirm_default", { name: persona.name }), t("personas.make_default"));
  if (!ok) return;
  try {
    await restPost(personaPath(persona.id), { default: true });
    ui.toast(t("personas.default_set", { name: persona.name }));
    await loadPersonas();
    renderList();
  } catch (exc) {
    ui.showError(exc);
  }
}

// ---------------------------------------------------------------- the form

function showFormAvatar() {
  const form = $("#persona-form");
  fillAvatar($("#persona-avatar"), form.elements.name.value || "?", editing.avatar);
  $("#persona-avatar-remove").hidden = !editing.avatar;
}

function openForm(persona) {
  const form = $("#persona-form");
  form.reset();
  $("#persona-error").hidden = true;
  editing = { id: persona ? persona.id : null, avatar: persona ? persona.avatar : null, avatarChanged: false };
  $("#persona-form-title").textContent = persona ? t("personas.edit_title", { name: persona.name }) : t("personas.new_title");
  if (persona) {
    form.elements.name.value = persona.name;
    form.elements.description.value = persona.description;
    form.elements.default.checked = persona.default;
  } else {
    form.elements.default.checked = personas.length === 0; // the first one is who the person is
  }
  $("#persona-delete").hidden = !persona;
  showFormAvatar();
  form.hidden = false;
  $("#persona-list-box").hidden = true;
  $("#persona-new").hidden = true;
  form.elements.name.focus();
}

async function onSubmit(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("#persona-error");
  const name = form.elements.name.value.trim();
  if (!name) {
    error.textContent = t("editor.required", { fields: t("personas.name") });
    error.hidden = false;
    form.elements.name.focus();
    return;
  }
  const fields = { name, description: form.elements.description.value.trim() };
  const wasDefault = editing.id !== null && personas.some((p) => p.id === editing.id && p.default);
  // Unticking the default box leaves the person with no default: sent as false only when it was ticked before.
  if (form.elements.default.checked || wasDefault) fields.default = form.elements.default.checked;
  if (editing.avatarChanged || editing.id === null) fields.avatar = editing.avatar || "";
  const save = $("#persona-save");
  save.disabled = true;
  try {
    await restPost(editing.id === null ? "/api/v1/personas" : personaPath(editing.id), fields);
    ui.toast(t("editor.saved"));
    location.hash = "#/personas";
  } catch (exc) {
    error.textContent = ui.describe(exc);
    error.hidden = false;
  } finally {
    save.disabled = false;
  }
}

async function onDelete() {
  const persona = personas.find((p) => p.id === editing.id);
  if (!persona) return;
  if (!(await ui.confirmDialog(t("personas.confirm_delete", { name: persona.name }), t("common.delete")))) return;
  try {
    await restPost(`${personaPath(persona.id)}/delete`);
    ui.toast(t("editor.deleted", { name: persona.name }));
    location.hash = "#/personas";
  } catch (exc) {
    $("#persona-error").textContent = ui.describe(exc);
    $("#persona-error").hidden = false;
  }
}

async function onAvatarChosen(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  try {
    editing.avatar = await readAvatar(file, ui.avatarLimit());
    editing.avatarChanged = true;
    showFormAvatar();
  } catch {
    ui.toast(t("editor.avatar_bad"), "error");
  }
}

/** Show the persona screen: the list (`which` absent), the form for a new one ("new"), or for persona `which`. */
export async function openPersonas(which) {
  const view = $("#view-personas");
  view.setAttribute("aria-busy", "true");
  ui.showView("view-personas");
  $("#persona-form").hidden = true;
  $("#persona-list-box").hidden = false;
  $("#persona-new").hidden = false;
  document.title = `${t("personas.title")} · rpserver`;
  try {
    await loadPersonas();
  } catch (exc) {
    ui.showError(exc);
    return;
  }
  if (which === "new") {
    openForm(null);
  } else if (which) {
    const persona = personas.find((p) => String(p.id) === which);
    if (!persona) {
      location.hash = "#/personas";
      return;
    }
    openForm(persona);
  } else {
    renderList();
  }
  view.setAttribute("aria-busy", "false");
}

// ---------------------------------------------------------------- one chat's persona (in the editor)

function option(value, text) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = text;
  return item;
}

/** In the editor of `name` (null: a new character, which has no chat yet), the choice of who the person is in its chat. */
export async function showChatPersona(name, userName) {
  const box = $("#chat-persona");
  chatCharacter = name;
  box.hidden = true;
  if (!name) return;
  let chosen;
  try {
    [chosen] = await Promise.all([restGet(chatPersonaPath(name)), loadPersonas()]);
  } catch (exc) {
    ui.showError(exc);
    return;
  }
  if (chatCharacter !== name) return; // another editor opened meanwhile
  const byDefault = personas.find((p) => p.default);
  const select = $("#chat-persona-select");
  select.replaceChildren(
    option("", byDefault ? t("personas.chat_default", { name: byDefault.name }) : t("personas.chat_none", { name: userName })),
    ...personas.map((p) => option(String(p.id), p.name)),
  );
  chosenNow = chosen.chosen === null ? "" : String(chosen.chosen);
  select.value = chosenNow;
  box.dataset.chosen = chosenNow; // what the server has: the tests wait on it
  box.hidden = false;
}

async function onChatPersonaChosen() {
  const select = $("#chat-persona-select");
  const name = chatCharacter;
  const value = select.value;
  if (value === chosenNow) return;
  const label = select.selectedOptions[0].textContent;
  if (!(await ui.confirmDialog(t("personas.confirm_chat", { name, persona: label }), t("personas.choose")))) {
    select.value = chosenNow;
    return;
  }
  try {
    const data = await restPost(chatPersonaPath(name), { persona: value === "" ? null : Number(value) });
    chosenNow = data.chosen === null ? "" : String(data.chosen);
    ui.toast(t("personas.chat_chosen", { name }));
  } catch (exc) {
    ui.showError(exc);
  }
  select.value = chosenNow;
  $("#chat-persona").dataset.chosen = chosenNow;
}

/** After a language switch: the words this module wrote. */
export function relabelPersonas() {
  if (!$("#view-personas").hidden) {
    renderList();
    if (editing && !$("#persona-form").hidden) {
      const persona = personas.find((p) => p.id === editing.id);
      $("#persona-form-title").textContent = persona ? t("personas.edit_title", { name: persona.name }) : t("personas.new_title");
    }
  }
  if (!$("#chat-persona").hidden) {
    const byDefault = personas.find((p) => p.default);
    const first = $("#chat-persona-select").options[0];
    first.textContent = byDefault ? t("personas.chat_default", { name: byDefault.name })
      : t("personas.chat_none", { name: $("#editor-form").user.value });
  }
}

/** Wire the persona screens once; `tools` are app.js's toasts, dialogs and views. */
export function installPersonas(tools) {
  ui = tools;
  $("#persona-form").addEventListener("submit", onSubmit);
  $("#persona-delete").addEventListener("click", onDelete);
  $("#persona-avatar-input").addEventListener("change", onAvatarChosen);
  $("#persona-avatar-remove").addEventListener("click", () => {
    editing.avatar = null;
    editing.avatarChanged = true;
    showFormAvatar();
  });
  $("#persona-form").elements.name.addEventListener("input", () => { if (!editing.avatar) showFormAvatar(); });
  $("#chat-persona-select").addEventListener("change", onChatPersonaChosen);
}
