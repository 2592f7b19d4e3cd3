// Markdown in messages, built as DOM nodes from text: never an HTML string,
// so whatever a user or the model wrote ("<img onerror=...>") shows as those
// characters and nothing runs.
//
// Blocks: ``` fenced code ```, "> " quotes, "- "/"* "/"+ " and "1. " lists;
// other lines stay lines of text. Inline: `code`, **strong**, *emphasis*,
// [links](https://...). *Actions* and （actions） are in italics, as they
// always were (emphasis is <em> too). No _underscore_ emphasis: role-play
// writes actions with stars, and underscores are common in names and code. A link is only
// made for http:, https: and mailto: targets (never javascript: or data:),
// and opens in a new tab with rel="noopener noreferrer".

const INLINE = new RegExp([
  /`([^`\n]+)`/.source, // 1: code
  /\*\*(\S(?:[^*\n]*?\S)?)\*\*/.source, // 2: strong (no space just inside the stars, as CommonMark)
  /\*([^*\n]+)\*/.source, // 3: emphasis, *an action* (as the page always showed it)
  /（[^（）\n]*）/.source, // （an action）
  /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 4, 5: a link
].join("|"), "gu");

const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

function element(tag, children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

/** The inline markdown of one line of `text` as DOM nodes. */
export function inlineNodes(text) {
  const nodes = [];
  let at = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > at) nodes.push(document.createTextNode(text.slice(at, match.index)));
    at = match.index + match[0].length;
    const [whole, code, strong, em, label, href] = match;
    if (code !== undefined) {
      const node = document.createElement("code");
      node.textContent = code;
      nodes.push(node);
    } else if (strong !== undefined) {
      nodes.push(element("strong", inlineNodes(strong)));
    } else if (em !== undefined) {
      nodes.push(element("em", inlineNodes(em)));
    } else if (label !== undefined) {
      if (SAFE_LINK.test(href)) {
        const link = element("a", inlineNodes(label));
        link.href = href;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        nodes.push(link);
      } else {
        nodes.push(document.createTextNode(whole)); // shown as written, never a link
      }
    } else {
      nodes.push(element("em", [whole])); // （an action）, brackets kept
    }
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

const FENCE = /^\s*```/;
const QUOTE = /^\s*> ?(.*)$/;
const BULLET = /^\s*[-*+] (.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)] (.*)$/;

/** `text` as DOM nodes: blocks of lines, each line's inline markdown. */
export function markdownFragment(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let needsBreak = false; // a "\n" before the next line of plain text
  const addText = (nodes) => {
    if (needsBreak) fragment.append("\n");
    fragment.append(...nodes);
    needsBreak = true;
  };
  const addBlock = (node) => {
    fragment.append(node);
    needsBreak = false;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (FENCE.test(line)) {
      const body = [];
      while (i + 1 < lines.length && !FENCE.test(lines[i + 1])) body.push(lines[++i]);
      if (i + 1 < lines.length) i++; // the closing fence (a reply still streaming may not have it yet)
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      addBlock(element("pre", [code]));
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].match(QUOTE)[1]);
      i--;
      addBlock(element("blockquote", quoted.flatMap((q, n) => (n ? ["\n", ...inlineNodes(q)] : inlineNodes(q)))));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const pattern = BULLET.test(line) ? BULLET : NUMBERED;
      const items = [];
      for (; i < lines.length && pattern.test(lines[i]); i++) {
        items.push(element("li", inlineNodes(lines[i].match(pattern)[1])));
      }
      i--;
      addBlock(element(pattern === BULLET ? "ul" : "ol", items));
    } else {
      addText(inlineNodes(line));
    }
  }
  return fragment;
}
