// lmstack web chat: reading the server's answers. An HTTP error becomes a ServerError that carries the
// server's message (and Retry-After); an SSE stream from /v1/chat/completions is read event by event.
// No DOM here: the caller decides what to show.
//
// Usage:
//     import {ServerError, errorFromResponse, readStream} from "./stream.js";
//     if (!resp.ok) throw await errorFromResponse(resp);
//     const {text, finish, usage} = await readStream(resp, (soFar) => paint(soFar));

export class ServerError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export async function errorFromResponse(resp) {
  let message = resp.statusText || "no message";
  try {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      message = body.error ? body.error.message + (body.error.param ? ` (field: ${body.error.param})` : "") : text;
    } catch (e) {
      if (text) message = text.slice(0, 500);
    }
  } catch (e) { /* the body could not be read; the status says enough */ }
  const retry = parseInt(resp.headers.get("Retry-After"), 10);
  return new ServerError(resp.status, message, Number.isFinite(retry) ? retry : null);
}

// Reads the SSE stream, calling onText(text so far); returns {text, finish, usage}. Throws ServerError("stream") on an
// error event and when the stream ends without [DONE].
export async function readStream(resp, onText) {
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", finish = null, usage = null, done = false;
  for (;;) {
    const {value, done: ended} = await reader.read();
    if (ended) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut).split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buffer = buffer.slice(buffer.slice(cut).match(/^\r?\n\r?\n/)[0].length + cut);
      if (!event) continue;
      if (event === "[DONE]") { done = true; continue; }
      const chunk = JSON.parse(event);
      if (chunk.error) throw Object.assign(new ServerError("stream", chunk.error.message), {partial: text});
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.index) continue;  // the page asks for one sample
        if (c.delta && c.delta.content) { text += c.delta.content; onText(text); }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  if (!done) throw Object.assign(new ServerError("stream", "the connection closed before the reply finished"),
                                 {partial: text});
  return {text, finish, usage};
}
