// lmstack web chat: the settings panel and the model menu. The sampling settings and the system prompt
// become the request body (a bad value throws an Error that names the field); /v1/models fills the menu
// (adapters show their base model), and a card's `capabilities` show the hooks it supports ("vision" shows
// #image-hook, "rag" shows #rag-hook).
//
// Usage:
//     import {buildRequest, headers, loadModels} from "./settings.js";
//     const body = buildRequest(current().messages);   // throws on a bad setting
//     fetch(PAGE.chatUrl, {method: "POST", headers: headers(), body: JSON.stringify(body)});

import {$, PAGE} from "./dom.js";
import {describe, showError} from "./errors.js";
import {SETTINGS, load, save} from "./store.js";
import {errorFromResponse} from "./stream.js";

// Sampling inputs sent as numbers when filled in (empty = leave it to the server).
const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "seed"];
const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "seed"]);
export const SETTING_FIELDS = [...NUMBER_FIELDS, "stop_strings", "extra", "system"];
export const DEFAULTS = {};

export function readSettings() {
  const s = {};
  for (const f of SETTING_FIELDS) s[f] = $(f).value;
  s.model = $("model").value;
  return s;
}

export function saveSettings() { save(SETTINGS, readSettings()); }

export function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h.Authorization = "Bearer " + $("key").value;
  return h;
}

export async function loadModels() {
  const select = $("model");
  const wanted = load(SETTINGS, {}).model || select.value || PAGE.model;
  let cards;
  try {
    const resp = await fetch(PAGE.modelsUrl, {headers: headers()});
    if (!resp.ok) throw await errorFromResponse(resp);
    cards = (await resp.json()).data || [];
  } catch (e) {
    const info = describe(e);
    info.title = "Could not list the models: " + info.title;
    showError(info, info.kind === "auth" ? null : loadModels);
    cards = [{id: PAGE.model}];
  }
  select.replaceChildren();
  for (const c of cards) {
    const opt = select.appendChild(document.createElement("option"));
    opt.value = c.id;
    opt.textContent = c.parent ? `${c.id} (adapter on ${c.parent})` : c.id;
    opt.dataset.capabilities = JSON.stringify(c.capabilities || []);
  }
  if (cards.some((c) => c.id === wanted)) select.value = wanted;
  applyCapabilities();
}

// Show the hooks for features the chosen model's card advertises; keep the rest hidden.
export function applyCapabilities() {
  const opt = $("model").selectedOptions[0];
  const caps = opt ? JSON.parse(opt.dataset.capabilities || "[]") : [];
  document.querySelectorAll("[data-capability]").forEach((hook) => {
    hook.hidden = !caps.includes(hook.dataset.capability);
  });
}

// The request body from the conversation and the settings; throws a clear Error on bad settings.
export function buildRequest(messages) {
  const s = readSettings();
  const body = {model: s.model || PAGE.model, messages: [], stream: true, stream_options: {include_usage: true}};
  if (s.system.trim()) body.messages.push({role: "system", content: s.system});
  body.messages.push(...messages.map((m) => ({role: m.role, content: m.content})));
  for (const f of NUMBER_FIELDS) {
    const raw = $(f).value.trim();
    if (raw === "") {
      if ($(f).validity.badInput) throw new Error(`${f} is not a number`);
      continue;
    }
    const v = Number(raw);
    if (!Number.isFinite(v) || (INTEGER_FIELDS.has(f) && !Number.isInteger(v))) {
      throw new Error(`${f}=${raw} is not ${INTEGER_FIELDS.has(f) ? "an integer" : "a number"}`);
    }
    body[f] = v;
  }
  const stops = s.stop_strings.split("\n").filter((x) => x !== "");
  if (stops.length) body.stop = stops;
  if (s.extra.trim()) {
    let extra;
    try {
      extra = JSON.parse(s.extra);
    } catch (e) {
      throw new Error("extra body is not valid JSON: " + e.message);
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) throw new Error("extra body must be a JSON object");
    Object.assign(body, extra);
  }
  return body;
}
