// Message text as DOM nodes. Everything a user or the model wrote goes in
// as text nodes, never as HTML: a reply holding "<img onerror=...>" shows
// those characters and nothing runs.

// Markdown (markdown.js): *actions* and （actions） in italics as before, and
// **strong**, `code`, lists, quotes and http(s) links, all built as nodes.
import { markdownFragment } from "./markdown.js";

/** Replace `element`'s children with `text`, its markdown formatted. */
export function renderMessageText(element, text) {
  element.replaceChildren(markdownFragment(text));
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
