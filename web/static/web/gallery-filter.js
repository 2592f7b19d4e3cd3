// Search and tags in the gallery: each card shows its tags (from the character
// card it was imported from), a row of tag buttons filters by tag, and the search
// box by name, tag or the line about the character. All in the page: the gallery
// holds every character (POST /web/characters).

const $ = (selector) => document.querySelector(selector);
const MAX_TAG_BUTTONS = 24;
const SHOWN_TAGS_PER_CARD = 3;

let chosenTag = null; // the tag button pressed, or null

function fold(text) { return String(text || "").toLocaleLowerCase(); }

/** Put `character`'s tags on its gallery card, and what the search reads in it. */
export function decorateCard(card, character) {
  const tags = character.tags || [];
  card.dataset.search = fold([character.char_name, character.description, ...tags].join("\n"));
  card.dataset.tags = JSON.stringify(tags.map(fold));
  if (!tags.length) return;
  const row = document.createElement("span");
  row.className = "card-tags";
  for (const tag of tags.slice(0, SHOWN_TAGS_PER_CARD)) {
    const chip = document.createElement("span");
    chip.className = "tag";
    chip.textContent = tag;
    row.append(chip);
  }
  card.querySelector(".card-link").append(row);
}

/** The tag buttons: the gallery's tags, the most used first. */
function renderTagButtons(characters) {
  const counts = new Map();
  for (const character of characters) {
    for (const tag of character.tags || []) {
      const key = fold(tag);
      const seen = counts.get(key) || { tag, count: 0 };
      seen.count += 1;
      counts.set(key, seen);
    }
  }
  const ranked = [...counts.values()].sort((a, b) => b.count - a.count || a.tag.localeCompare(b.tag))
    .slice(0, MAX_TAG_BUTTONS);
  if (chosenTag !== null && !counts.has(chosenTag)) chosenTag = null;
  const buttons = ranked.map(({ tag }) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "tag-button small";
    button.textContent = tag;
    button.dataset.tag = fold(tag);
    button.setAttribute("aria-pressed", String(fold(tag) === chosenTag));
    button.addEventListener("click", () => {
      chosenTag = chosenTag === fold(tag) ? null : fold(tag);
      for (const other of $("#gallery-tags").children) other.setAttribute("aria-pressed", String(other.dataset.tag === chosenTag));
      filterGallery();
    });
    return button;
  });
  $("#gallery-tags").replaceChildren(...buttons);
  $("#gallery-tags").hidden = buttons.length === 0;
}

/** Show the cards that hold every word of the search and the chosen tag; say so when none do. */
export function filterGallery() {
  const words = fold($("#gallery-search").value).split(/\s+/).filter(Boolean);
  let shown = 0;
  for (const card of document.querySelectorAll("#cards .card:not(.new-card)")) {
    const matches = words.every((word) => card.dataset.search.includes(word))
      && (chosenTag === null || JSON.parse(card.dataset.tags).includes(chosenTag));
    card.hidden = !matches;
    if (matches) shown += 1;
  }
  const filtering = words.length > 0 || chosenTag !== null;
  const newCard = $("#cards .new-card");
  if (newCard) newCard.hidden = filtering;
  const note = $("#gallery-none");
  note.hidden = !filtering || shown > 0;
  $("#cards").dataset.shown = String(shown); // how many match: the tests wait on it
}

/** After the gallery is drawn: its tag buttons, and the current search applied. */
export function galleryDrawn(characters) {
  renderTagButtons(characters);
  filterGallery();
}

export function installGalleryFilter() {
  $("#gallery-search").addEventListener("input", filterGallery);
  $("#gallery-search").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && event.target.value) {
      event.target.value = "";
      filterGallery();
    }
  });
}
