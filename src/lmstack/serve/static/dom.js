// lmstack web chat: the page's elements and the status line, shared by every other module.
//
// Usage:
//     import {$, PAGE, scrollDown, setStatus} from "./dom.js";
//     $("log").appendChild(div); scrollDown();      // PAGE: the <body>'s data-* (model, chatUrl, modelsUrl)

export const $ = (id) => document.getElementById(id);
export const PAGE = document.body.dataset;

export function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

export function setStatus(text) { if ($("status").textContent !== text) $("status").textContent = text; }
