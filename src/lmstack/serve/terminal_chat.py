"""`lmstack chat`: talk to a model in the terminal, token by token, with the conversation kept as context.

Two backends with one interface (`stream(messages) -> text pieces`):
- local: the engine runs in this process on a model directory (optionally with a LoRA adapter);
- remote: an lmstack (or any OpenAI-compatible) server, read as server-sent events.

Commands inside the chat: /reset (forget the conversation), /system TEXT (set the system prompt),
/exit (or Ctrl-D). Ctrl-C while the model writes stops that reply and keeps the chat going.

A picture (`--image FILE`) is attached to the conversation's first user turn as an OpenAI image_url part (a
data: URL); the local backend needs a VLM directory (multimodal/engine_adapter.py), a server needs to serve one.

Usage:
    lmstack chat --model runs/model
    lmstack chat --model runs/vlm --image shapes.png
    lmstack chat --model runs/model --adapter runs/lora-math
    lmstack chat --url http://127.0.0.1:8000 --adapter math --api_key sk-local
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import sys
from typing import Any, Callable, Iterator
import uuid

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.infer.generation_defaults import merge_sampling
from lmstack.model.load_guard import set_max_model_gib
from lmstack.multimodal.engine_adapter import ImageLease, ImagePrompt, is_vlm_dir, load_engine_vlm
from lmstack.multimodal.images import decode_data_url, decode_image
from lmstack.runtime.device import pick_device
from lmstack.serve.commands import load_serving_adapters
from lmstack.serve.image_input import NO_IMAGES, file_data_url
from lmstack.threads import set_threads

CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}  # where neither flags nor the model say
HELP = "commands: /reset  /system TEXT  /exit   (Ctrl-C stops a reply, Ctrl-D quits)"


class LocalBackend:
    """The engine in this process; steps it and yields each new piece of text as it is decoded."""

    def __init__(self, model_dir: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                 **engine_kwargs: Any):
        dev, dtype = pick_device(device, dtype)
        model: Any = model_dir
        self.adapter, adapters, self.vlm = None, None, None
        if is_vlm_dir(model_dir):  # pictures become placeholder ids of the engine's model
            if adapter is not None:
                raise LmstackError(f"{model_dir} is a VLM; --adapter (LoRA) works with text models only")
            model, tok = load_engine_vlm(model_dir)
            self.vlm = model
            engine_kwargs.setdefault("tokenizer", tok)
            engine_kwargs["cuda_graphs"] = False
        if adapter is not None:  # the adapter wraps the model's Linears, so load the model first
            model = lmstack.load_model(model_dir, dtype=dtype, device=dev)
            self.adapter = Path(adapter).name
            adapters = load_serving_adapters(model, {self.adapter: adapter})
            engine_kwargs.setdefault("tokenizer", lmstack.load_tokenizer(model_dir))
        self.engine = LLMEngine(model, device=dev, dtype=dtype, lora_adapters=adapters, **engine_kwargs)
        if self.engine.tokenizer is None:
            raise LmstackError(f"{model_dir}: no tokenizer.json; chat needs the model's tokenizer")

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json sampling settings."""
        return self.engine.generation_defaults

    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        tok = self.engine.tokenizer
        prompt = ImagePrompt(self.vlm, tok) if self.vlm is not None else None
        messages = [{**m, "content": self._text(m["content"], prompt)} for m in messages]
        ids = tok.render_messages(messages, add_generation_prompt=True).ids
        ids, lease = prompt.expand(ids) if prompt is not None else (ids, ImageLease())
        rid = f"chat-{uuid.uuid4().hex[:8]}"
        try:
            self.engine.add_request(rid, ids, SamplingParams(**params, output_kind="delta"), lora=self.adapter)
        except BaseException:
            lease.release()
            raise
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid and out.outputs[0].text:
                        yield out.outputs[0].text
        finally:
            self.engine.abort_request(rid)  # a no-op once finished; frees the blocks after Ctrl-C
            lease.release()

    @staticmethod
    def _text(content: Any, prompt: ImagePrompt | None) -> str:
        """A message's content as template text: image_url parts become the VLM's picture markers."""
        if isinstance(content, str):
            return content
        out = []
        for part in content:
            if part.get("type") == "image_url":
                if prompt is None:
                    raise LmstackError(NO_IMAGES)
                out.append(prompt.add(decode_image(decode_data_url(part["image_url"]["url"]))))
            else:
                out.append(part.get("text") or "")
        return "".join(out)


class RemoteBackend:
    """An OpenAI-compatible server's /v1/chat/completions, streamed."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        # lazy: heavy (httpx), which this module does not import at its top
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model

    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        body = {"messages": messages, "stream": True, **params}
        if self.model:
            body["model"] = self.model
        with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:200]
                raise LmstackError(f"server answered {r.status_code}: {message}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise LmstackError(f"server error: {chunk['error'].get('message')}")
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def run_chat(backend: Any, params: dict, read: Callable[[str], str] = input,
             write: Callable[[str], Any] | None = None, system: str | None = None,
             image_url: str | None = None) -> list[dict]:
    """The read-reply loop; returns the conversation when the user leaves. image_url (a data: URL) goes with the
    conversation's first user turn (again after /reset)."""
    write = write or sys.stdout.write  # looked up per call, so a redirected stdout is the one written to
    history: list[dict] = []
    write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            write(f"(system prompt {'set' if system else 'cleared'})\n")
            continue
        if text.startswith("/"):
            write(HELP + "\n")
            continue
        content: Any = line
        if image_url is not None and not history:
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": line}]
        history.append({"role": "user", "content": content})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        write("model> ")
        reply = []
        try:
            for piece in backend.stream(messages, params):
                reply.append(piece)
                write(piece)
                if hasattr(sys.stdout, "flush") and write is sys.stdout.write:
                    sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]")
        except LmstackError as e:  # e.g. the conversation outgrew the context: say so, keep the chat alive
            write(f"[error: {e}]\n")
            history.pop()
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def chat(model: str | None = None, url: str | None = None, adapter: str | None = None, system: str | None = None,
         temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
         seed: int | None = None,
         api_key: str | None = None, device: str = "auto", threads: int = 0,
         max_model_gib: float | None = None, dtype: str = "auto", image: str | None = None) -> None:
    """Chat with a model in the terminal, streaming its replies.

    Args:
        model: Model directory to run in this process (give this or --url).
        url: Base URL of a running `lmstack serve` (or any OpenAI-compatible server).
        adapter: LoRA adapter: a directory with --model, or the served adapter's name with --url.
        system: System prompt.
        temperature: Sampling temperature, 0 = greedy (default: the model's generation_config.json, else 0.7;
            with --url the server's defaults).
        top_p: Nucleus sampling threshold (default: generation_config.json, else 0.95; with --url the server's).
        max_tokens: Most tokens per reply (default: generation_config.json max_new_tokens, else 256; with --url
            the server's).
        seed: Seed for reproducible replies.
        api_key: Key for --url (default: the LMSTACK_API_KEY variable).
        device: auto, cpu or cuda (with --model).
        threads: CPU threads for torch with --model: 0 = auto (the cores this process may use, minus those other
            processes keep busy right now; at least 1), N = exactly N.
        max_model_gib: Refuse a model whose config.json (weights, and the KV pool the context implies) needs more
            memory than this many GiB, estimated before allocating; default: 64 or this machine's RAM, the smaller.
        dtype: Weights' dtype with --model: auto (bf16 on CUDA, fp32 on CPU, whatever the checkpoint holds),
            float32, bfloat16 or float16.
        image: A picture (PNG, JPEG, ...) attached to the first turn: --model must be a VLM directory, or --url a
            server of one.
    """
    if (model is None) == (url is None):
        raise LmstackError("give exactly one of --model DIR (run here) or --url URL (talk to a server)")
    # Flags given win; then (in this process) the model's generation_config.json, then chat's own defaults.
    # A server applies its model's defaults itself, so only the flags given travel with --url.
    params = merge_sampling({}, {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed})
    image_url = file_data_url(image) if image is not None else None  # a bad file fails before any model loads
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise LmstackError(f"--model {model}: no config.json there; give a model directory")

        set_max_model_gib(max_model_gib)
        set_threads(threads)
        if image_url is not None and not is_vlm_dir(model):  # before loading anything
            raise LmstackError(f"--image: {model} is a text-only model; {NO_IMAGES}")
        backend: Any = LocalBackend(model, adapter, device=device, dtype=dtype)
        params = merge_sampling({**CHAT_DEFAULTS, **backend.generation_defaults}, params)
    else:
        backend = RemoteBackend(url, model=adapter, api_key=api_key or os.environ.get("LMSTACK_API_KEY"))
    run_chat(backend, params, system=system, image_url=image_url)


COMMANDS = chat
