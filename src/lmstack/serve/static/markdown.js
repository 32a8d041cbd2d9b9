// lmstack web chat: a small, safe Markdown renderer for model replies (no dependencies, no network).
//
// It builds DOM nodes with createElement/textContent and never assigns innerHTML, so any HTML the model
// writes ("<script>", "<img onerror=...>") shows as text. Links keep only http(s) and mailto targets.
// An unclosed ``` fence (a reply still streaming) renders the rest as code, so a code block does not
// flicker between prose and code while it arrives.
//
// Covers: fenced code (```lang, with a copy button), headings, blockquotes, - * + and 1. lists (one level),
// GFM pipe tables, horizontal rules, paragraphs (single newlines kept as line breaks); inline `code`,
// **bold** / __bold__, *italic* / _italic_, ~~strike~~ and [text](url).
//
// Usage (an ES module; chat.js and view.js import it):
//     import {renderMarkdown} from "./markdown.js";
//     renderMarkdown(element, "**hi** `x`")      // replaces element's children

const SAFE_URL = /^(https?:\/\/|mailto:)/i;
// One alternation, earliest match wins: code spans first, so nothing inside them is parsed further.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)|~~(?=\S)([\s\S]*?\S)~~|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Inline text -> nodes appended to parent (recursive for bold/italic/strike/link contents).
function inline(parent, text) {
  while (text) {
    const m = INLINE.exec(text);
    if (!m) { appendText(parent, text); return; }
    if (m.index > 0) appendText(parent, text.slice(0, m.index));
    if (m[1] !== undefined) {
      parent.appendChild(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
    } else if (m[3] !== undefined) {
      if (SAFE_URL.test(m[4])) {
        const a = el("a");
        a.href = m[4];
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        inline(a, m[3]);
        parent.appendChild(a);
      } else {
        appendText(parent, m[0]);  // javascript:, data: and relative targets stay plain text
      }
    } else {
      const [tag, inner] = m[5] !== undefined ? ["strong", m[5]] : m[6] !== undefined ? ["strong", m[6]]
        : m[7] !== undefined ? ["del", m[7]] : ["em", m[8] !== undefined ? m[8] : m[9]];
      const node = el(tag);
      inline(node, inner);
      parent.appendChild(node);
    }
    text = text.slice(m.index + m[0].length);
  }
}

// Text with its single newlines turned into <br> (models lay out addresses and poems that way).
function appendText(parent, text) {
  text.split("\n").forEach((line, i) => {
    if (i > 0) parent.appendChild(el("br"));
    if (line) parent.appendChild(document.createTextNode(line));
  });
}

function codeBlock(lang, lines) {
  const wrap = el("div", "code");
  const bar = el("div", "code-bar");
  bar.appendChild(el("span", "code-lang", lang || "text"));
  const copy = el("button", "copy", "copy");
  copy.type = "button";
  const body = lines.join("\n");
  copy.addEventListener("click", () => {
    // navigator.clipboard exists only in secure contexts (https or localhost); say so rather than fail silently.
    if (!navigator.clipboard) { copy.textContent = "copy needs https or localhost"; return; }
    navigator.clipboard.writeText(body).then(() => { copy.textContent = "copied"; },
                                             () => { copy.textContent = "copy refused"; });
  });
  bar.appendChild(copy);
  const pre = el("pre");
  const code = el("code", lang ? "language-" + lang.replace(/[^\w+-]/g, "") : null, body);
  pre.appendChild(code);
  wrap.append(bar, pre);
  return wrap;
}

function splitRow(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const BLOCK_START = /^\s*(```|#{1,6}\s|>|([-*+]|\d{1,9}[.)])\s|(\*\s*){3,}$|(-\s*){3,}$)/;

export function renderMarkdown(target, text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^\s*```\s*([\w+.#-]*)\s*$/.exec(line);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
      i++;  // the closing fence (or the end of a reply still streaming)
      out.appendChild(codeBlock(fence[1], body));
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const heading = /^\s*(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      const h = el("h" + heading[1].length);
      inline(h, heading[2]);
      out.appendChild(h);
      i++;
      continue;
    }
    if (/^\s*((\*\s*){3,}|(-\s*){3,}|(_\s*){3,})$/.test(line)) { out.appendChild(el("hr")); i++; continue; }
    if (/^\s*>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*> ?/, ""));
      const bq = el("blockquote");
      renderMarkdown(bq, quoted.join("\n"));
      out.appendChild(bq);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const table = el("table");
      const head = el("tr");
      splitRow(line).forEach((c) => { const th = el("th"); inline(th, c); head.appendChild(th); });
      table.appendChild(el("thead")).appendChild(head);
      const tbody = table.appendChild(el("tbody"));
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        const tr = el("tr");
        splitRow(lines[i++]).forEach((c) => { const td = el("td"); inline(td, c); tr.appendChild(td); });
        tbody.appendChild(tr);
      }
      out.appendChild(table);
      continue;
    }
    const item = LIST_ITEM.exec(line);
    if (item) {
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(item[1], 10) !== 1) list.start = parseInt(item[1], 10);
      let m;
      while (i < lines.length && (m = LIST_ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
        let body = m[2];
        i++;
        // indented continuation lines belong to the item
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !LIST_ITEM.test(lines[i])) body += "\n" + lines[i++].trim();
        const li = el("li");
        inline(li, body);
        list.appendChild(li);
      }
      out.appendChild(list);
      continue;
    }
    const para = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !BLOCK_START.test(lines[i])
           && !(lines[i].includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]))) para.push(lines[i++]);
    const p = el("p");
    inline(p, para.join("\n"));
    out.appendChild(p);
  }
  target.replaceChildren(out);
}
