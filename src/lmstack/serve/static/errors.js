// lmstack web chat: failures as messages in the log, never a silent stall. describe() names a failure for the
// user (401, 413, 503 with Retry-After, 5xx, an error mid-stream, the network); showError() puts it in the log,
// with a field to enter the key after a 401 and a retry button where retrying can help.
//
// Usage:
//     import {describe, showError} from "./errors.js";
//     showError(describe(err), retryFunction);

import {$, scrollDown} from "./dom.js";
import {ServerError} from "./stream.js";

// Describe a failure for the user: {title, message, kind}.
export function describe(err) {
  if (err instanceof ServerError) {
    const s = err.status;
    if (s === 401) return {kind: "auth", title: "The server needs an API key (401)", message: err.message};
    if (s === 413) return {kind: "too-large", title: "Request too large (413)", message: err.message +
                           ". Shorten the message or start a new chat."};
    if (s === 503) return {kind: "busy", title: "Server busy (503)", message: err.message +
                           (err.retryAfter != null ? `. Retry after ${err.retryAfter} s.` : ""), retryAfter: err.retryAfter};
    if (s === "stream") return {kind: "stream", title: "The reply failed mid-stream", message: err.message};
    if (s >= 500) return {kind: "server", title: `Server error (${s})`, message: err.message};
    return {kind: "refused", title: `The server refused the request (${s})`, message: err.message};
  }
  if (err instanceof TypeError) {
    return {kind: "network", title: "Could not reach the server", message: `${err.message} (${location.origin}).` +
            " Is `lmstack serve` still running?"};
  }
  return {kind: "client", title: "Error", message: String(err.message || err)};
}

// An error bubble in the log; with a key field for 401 and a retry button where retrying can help.
export function showError(info, retry) {
  const div = document.createElement("div");
  div.className = "msg error";
  div.setAttribute("role", "alert");
  div.dataset.kind = info.kind || "client";
  const title = div.appendChild(document.createElement("div"));
  title.className = "title";
  title.textContent = info.title;
  div.appendChild(document.createElement("div")).textContent = info.message;
  if (info.kind === "auth") {
    // one key prompt at a time: a newer one (which may also retry a reply) replaces any older one
    document.querySelectorAll(".msg.error[data-kind=auth]").forEach((old) => old.remove());
    const form = div.appendChild(document.createElement("form"));
    const input = form.appendChild(document.createElement("input"));
    input.type = "password";
    input.className = "key-prompt";
    input.placeholder = "API key (sk-...)";
    input.autocomplete = "off";
    const ok = form.appendChild(document.createElement("button"));
    ok.textContent = retry ? "Save key and retry" : "Save key";
    form.onsubmit = (e) => {
      e.preventDefault();
      $("key").value = input.value.trim();
      div.remove();
      // the key field's own change handler (chat.js) saves the key and lists the models again
      $("key").dispatchEvent(new Event("change"));
      if (retry) retry();
    };
    setTimeout(() => input.focus(), 0);
  } else if (retry && ["busy", "server", "network", "stream"].includes(info.kind)) {
    const buttons = div.appendChild(document.createElement("div"));
    buttons.className = "buttons";
    const again = buttons.appendChild(document.createElement("button"));
    again.type = "button";
    again.className = "retry";
    again.onclick = () => { div.remove(); retry(); };
    // After a 503, the button waits out Retry-After, counting down.
    let wait = info.kind === "busy" && info.retryAfter ? info.retryAfter : 0;
    const tick = () => {
      again.disabled = wait > 0;
      again.textContent = wait > 0 ? `Retry in ${wait} s` : "Retry";
      if (wait-- > 0) setTimeout(tick, 1000);
    };
    tick();
  }
  $("log").appendChild(div);
  scrollDown();
  return div;
}
