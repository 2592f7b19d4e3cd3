// English and Chinese. The language comes from the browser unless the person
// picked one with the switch (kept in localStorage).

const STRINGS = {
  en: {
    "demo.title": "Demo model:",
    "demo.text": "This server runs a tiny model with random weights, so its replies are noise. That is expected: serve a real RWKV checkpoint for real replies (make run MODEL=…).",
    "auth.tagline": "Role-play with RWKV characters. Your chats are kept on the server, so you can come back to them any time.",
    "auth.login": "Log in",
    "auth.signup": "Sign up",
    "auth.create": "Create account",
    "auth.user_name": "User name",
    "auth.password": "Password",
    "auth.or": "or",
    "auth.guest": "Continue as a guest",
    "auth.guest_note": "A guest gets their own characters and chats on this browser.",
    "auth.missing": "Please enter a user name and a password.",
    "auth.signup_off": "Sign-up is turned off on this server. Ask its operator for an account.",
    "app.logout": "Log out",
    "app.guest": "guest",
    "app.confirm_guest_logout": "Log out? A guest cannot log in again: your characters and chats on this browser will be gone for good.",
    "demo.dismiss": "Dismiss this note",
    "chat.writing_elsewhere": "A reply is being written in another tab or window. It appears here when it is done.",
    "gallery.title": "Characters",
    "gallery.hint": "Choose someone to talk to, or make your own.",
    "gallery.new": "New character",
    "gallery.new_short": "+ New",
    "cards.import": "Import a card",
    "cards.drop_hint": "Character cards (PNG, JSON, CHARX) can be dropped here.",
    "cards.imported": "{name} was imported.",
    "cards.export_png": "Export PNG",
    "cards.export_json": "Export JSON",
    "editor.new_title": "New character",
    "editor.edit_title": "Edit {name}",
    "editor.avatar_choose": "Choose image",
    "editor.avatar_remove": "Remove",
    "editor.avatar_hint": "PNG, JPEG, GIF or WebP. Large images are scaled down.",
    "editor.avatar_bad": "That file is not an image this browser can read.",
    "editor.name": "Name",
    "editor.name_ph": "Mira",
    "editor.user": "What the character calls you",
    "editor.user_ph": "traveller",
    "editor.greeting": "Greeting",
    "editor.greeting_ph": "*looks up from the logbook* Oh, hello {{user}}!",
    "editor.persona": "Persona",
    "editor.persona_ph": "{{char}} is a calm lighthouse keeper who…",
    "editor.examples": "Example dialogue",
    "editor.examples_ph": "{{user}}: How are you?\n\n{{char}}: *smiles* Fine, thank you.",
    "editor.placeholders": "{{user}} and {{char}} are replaced by the two names.",
    "editor.use_qa": "Name the speakers “User” and “Assistant” in the prompt",
    "editor.overwrite_note": "Saving changes starts this character's chat over.",
    "editor.delete": "Delete character",
    "editor.saved": "Saved.",
    "editor.required": "Please fill in: {fields}.",
    "editor.confirm_delete": "Delete {name}? Their chat goes too. This cannot be undone.",
    "editor.deleted": "{name} was deleted.",
    "common.back": "Back",
    "common.cancel": "Cancel",
    "common.save": "Save",
    "common.done": "Done",
    "common.close": "Close",
    "common.optional": "optional",
    "common.delete": "Delete",
    "chat.settings": "Sampling settings",
    "chat.context": "What the model has read",
    "chat.edit_character": "Edit character",
    "chat.reset": "Start over",
    "chat.placeholder": "Write a message…",
    "chat.keys": "Enter sends · Shift+Enter starts a new line",
    "chat.send": "Send",
    "chat.stop": "Stop",
    "chat.you": "You",
    "chat.regenerate": "Regenerate",
    "chat.edit": "Edit",
    "chat.rewind": "Rewind to here",
    "chat.empty_reply": "(empty reply)",
    "chat.confirm_reset": "Start the chat with {name} over? Every message goes.",
    "chat.confirm_reset_ok": "Start over",
    "chat.confirm_rewind": "Go back to this point? The later messages go.",
    "chat.confirm_rewind_ok": "Rewind",
    "chat.stopped": "Stopped. Nothing of that reply was kept.",
    "chat.not_found": "That character does not exist (any more).",
    "context.title": "What the model has read",
    "context.count": "{count} tokens",
    "settings.title": "Sampling settings",
    "settings.hint": "Kept in this browser, for this character.",
    "settings.defaults": "Defaults",
    "settings.tau": "Mirostat target surprise (tau)",
    "settings.rate": "Mirostat learning rate",
    "settings.min_p": "Minimum probability (min_p)",
    "settings.temperature": "Temperature",
    "settings.presence_penalty": "Presence penalty",
    "error.network": "The server cannot be reached. Is it running?",
    "error.busy": "The character is still answering. Wait for the reply to finish, or stop it.",
    "error.rate": "Too many attempts. Wait a little and try again.",
    "error.expired": "Your session has ended. Please log in again.",
    "error.server": "The server had a problem: {message}",
    "error.wrong_login": "Wrong user name or password.",
    "error.login_backoff": "Too many failed log-ins. Try again in {seconds} s.",
    "error.wait": "Too many attempts. Try again in {seconds} s.",
    "error.user_exists": "The name “{name}” is taken. Choose another one, or log in.",
    "error.user_name_chars": "A user name may hold only letters, digits and @ . + - _",
    "error.user_name_long": "That user name is too long.",
    "error.password_short": "The password is too short: use at least {count} characters.",
    "error.password_common": "That password is too common: choose one that is harder to guess.",
    "error.password_numeric": "The password must not be only digits.",
    "error.password_similar": "The password is too much like the user name.",
    "error.too_long": "{field} is too long: at most {count} characters.",
    "error.missing": "{field} is missing.",
    "error.empty": "{field} must not be empty.",
    "error.control": "{field} must not hold line breaks or other control characters.",
    "error.range": "{field} must be between {low} and {high}. Set it in the sampling settings.",
    "error.nul": "{field} holds an invisible NUL character, which cannot be stored. Remove it and try again.",
    "error.lost": "This chat was changed in another tab meanwhile. It has been reloaded.",
    "error.replies_limit": "You already have {count} replies being written. Wait for one to finish.",
    "error.guest_characters": "A guest can keep at most {count} characters. Delete one, or sign up.",
    "error.guest_avatar": "A guest's picture can be at most {count} KB. Choose a smaller one, or sign up.",
    "error.avatar_large": "The picture is too large: at most {count} KB.",
    "error.avatar_pixels": "The picture has too many pixels. Choose a smaller one.",
    "error.body_large": "That is too much text to send at once (at most {count} KB).",
    "error.disabled": "This account is disabled.",
    "error.other": "The server refused this: {message}",
    "field.prompt": "Your message",
    "field.message": "The reply",
    "field.character_name": "The character's name",
    "field.avatar": "The picture",
    "field.user_name": "The user name",
    "field.password": "The password",
    "field.bot": "The name",
    "field.user": "What the character calls you",
    "field.greeting": "The greeting",
    "field.bot_persona": "The persona",
    "field.example_message": "The example dialogue",
  },
  zh: {
    "demo.title": "演示模型：",
    "demo.text": "本服务器运行的是随机权重的小模型，回复是乱码，这是正常的。要得到真实的回复，请用真正的 RWKV 模型启动服务器（make run MODEL=…）。",
    "auth.tagline": "和 RWKV 角色聊天。聊天记录保存在服务器上，随时可以回来继续。",
    "auth.login": "登录",
    "auth.signup": "注册",
    "auth.create": "创建账号",
    "auth.user_name": "用户名",
    "auth.password": "密码",
    "auth.or": "或者",
    "auth.guest": "以访客身份继续",
    "auth.guest_note": "访客在这个浏览器里有自己的角色和聊天。",
    "auth.missing": "请输入用户名和密码。",
    "auth.signup_off": "本服务器已关闭注册，请向管理员索取账号。",
    "app.logout": "退出",
    "app.guest": "访客",
    "app.confirm_guest_logout": "确定退出？访客无法再次登录：你在这个浏览器里的角色和聊天记录都会永久丢失。",
    "demo.dismiss": "关闭这条提示",
    "chat.writing_elsewhere": "另一个标签页或窗口正在生成回复，完成后会显示在这里。",
    "gallery.title": "角色",
    "gallery.hint": "选一个角色聊天，或者创建你自己的角色。",
    "gallery.new": "新建角色",
    "gallery.new_short": "+ 新建",
    "cards.import": "导入角色卡",
    "cards.drop_hint": "也可以把角色卡（PNG、JSON、CHARX）拖到这里。",
    "cards.imported": "已导入 {name}。",
    "cards.export_png": "导出 PNG",
    "cards.export_json": "导出 JSON",
    "editor.new_title": "新建角色",
    "editor.edit_title": "编辑 {name}",
    "editor.avatar_choose": "选择图片",
    "editor.avatar_remove": "移除",
    "editor.avatar_hint": "PNG、JPEG、GIF 或 WebP，大图会自动缩小。",
    "editor.avatar_bad": "这个文件不是浏览器能读取的图片。",
    "editor.name": "名字",
    "editor.name_ph": "小雪",
    "editor.user": "角色对你的称呼",
    "editor.user_ph": "旅人",
    "editor.greeting": "开场白",
    "editor.greeting_ph": "（从日志本上抬起头）啊，你好，{{user}}！",
    "editor.persona": "人设",
    "editor.persona_ph": "{{char}}是一位安静的灯塔守护人……",
    "editor.examples": "对话示例",
    "editor.examples_ph": "{{user}}: 你好吗？\n\n{{char}}: （微笑）很好，谢谢。",
    "editor.placeholders": "{{user}} 和 {{char}} 会被替换成两个名字。",
    "editor.use_qa": "提示词中使用 “User” 和 “Assistant” 作为说话人",
    "editor.overwrite_note": "保存修改会清空这个角色的聊天记录。",
    "editor.delete": "删除角色",
    "editor.saved": "已保存。",
    "editor.required": "请填写：{fields}。",
    "editor.confirm_delete": "删除 {name}？聊天记录也会一起删除，无法恢复。",
    "editor.deleted": "已删除 {name}。",
    "common.back": "返回",
    "common.cancel": "取消",
    "common.save": "保存",
    "common.done": "完成",
    "common.close": "关闭",
    "common.optional": "可选",
    "common.delete": "删除",
    "chat.settings": "采样设置",
    "chat.context": "模型读到的内容",
    "chat.edit_character": "编辑角色",
    "chat.reset": "重新开始",
    "chat.placeholder": "输入消息……",
    "chat.keys": "Enter 发送 · Shift+Enter 换行",
    "chat.send": "发送",
    "chat.stop": "停止",
    "chat.you": "你",
    "chat.regenerate": "重新生成",
    "chat.edit": "修改",
    "chat.rewind": "回到这里",
    "chat.empty_reply": "（空回复）",
    "chat.confirm_reset": "和 {name} 的聊天重新开始？所有消息都会清空。",
    "chat.confirm_reset_ok": "重新开始",
    "chat.confirm_rewind": "回到这一轮？之后的消息都会删除。",
    "chat.confirm_rewind_ok": "回退",
    "chat.stopped": "已停止，这条回复没有保存。",
    "chat.not_found": "这个角色不存在（或已被删除）。",
    "context.title": "模型读到的内容",
    "context.count": "{count} 个 token",
    "settings.title": "采样设置",
    "settings.hint": "保存在这个浏览器里，每个角色单独保存。",
    "settings.defaults": "默认值",
    "settings.tau": "Mirostat 目标惊讶度（tau）",
    "settings.rate": "Mirostat 学习率",
    "settings.min_p": "最小概率（min_p）",
    "settings.temperature": "温度",
    "settings.presence_penalty": "重复惩罚",
    "error.network": "无法连接服务器，它在运行吗？",
    "error.busy": "角色还在回复中。请等它说完，或者点停止。",
    "error.rate": "尝试次数太多，请稍等再试。",
    "error.expired": "登录已过期，请重新登录。",
    "error.server": "服务器出错：{message}",
    "error.wrong_login": "用户名或密码错误。",
    "error.login_backoff": "登录失败次数太多，请 {seconds} 秒后再试。",
    "error.wait": "尝试次数太多，请 {seconds} 秒后再试。",
    "error.user_exists": "用户名“{name}”已被占用。请换一个，或者直接登录。",
    "error.user_name_chars": "用户名只能包含字母、数字和 @ . + - _",
    "error.user_name_long": "用户名太长了。",
    "error.password_short": "密码太短：至少需要 {count} 个字符。",
    "error.password_common": "这个密码太常见了，请换一个更难猜的。",
    "error.password_numeric": "密码不能全是数字。",
    "error.password_similar": "密码和用户名太像了。",
    "error.too_long": "{field}太长了：最多 {count} 个字符。",
    "error.missing": "缺少{field}。",
    "error.empty": "{field}不能为空。",
    "error.control": "{field}不能包含换行或其他控制字符。",
    "error.range": "{field}必须在 {low} 到 {high} 之间，请在采样设置里修改。",
    "error.nul": "{field}里有一个无法保存的不可见字符（NUL），请删除后再试。",
    "error.lost": "这段聊天刚在另一个标签页里被修改过，已重新载入。",
    "error.replies_limit": "你已经有 {count} 条回复正在生成，请等其中一条完成。",
    "error.guest_characters": "访客最多只能保存 {count} 个角色。请删除一个，或者注册。",
    "error.guest_avatar": "访客的图片最大 {count} KB。请换一张小一点的，或者注册。",
    "error.avatar_large": "图片太大：最大 {count} KB。",
    "error.avatar_pixels": "图片像素太多，请换一张小一点的。",
    "error.body_large": "一次发送的文字太多了（最多 {count} KB）。",
    "error.disabled": "这个账号已被停用。",
    "error.other": "服务器拒绝了这个请求：{message}",
    "field.prompt": "你的消息",
    "field.message": "回复",
    "field.character_name": "角色名",
    "field.avatar": "图片",
    "field.user_name": "用户名",
    "field.password": "密码",
    "field.bot": "名字",
    "field.user": "角色对你的称呼",
    "field.greeting": "开场白",
    "field.bot_persona": "人设",
    "field.example_message": "对话示例",
  },
};

const KEY = "rpserver.language";

export let language = pickLanguage();

function pickLanguage() {
  const chosen = localStorage.getItem(KEY);
  if (chosen && STRINGS[chosen]) return chosen;
  const wanted = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  return wanted.some((tag) => String(tag).toLowerCase().startsWith("zh")) ? "zh" : "en";
}

export function t(key, values = {}) {
  const text = STRINGS[language][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

export function setLanguage(code) {
  language = code;
  localStorage.setItem(KEY, code);
  translatePage();
}

export function otherLanguage() {
  return language === "zh" ? "en" : "zh";
}

/** Fill every element marked with data-i18n (text), data-i18n-placeholder and data-i18n-label. */
export function translatePage(root = document) {
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nLabel));
    el.title = t(el.dataset.i18nLabel);
  }
  for (const el of root.querySelectorAll("[data-action=switch-language]")) {
    el.textContent = language === "zh" ? "English" : "中文";
    el.lang = language === "zh" ? "en" : "zh-CN";
  }
}

// The legacy API's messages are English and written for its own UI (API.md: they
// must stay as they are). The web client shows each one it can meet in the
// page's language: [pattern, key, the pattern's groups as the key's values].
const FIELD = "(\\w+)";
const SERVER_MESSAGES = [
  [/^wrong user name or password$/, "error.wrong_login"],
  [/^too many failed log-ins: please try again in (\d+) s$/, "error.login_backoff", (m) => ({ seconds: m[1] })],
  [/: please try again in (\d+) s$/, "error.wait", (m) => ({ seconds: m[1] })],
  [/^user (.*) already exists$/, "error.user_exists", (m) => ({ name: m[1] })],
  [/^sign-up is turned off/, "auth.signup_off"],
  [/^this account is disabled$/, "error.disabled"],
  [/^a reply is already being generated/, "error.busy"],
  [/^this conversation was changed by another request/, "error.lost"],
  [/^log_index \d+ is past the last round/, "error.lost"],
  [/^you already have (\d+) replies being generated/, "error.replies_limit", (m) => ({ count: m[1] })],
  [/^character does not exist/, "chat.not_found"],
  [/^a guest can keep at most (\d+) characters/, "error.guest_characters", (m) => ({ count: m[1] })],
  [/^a guest's avatar can be at most (\d+) KB/, "error.guest_avatar", (m) => ({ count: m[1] })],
  [/^avatar is too large: the limit is (\d+) KB/, "error.avatar_large", (m) => ({ count: m[1] })],
  [/^avatar is too large: the limit is \d+ pixels/, "error.avatar_pixels"],
  [/^avatar /, "editor.avatar_bad"],
  [/^the request body is too large: the limit is (\d+) KB/, "error.body_large", (m) => ({ count: m[1] })],
  [new RegExp(`^missing parameter: ${FIELD}`), "error.missing", (m) => ({ field: fieldName(m[1]) })],
  [new RegExp(`^${FIELD} must not be empty`), "error.empty", (m) => ({ field: fieldName(m[1]) })],
  [new RegExp(`^${FIELD}: Ensure this field has no more than (\\d+) characters`), "error.too_long",
    (m) => ({ field: fieldName(m[1]), count: m[2] })],
  [new RegExp(`^${FIELD}: must not contain control characters`), "error.control", (m) => ({ field: fieldName(m[1]) })],
  [new RegExp(`^${FIELD}: must be in [[(]([\\d.]+), ([\\d.]+)\\]`), "error.range",
    (m) => ({ field: fieldName(m[1]), low: m[2], high: m[3] })],
  [new RegExp(`^${FIELD} must not contain NUL characters`), "error.nul", (m) => ({ field: fieldName(m[1]) })],
];

// Django's password and user-name rules: the server joins all that failed into one message.
const RULE_MESSAGES = [
  [/This password is too short\. It must contain at least (\d+) characters?\./, "error.password_short", (m) => ({ count: m[1] })],
  [/This password is too common\./, "error.password_common"],
  [/This password is entirely numeric\./, "error.password_numeric"],
  [/The password is too similar to the \w+\./, "error.password_similar"],
  [/Enter a valid username\./, "error.user_name_chars"],
  [/Ensure this value has at most \d+ characters/, "error.user_name_long"],
];

function fieldName(field) {
  for (const key of [`field.${field}`, `settings.${field}`]) if (key in STRINGS.en) return t(key);
  return field;
}

/** A message of the legacy API in words for people, in the page's language; null for one not known here. */
export function fromServer(message) {
  const text = String(message || "").trim();
  for (const [pattern, key, values] of SERVER_MESSAGES) {
    const match = text.match(pattern);
    if (match) return t(key, values ? values(match) : {});
  }
  const rules = RULE_MESSAGES.map(([pattern, key, values]) => {
    const match = text.match(pattern);
    return match ? t(key, values ? values(match) : {}) : null;
  }).filter(Boolean);
  return rules.length ? rules.join(" ") : null;
}
