// Sampling settings (the legacy API's fields), kept per character in this
// browser. Their ranges and defaults come from the server (/web/config,
// web/services.py), where the API that checks them defines them.

import { t } from "./i18n.js";

let FIELDS = [];

/** The fields as the server's config lists them: [{name, min, max, step, value}]. */
export function setSamplingFields(fields) {
  FIELDS = Array.isArray(fields) ? fields : [];
}

function key(userName, character) {
  return `rpserver.sampling.${userName}.${character}`;
}

function defaults() {
  return Object.fromEntries(FIELDS.map((field) => [field.name, field.value]));
}

/** The settings for one character: the saved ones, clamped to their ranges, else the defaults. */
export function loadSampling(userName, character) {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(key(userName, character)) || "{}") || {};
  } catch {
    saved = {};
  }
  const values = defaults();
  for (const field of FIELDS) {
    const number = Number(saved[field.name]);
    if (saved[field.name] !== undefined && Number.isFinite(number)) {
      values[field.name] = Math.min(field.max, Math.max(field.min, number));
    }
  }
  return values;
}

function saveSampling(userName, character, values) {
  localStorage.setItem(key(userName, character), JSON.stringify(values));
}

/** Open the settings dialog for one character; every change is saved at once. */
export function openSettings(userName, character) {
  const dialog = document.getElementById("settings-dialog");
  const list = document.getElementById("sliders");
  const values = loadSampling(userName, character);
  const rows = FIELDS.map((field) => {
    const row = document.createElement("div");
    row.className = "slider-row";
    const label = document.createElement("label");
    label.className = "slider-label";
    label.htmlFor = `sampling-${field.name}`;
    const title = document.createElement("span");
    title.textContent = t(`settings.${field.name}`);
    const range = document.createElement("small");
    range.textContent = `${field.min} – ${field.max} · ${field.value}`;
    label.append(title, range);
    const slider = document.createElement("input");
    slider.type = "range";
    const number = document.createElement("input");
    number.type = "number";
    number.id = `sampling-${field.name}`;
    number.name = field.name;
    for (const input of [slider, number]) {
      input.min = String(field.min);
      input.max = String(field.max);
      input.step = String(field.step);
      input.value = String(values[field.name]);
    }
    slider.setAttribute("aria-label", t(`settings.${field.name}`));
    const update = (source, other) => {
      const value = Number(source.value);
      if (!Number.isFinite(value) || source.value === "") return;
      values[field.name] = Math.min(field.max, Math.max(field.min, value));
      other.value = String(values[field.name]);
      saveSampling(userName, character, values);
    };
    slider.addEventListener("input", () => update(slider, number));
    number.addEventListener("change", () => { update(number, slider); number.value = String(values[field.name]); });
    row.append(label, slider, number);
    return row;
  });
  list.replaceChildren(...rows);
  document.getElementById("settings-defaults").onclick = () => {
    localStorage.removeItem(key(userName, character));
    dialog.close();
    openSettings(userName, character);
  };
  dialog.showModal();
}
