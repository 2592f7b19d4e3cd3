// The conversation tree in the chat (docs/conversation-tree.md): what the page knows of each message
// (its round's id, its alternatives) and the controls under it. app.js does the work each control
// asks for, through the REST API under /api/v1/chats/<id>.

import { t } from "./i18n.js";

/**
 * The tree view's messages (GET /api/v1/chats/<id>, or /web/chat's `tree`) as the page's rounds:
 * [{user: message or null, bot: message}], one per round of the current path, round 0 first.
 */
export function roundsOf(tree) {
  const rounds = [];
  for (const message of tree.messages) {
    if (message.role === "user") rounds.push({ user: message, bot: null });
    else if (!rounds.length || rounds[rounds.length - 1].bot) rounds.push({ user: null, bot: message });
    else rounds[rounds.length - 1].bot = message;
  }
  return rounds;
}

/** The rounds as the legacy chat log: [[person's text or null, the reply ("" when there is none yet)]]. */
export function pairsOf(rounds) {
  return rounds.map(({ user, bot }) => [user ? user.text : null, bot.pending ? "" : bot.text]);
}

function button(label, handler, { className = "", aria = null } = {}) {
  const made = document.createElement("button");
  made.type = "button";
  made.textContent = label;
  if (className) made.className = className;
  if (aria) made.setAttribute("aria-label", aria);
  made.addEventListener("click", handler);
  return made;
}

/** ‹ n/m ›: the message's alternatives, one step either way (switching reads no token). */
function versions(message, onSwitch) {
  const box = document.createElement("span");
  box.className = "versions";
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", t("tree.versions"));
  const { position, alternatives } = message;
  const count = alternatives.length;
  const previous = button("‹", () => onSwitch(alternatives[position - 2]), { className: "step", aria: t("tree.previous") });
  const next = button("›", () => onSwitch(alternatives[position]), { className: "step", aria: t("tree.next") });
  previous.disabled = position <= 1;
  next.disabled = position >= count;
  previous.dataset.ends = String(position <= 1); // (setBusy turns the buttons back on: these stay off)
  next.dataset.ends = String(position >= count);
  const where = document.createElement("span");
  where.className = "position";
  where.textContent = `${position}/${count}`;
  where.title = t("tree.position", { position, count });
  box.append(previous, where, next);
  return box;
}

/**
 * The controls under one message, in `actions` (its .message-actions). `message` is the tree view's
 * message; `round` its round's place on the path (0 is the greeting); `last` whether it is the last
 * message. `on` has the handlers: switchTo(roundId), swipe(), continue(), edit(), fork(), delete().
 */
export function fillControls(actions, message, { round, on }) {
  const items = [];
  if (message.alternatives.length > 1) items.push(versions(message, on.switchTo));
  if (message.role === "character") {
    if (message.pending) {
      items.push(button(t("tree.write_reply"), on.swipe, { className: "write-reply", aria: t("tree.write_reply") }));
    } else if (round > 0) {
      items.push(button(t("chat.regenerate"), on.swipe, { aria: t("tree.swipe") }));
      if (message.text) items.push(button(t("tree.continue"), on.continue, { aria: t("tree.continue_label") }));
    }
    if (!message.pending) items.push(button(t("chat.edit"), on.edit, { aria: t("tree.edit_reply") }));
    if (on.fork && !message.pending) items.push(button(t("tree.fork"), on.fork, { aria: t("tree.fork_label") }));
  } else {
    items.push(button(t("chat.edit"), on.edit, { aria: t("tree.edit_message") }));
    if (on.delete) items.push(button(t("common.delete"), on.delete, { className: "delete", aria: t("tree.delete_label") }));
  }
  actions.replaceChildren(...items);
}
