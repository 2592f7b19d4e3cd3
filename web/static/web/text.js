// Message text as DOM nodes. Everything a user or the model wrote goes in
// as text nodes, never as HTML: a reply holding "<img onerror=...>" shows
// those characters and nothing runs.

// *an action* and （an action） are shown in italics, as the Vue UI does.
const ACTION = /\*([^*\n]+)\*|（[^（）\n]*）/g;

/** Replace `element`'s children with `text`, actions in <em>. */
export function renderMessageText(element, text) {
  const fragment = document.createDocumentFragment();
  let at = 0;
  for (const match of text.matchAll(ACTION)) {
    if (match.index > at) fragment.append(document.createTextNode(text.slice(at, match.index)));
    const em = document.createElement("em");
    em.textContent = match[1] !== undefined ? match[1] : match[0];
    fragment.append(em);
    at = match.index + match[0].length;
  }
  if (at < text.length) fragment.append(document.createTextNode(text.slice(at)));
  element.replaceChildren(fragment);
}

/** A colour for a name, so letter avatars are told apart at a glance. */
export function nameColour(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 45% 32%)`; // dark enough for white letters (4.5:1 at every hue)
}

/** Fill an avatar element: the image, or the name's first letter on its colour. */
export function fillAvatar(element, name, src) {
  element.replaceChildren();
  element.style.backgroundColor = "";
  if (src) {
    const img = document.createElement("img");
    img.alt = "";
    img.src = src;
    img.decoding = "async";
    element.append(img);
    return;
  }
  element.textContent = Array.from((name || "?").trim())[0] || "?";
  element.style.backgroundColor = nameColour(name || "?");
}
