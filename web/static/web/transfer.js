import { ApiError } from "./api.js";
import { t } from "./i18n.js";
import { restDownload, restGet, restPost } from "./rest.js";

// Chats and the whole account, out and in (docs/import-export.md): the chat's export
// (SillyTavern's JSONL) and import in the chat's head, the import on a character's
// page too, the account file (a zip) in the
// account menu of the top bar. (The module line stays first, as in cards.js:
// collectstatic's hashing reads "import"/"export" in a comment above it as a statement.)
// Everything goes through rest.js; the strings are i18n.js's "transfer.*".

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Download the main chat with `character` as a .jsonl file. */
export async function exportChat(character) {
  const { chats } = await restGet(`/api/v1/chats?character=${encodeURIComponent(character)}`);
  await restDownload(`/api/v1/chats/${chats[0].id}/export`, `${character}.jsonl`);
}

/** Import a chat file as the main chat with `character`; the chat as the REST API shows it. */
export async function importChat(character, file) {
  return restPost("/api/v1/chats/import", { character, file: await readAsDataUrl(file) });
}

export async function exportAccount(userName) {
  await restDownload("/api/v1/account/export", `${userName}.zip`);
}

export async function importAccount(file) {
  return restPost("/api/v1/account/import", { file: await readAsDataUrl(file) });
}

/** Take the file chosen in `picker` (and clear it, so that the same file can be chosen again). */
function onFileChosen(picker, handle) {
  picker.addEventListener("change", () => {
    const [file] = picker.files;
    picker.value = "";
    if (file) handle(file);
  });
}

/**
 * Wire the buttons: #chat-export and #chat-import-file in the chat's head,
 * #character-chat-import-file on a character's page, #account-export and
 * #account-import-file in the account menu. `app` gives the open chat's character
 * (`chatName()`), the character whose page is open (`editingName()`), the user's name
 * (`userName()`), what to do after an import (`chatImported(name)`, `openChat(name)`,
 * `accountImported()`) and how to tell the person (`toast`, `showError`).
 */
export function installTransfer(app) {
  const busy = (element, on) => element.closest(".file-button, button")?.setAttribute("aria-busy", String(on));
  document.getElementById("chat-export").addEventListener("click", () => {
    exportChat(app.chatName()).catch(app.showError);
  });
  // A chat file imported for `name()`'s character, then `shown(name)`.
  const chatImport = (picker, name, shown) => onFileChosen(picker, async (file) => {
    const character = name();
    busy(picker, true);
    app.toast(t("transfer.working"));
    try {
      await importChat(character, file);
      app.toast(t("transfer.chat_imported"));
      await shown(character);
    } catch (exc) {
      app.showError(exc instanceof ApiError ? new ApiError(`${file.name}: ${exc.message}`, exc.code) : exc);
    } finally {
      busy(picker, false);
    }
  });
  chatImport(document.getElementById("chat-import-file"), app.chatName, app.chatImported);
  // The same on a character's page (the editor of a stored character): its chat is opened.
  chatImport(document.getElementById("character-chat-import-file"), app.editingName, app.openChat);
  document.getElementById("account-export").addEventListener("click", () => {
    exportAccount(app.userName()).catch(app.showError);
  });
  const accountPicker = document.getElementById("account-import-file");
  onFileChosen(accountPicker, async (file) => {
    busy(accountPicker, true);
    app.toast(t("transfer.working"));
    try {
      const report = await importAccount(file);
      app.toast(t("transfer.account_imported", {
        characters: report.characters.length, personas: report.personas.length,
        lorebooks: report.lorebooks.length, chats: report.chats,
      }));
      document.getElementById("account-menu").open = false;
      await app.accountImported();
    } catch (exc) {
      app.showError(exc instanceof ApiError ? new ApiError(`${file.name}: ${exc.message}`, exc.code) : exc);
    } finally {
      busy(accountPicker, false);
    }
  });
}
