// lmstack web chat: the conversation store. Conversations live in this browser's localStorage under
// "lmstack.chats.v1" (settings under "lmstack.settings.v1", the API key under "lmstack-key"); `state` holds
// them while the page is open, with the open conversation's id and the reply streaming now, if any.
//
// Usage:
//     import {current, saveChats, state} from "./store.js";
//     current().messages.push({role: "user", content: "hi"}); saveChats();

import {showError} from "./errors.js";

export const STORE = "lmstack.chats.v1", SETTINGS = "lmstack.settings.v1", KEY = "lmstack-key";

export const state = {
  chats: {},          // id -> {id, title, messages: [{role, content}], updated}
  currentId: null,
  streaming: null,    // {controller, stopped} while a reply streams
};

export function load(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v && typeof v === "object" ? v : fallback;
  } catch (e) {
    return fallback;  // a corrupt entry (edited by hand) starts fresh rather than breaking the page
  }
}

export function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    showError({title: "Could not save to this browser's storage", message: String(e.message || e) +
               ". Delete some old conversations to free space."});
  }
}

export function saveChats() { save(STORE, state.chats); }

// Keep only well-formed conversations from storage (it may hold an older format or a hand edit).
export function validChats(stored) {
  const ok = {};
  for (const [id, c] of Object.entries(stored)) {
    if (!c || !Array.isArray(c.messages)) continue;
    const messages = c.messages.filter((m) => m && typeof m.role === "string" && typeof m.content === "string");
    ok[id] = {id, title: typeof c.title === "string" ? c.title : "chat", messages,
              updated: Number.isFinite(c.updated) ? c.updated : 0};
  }
  return ok;
}

export function current() {
  if (!state.currentId || !state.chats[state.currentId]) newChat();
  return state.chats[state.currentId];
}

export function newChat() {
  const id = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  state.chats[id] = {id, title: "New chat", messages: [], updated: Date.now()};
  state.currentId = id;
  return state.chats[id];
}
