// lmstack web chat: rendering the conversation list and the open conversation. What a click does (open,
// delete, edit) is set by chat.js in `handlers`, so this module only draws and imports no controls.
//
// Usage:
//     import {bubble, handlers, renderChats, renderLog} from "./view.js";
//     Object.assign(handlers, {editMessage, switchChat, deleteChat}); renderChats(); renderLog();

import {$, scrollDown} from "./dom.js";
import {renderMarkdown} from "./markdown.js";
import {current, state} from "./store.js";

export const handlers = {editMessage: null, switchChat: null, deleteChat: null};

// A message in the log; a user message at `index` of the conversation gets an edit button.
export function bubble(role, text, index) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "user" && index !== undefined) {
    const edit = div.appendChild(document.createElement("button"));
    edit.type = "button";
    edit.className = "edit";
    edit.textContent = "edit";
    edit.title = "edit this message: it and everything after it go back to the input box";
    edit.onclick = () => handlers.editMessage(index);
  }
  const body = div.appendChild(document.createElement("div"));
  body.className = "body";
  if (role === "assistant") renderMarkdown(body, text);
  else body.textContent = text;  // what the user typed shows as typed
  $("log").appendChild(div);
  scrollDown();
  return div;
}

export function renderChats() {
  const list = $("chats");
  list.replaceChildren();
  Object.values(state.chats).sort((a, b) => b.updated - a.updated).forEach((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === state.currentId) li.className = "current";
    const open = li.appendChild(document.createElement("button"));
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.onclick = () => handlers.switchChat(c.id);
    const del = li.appendChild(document.createElement("button"));
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "delete this conversation";
    del.setAttribute("aria-label", "delete " + c.title);
    del.onclick = () => handlers.deleteChat(c.id);
    list.appendChild(li);
  });
}

export function renderLog() {
  $("log").replaceChildren();
  current().messages.forEach((m, i) => {
    const div = bubble(m.role, m.content, i);
    if (m.note) addMeta(div, m.note);
  });
  updateActions();
}

export function addMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) { meta = div.appendChild(document.createElement("div")); meta.className = "meta"; }
  meta.textContent = text;
}

export function updateActions() {
  const msgs = current().messages;
  $("stop").hidden = !state.streaming;
  $("send").disabled = !!state.streaming;
  $("regenerate").hidden = !!state.streaming || !msgs.length || msgs[msgs.length - 1].role !== "assistant";
  document.body.classList.toggle("busy", !!state.streaming);
}
