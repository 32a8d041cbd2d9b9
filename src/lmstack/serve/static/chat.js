// lmstack web chat: the controls (send, stop, regenerate, edit; open, switch and delete conversations) and
// the page's start. chat.html loads this ES module, which imports the rest, one concept each: dom.js (the
// page's elements), stream.js (HTTP errors, the SSE reader), store.js (conversations in localStorage),
// view.js (rendering), errors.js (failures as messages), settings.js (settings, model menu), markdown.js.
//
// The page (chat.html) is served by `lmstack serve` at "/"; open http://127.0.0.1:8000/ after
//     lmstack serve --model runs/sft [--adapters math=runs/lora] [--api_key sk-...]
// Conversations and settings live in this browser's localStorage (keys "lmstack.chats.v1",
// "lmstack.settings.v1", and the API key in "lmstack-key"); nothing leaves the browser but requests to the
// server that served the page.
//
// Every failure ends as a message in the log, never a silent stall: 401 (with a field to enter the key),
// 400/404/413 (the server's message, which names the field), 503 (Retry-After, with a retry button that
// waits for it), 5xx, an error event mid-stream, a stream cut before [DONE], and network failure.
//
// Hooks for later features stay hidden until the server advertises them in a /v1/models card's
// `capabilities` list: "vision" shows #image-hook, "rag" shows #rag-hook (see applyCapabilities).

import {$, PAGE, scrollDown, setStatus} from "./dom.js";
import {describe, showError} from "./errors.js";
import {renderMarkdown} from "./markdown.js";
import {DEFAULTS, SETTING_FIELDS, applyCapabilities, buildRequest, headers, loadModels, saveSettings} from "./settings.js";
import {KEY, SETTINGS, STORE, current, load, newChat, saveChats, state, validChats} from "./store.js";
import {errorFromResponse, readStream} from "./stream.js";
import {addMeta, bubble, handlers, renderChats, renderLog, updateActions} from "./view.js";

function switchChat(id) {
  if (state.streaming) stop();
  state.currentId = id;
  renderChats();
  renderLog();
}

function deleteChat(id) {
  if (state.streaming && id === state.currentId) stop();
  delete state.chats[id];
  if (id === state.currentId) state.currentId = Object.values(state.chats).sort((a, b) => b.updated - a.updated)[0]?.id || null;
  saveChats();
  renderChats();
  renderLog();
}

async function generate() {
  const chat = current();
  let body;
  try {
    body = buildRequest(chat.messages);
  } catch (e) {
    showError({kind: "client", title: "Check the settings", message: e.message});
    return;
  }
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const target = div.querySelector(".body");
  const controller = new AbortController();
  state.streaming = {controller, stopped: false};
  updateActions();
  const started = performance.now();
  // A reply that is slow to start or stalls says so, with the seconds waited (never a silent stall).
  let heard = started;
  const watch = setInterval(() => {
    const quiet = Math.round((performance.now() - heard) / 1000);
    if (!state.streaming.receiving) setStatus(`waiting for the server… ${quiet} s`);
    else if (quiet >= 5) setStatus(`no new tokens for ${quiet} s (Stop or Esc cancels)`);
  }, 1000);
  setStatus("waiting for the server…");
  let pending = null, text = "", painted = -1e9;
  const repaint = () => { pending = null; painted = performance.now(); renderMarkdown(target, text); scrollDown(); };
  // The whole reply's markdown is re-rendered (a few ms for 16 KB), at most every 33 ms (30 per second): at
  // once when the last paint is that old (so the first token shows without waiting), else when it will be.
  // Every frame (16 ms) doubled the page's CPU for no visible gain; with the server on the same machine,
  // that CPU is the server's.
  const paint = (t) => {
    text = t;
    heard = performance.now();
    if (pending) return;
    const since = performance.now() - painted;
    if (since >= 33) repaint();
    else pending = setTimeout(repaint, 33 - since);
    if (!state.streaming.receiving) state.streaming.receiving = true;
    setStatus("generating…");
  };
  let result = null, failure = null;
  try {
    const resp = await fetch(PAGE.chatUrl, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                            signal: controller.signal});
    if (!resp.ok) throw await errorFromResponse(resp);
    if ((resp.headers.get("Content-Type") || "").startsWith("application/json")) {
      // "stream": false set through the extra body: one JSON answer
      const answer = await resp.json(), choice = answer.choices[0];
      result = {text: choice.message.content || "", finish: choice.finish_reason, usage: answer.usage};
    } else {
      result = await readStream(resp, paint);
    }
  } catch (e) {
    failure = e;
  }
  if (pending) clearTimeout(pending);
  clearInterval(watch);
  const stopped = state.streaming.stopped;
  state.streaming = null;
  div.classList.remove("streaming");
  setStatus("");
  const partial = result ? result.text : (failure && failure.partial) || text;
  renderMarkdown(target, partial);
  if (failure && !stopped) {
    if (!partial) div.remove();
    const info = describe(failure);
    showError(info, generate);
  }
  if (partial || (result && !failure)) {
    const seconds = (performance.now() - started) / 1000;
    let note;
    if (stopped) note = "stopped";
    else if (failure) note = "incomplete: the reply failed";
    else {
      const n = result.usage ? result.usage.completion_tokens : null;
      note = (n != null ? `${n} tokens · ${(n / seconds).toFixed(1)} tok/s · ` : "") + `finish: ${result.finish}`;
      if (result.finish === "length") note += " (max_tokens reached)";
      if (result.finish === "content_filter") note += " (the server's content filter stopped this reply)";
    }
    addMeta(div, note);
    chat.messages.push({role: "assistant", content: partial, note});
  }
  chat.updated = Date.now();
  saveChats();
  renderChats();
  updateActions();
}

function stop() {
  if (!state.streaming) return;
  state.streaming.stopped = true;
  state.streaming.controller.abort();  // closes the connection; the server aborts the request and frees its blocks
}

function send(text) {
  const chat = current();
  if (!chat.messages.length) chat.title = text.slice(0, 60).replace(/\s+/g, " ");
  chat.messages.push({role: "user", content: text});
  bubble("user", text, chat.messages.length - 1);
  chat.updated = Date.now();
  saveChats();
  renderChats();
  return generate();
}

// Edit: the message and everything after it leave the conversation; its text goes back to the input box.
function editMessage(index) {
  const msgs = current().messages;
  if (state.streaming || !msgs[index] || msgs[index].role !== "user") return;
  $("input").value = msgs[index].content;
  msgs.splice(index);
  saveChats();
  renderLog();
  $("input").focus();
}

function regenerate() {
  const msgs = current().messages;
  if (state.streaming || !msgs.length || msgs[msgs.length - 1].role !== "assistant") return;
  msgs.pop();
  renderLog();
  return generate();
}

// ---- wiring ---------------------------------------------------------------------------------------------

function init() {
  Object.assign(handlers, {editMessage, switchChat, deleteChat});
  for (const f of SETTING_FIELDS) DEFAULTS[f] = $(f).value;
  const stored = load(SETTINGS, {});
  for (const f of SETTING_FIELDS) if (typeof stored[f] === "string") $(f).value = stored[f];
  for (const f of SETTING_FIELDS) $(f).addEventListener("change", saveSettings);
  $("key").value = localStorage.getItem(KEY) || "";
  $("key").addEventListener("change", () => { localStorage.setItem(KEY, $("key").value); loadModels(); });
  $("model").addEventListener("change", () => { applyCapabilities(); saveSettings(); });
  $("reset-settings").onclick = () => {
    for (const f of SETTING_FIELDS) $(f).value = DEFAULTS[f];
    saveSettings();
  };
  $("toggle-settings").onclick = () => { $("settings").hidden = !$("settings").hidden; };
  $("new-chat").onclick = () => { if (state.streaming) stop(); newChat(); renderChats(); renderLog(); $("input").focus(); };
  $("stop").onclick = stop;
  $("regenerate").onclick = regenerate;
  $("form").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.streaming) return;
    $("input").value = "";
    send(text);
  };
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.streaming) stop(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
  });
  state.chats = validChats(load(STORE, {}));
  const recent = Object.values(state.chats).sort((a, b) => b.updated - a.updated)[0];
  state.currentId = recent ? recent.id : null;
  renderChats();
  renderLog();
  loadModels();
  $("input").focus();
}

init();
