"""`lmstack serve`: start the OpenAI-compatible server on a model directory.

Usage:
    lmstack serve --model runs/model --host 127.0.0.1 --port 8000 --api_key sk-local
    lmstack serve --model runs/model --limits.max_stop 8 --limits.max_bad_words 64   # tighter request caps
    lmstack serve --model runs/model --compression.model runs/small   # requests may send "prompt_compression"
    LMSTACK_API_KEY=sk-local lmstack serve --model runs/model    # keeps the key out of `ps`
    lmstack serve --model Qwen2.5-dir --tool_call_parser hermes   # requests may send tools (default: auto)
    lmstack serve --model runs/model --tensor-parallel-size 2     # the model sharded over 2 processes
    lmstack serve --model runs/model --kv_cache_dtype int8        # int8 KV cache: ~3.8x the tokens per pool byte
    lmstack serve --model runs/sft --rag_index idx     # chat with "rag": {"k": 5} gets citations; /v1/embeddings
    lmstack serve --model runs/sft --guard guard.yaml  # moderated chat/completions (safety.guard), /v1/moderations
    lmstack serve --model runs/sft --safety safety.yaml   # hard phrase bans + persona presets (safety.presets)
    lmstack serve --model runs/sft --feedback_db fb.db # record replies; POST /v1/feedback flags them (safety.feedback)
    lmstack serve --model runs/vlm --max_images 2      # a VLM: chat messages may carry image_url parts (data: URLs)
    lmstack serve --model runs/sft --asr runs/asr --tts runs/tts --diffusion runs/dit  # speech and picture APIs
    lmstack serve --model runs/sft --video runs/video  # POST /v1/video/answers: frames + a question -> an answer
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "Once upon a time", "max_tokens": 16}'

Python:
    app, aengine = build_app("runs/model", ServerConfig(api_key="sk-local"), max_num_seqs=8)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer import AsyncLLMEngine
from lmstack.infer.tp_group import torchrun_rank
from lmstack.infer.tp_worker import run_worker
from lmstack.model.load_guard import set_max_model_gib
from lmstack.multimodal.asr import SpeechRecognizer
from lmstack.multimodal.dit import ImageGenerator
from lmstack.multimodal.engine_adapter import is_vlm_dir, load_engine_vlm
from lmstack.multimodal.tts import SpeechSynthesizer
from lmstack.rag.embed import load_embedder
from lmstack.rag.index import Index
from lmstack.safety.feedback import FeedbackStore
from lmstack.safety.guard import Guard, load_guard_config
from lmstack.safety.presets import load_safety_config
from lmstack.runtime.device import pick_device
from lmstack.serve.app import create_app
from lmstack.serve.audio_input import AudioLimits
from lmstack.serve.engine_bridge import ServerConfig
from lmstack.serve.image_input import ImageLimits, ServedImages
from lmstack.serve.limits import RequestLimits
from lmstack.serve.prompt_compression import CompressionConfig
from lmstack.serve.rag_routes import RagService
from lmstack.serve.video_routes import VideoAnswerer
from lmstack.threads import set_threads

def load_serving_adapters(model: Any, paths: dict[str, str]) -> dict[str, Any]:
    """{name: adapter directory} -> {name: adapter object} for the engine's multi-LoRA hook.

    Reading adapter files is the fine-tuning stage's job: `lmstack.adapt.load_serving_adapter(model, path)`
    returns an object with `apply(module_name, x, base_out)` (see lmstack.infer.lora_hook)."""
    try:
        # lazy: guarded: the except ImportError below names what is missing
        from lmstack.adapt import load_serving_adapter
    except ImportError:
        raise LmstackError("serving a LoRA adapter from disk needs lmstack.adapt.load_serving_adapter (the fine-tuning "
                           "stage), which this install does not have") from None
    return {name: load_serving_adapter(model, path) for name, path in paths.items()}


def parse_adapters(adapters: list[str] | None) -> dict[str, str] | None:
    """['name=path', ...] -> {name: path}."""
    if not adapters:
        return None
    out = {}
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LmstackError(f"adapter {item!r} must look like NAME=PATH")
        if not Path(path).exists():
            raise LmstackError(f"adapter {name!r}: {path} does not exist")
        out[name] = path
    return out


def load_rag(rag_index: str | None, embedder: str | None) -> RagService | None:
    """The retriever and embedder behind RAG chat and /v1/embeddings (None when neither is asked for)."""
    if rag_index is None and embedder is None:
        return None
    emb = load_embedder(embedder) if embedder is not None else None
    return RagService(Index.open(rag_index, embedder=emb) if rag_index is not None else None, emb)


def build_app(model: str, config: ServerConfig, **engine_kwargs: Any):
    """(FastAPI app, AsyncLLMEngine) for a model directory."""

    path = Path(model)
    if not (path / "config.json").is_file():
        raise LmstackError(f"--model {model}: no config.json there; give a model directory (lmstack or HF layout)")
    source: Any = str(path)
    adapter_paths = engine_kwargs.pop("adapter_paths", None)
    image_limits = engine_kwargs.pop("images", None)
    vlm = None
    if is_vlm_dir(path):  # pictures become placeholder ids of the engine's model (multimodal/engine_adapter.py)
        if adapter_paths:
            raise LmstackError(f"--model {model} is a VLM; LoRA adapters are served for text models only")
        vlm, tok = load_engine_vlm(path)  # a Flamingo (xattn) VLM is refused here, by name
        source = vlm
        engine_kwargs.setdefault("tokenizer", tok)
        engine_kwargs["cuda_graphs"] = False  # a step's placeholder check reads its ids, which a graph cannot
    rag = engine_kwargs.pop("rag", None)
    guard = engine_kwargs.pop("guard", None)
    feedback = engine_kwargs.pop("feedback", None)
    speech = {k: engine_kwargs.pop(k, None) for k in ("asr", "tts", "diffusion", "audio_limits", "video")}
    if config.safety.banned_phrases:  # the engine's: every request gets them, no request field reaches them
        engine_kwargs["banned_phrases"] = list(config.safety.banned_phrases)
    if adapter_paths:  # adapters hook into the model's Linears, so the model is loaded first

        source = lmstack.load_model(path, dtype=engine_kwargs.get("dtype"), device=engine_kwargs.get("device", "cpu"))
        engine_kwargs["lora_adapters"] = load_serving_adapters(source, adapter_paths)
        engine_kwargs.setdefault("tokenizer", lmstack.load_tokenizer(path))
    aengine = AsyncLLMEngine(source, **engine_kwargs)
    if aengine.tokenizer is None:
        raise LmstackError(f"--model {model}: no tokenizer.json there; the server needs the model's tokenizer")
    app = create_app(aengine, config, rag=rag, guard=guard, feedback=feedback, asr=speech["asr"], tts=speech["tts"],
                     images=speech["diffusion"], audio_limits=speech["audio_limits"], video=speech["video"])
    if vlm is not None:
        app.state.lmstack.vision = ServedImages(vlm, aengine.tokenizer, image_limits)
    return app, aengine


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_num_seqs: int = 16, max_batched_tokens: int = 2048,
          max_model_len: int | None = None, block_size: int = 16, num_blocks: int | None = None,
          enable_prefix_caching: bool = True, max_queue: int = 64, max_tokens_limit: int = 4096,
          max_request_bytes: int = 1 << 20, max_n: int = 16, adapters: list[str] | None = None,
          device: str = "auto", dtype: str = "auto", threads: int = 0, seed: int = 0,
          log_level: str = "info", limits: RequestLimits = RequestLimits(), max_model_gib: float | None = None,
          compression: CompressionConfig = CompressionConfig(), tool_call_parser: str = "auto",
          tensor_parallel_size: int = 1, kv_cache_dtype: Literal["auto", "int8"] = "auto",
          rag_index: str | None = None, embedder: str | None = None, guard: str | None = None,
          safety: str | None = None, feedback_db: str | None = None, max_images: int = 4,
          max_image_pixels: int = 2048 * 2048, allow_local_images: bool = False, asr: str | None = None,
          tts: str | None = None, diffusion: str | None = None, max_audio_seconds: float = 60.0,
          max_audio_bytes: int = 25 << 20, video: str | None = None) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics).

    Args:
        model: Model directory (config.json, model.safetensors, tokenizer.json).
        host: Address to bind; 127.0.0.1 keeps the server private to this machine.
        port: TCP port.
        api_key: Require `Authorization: Bearer <key>` (default: the LMSTACK_API_KEY variable, else none).
        model_name: Name clients use in `model` (default: the directory's name).
        max_num_seqs: Most sequences decoded together in one batch.
        max_batched_tokens: Token budget of one engine step (chunked prefill splits longer prompts).
        max_model_len: Context length (default: the model's max_seq_len).
        block_size: Tokens per KV-cache block.
        num_blocks: KV-cache blocks in the pool (default: sized from max_num_seqs and the context).
        enable_prefix_caching: Reuse the KV blocks of shared prompt prefixes.
        max_queue: Requests allowed to wait beyond max_num_seqs before the server answers 503.
        max_tokens_limit: Largest max_tokens a request may ask for.
        max_request_bytes: Largest request body, in bytes (413 above).
        max_n: Largest n / best_of per request.
        adapters: LoRA adapters to serve, each NAME=PATH; clients select one with `model: NAME`.
        device: auto, cpu or cuda.
        dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16.
        threads: CPU threads for torch: 0 = auto (the cores this process may use, minus those other processes keep busy
            right now; at least 1), N = exactly N. On a shared machine 1 can be much faster.
        seed: Seed of the engine's sampler (requests can also give their own seed).
        log_level: uvicorn log level (debug, info, warning, error).
        max_model_gib: Refuse a model whose config.json (weights, and the KV pool the context implies) needs more
            memory than this many GiB, estimated before allocating; default: 64 or this machine's RAM, the smaller.
        limits: Caps on what one request may carry (400 above; see lmstack.serve.limits.RequestLimits), e.g.
            --limits.max_stop 8 --limits.max_bad_words 64 --limits.prompt_bytes_per_token 8.
        compression: Prompt compression before prefill (see lmstack.serve.prompt_compression.CompressionConfig):
            --compression.model DIR (a small scorer LM with the served tokenizer) lets requests send
            "prompt_compression": {"rate": 0.5}; --compression.rate 0.5 compresses every request. Off by default.
        tool_call_parser: How replies to requests with `tools` become tool_calls: auto (picked from the chat
            template: <tool_call> -> hermes, <|python_tag|> -> llama3_json), hermes, llama3_json or none.
        tensor_parallel_size: Shard the model over this many processes (torch.distributed: gloo on CPU, NCCL on
            CUDA); each keeps 1/N of the heads, MLP and KV cache. On one machine the server starts N-1 workers
            itself; under torchrun with WORLD_SIZE=N, rank 0 serves HTTP and the other ranks run the worker loop.
        kv_cache_dtype: auto (the KV cache in the model's dtype) or int8 (int8 with a per-token, per-head fp32 scale:
            ~3.8x the tokens of an fp32 cache in the same memory; see lmstack.infer.kv_quant).
        rag_index: A retrieval index (`lmstack rag index`): chat requests with "rag": {"k": 5} or a tool named
            `retrieve` are answered from it with citations, and /v1/embeddings serves its embedder.
        embedder: The embedder /v1/embeddings serves (and the index is searched with): minilm or an encoder
            directory (default: the one the index was built with).
        guard: A guard config (YAML or JSON; see lmstack.safety.guard.GuardConfig): moderate requests before the
            engine and replies as they stream (a blocked one ends with the refusal and finish_reason
            "content_filter"), redact PII in replies, and serve /v1/moderations. Its moderator is loaded at startup.
        safety: A safety config (YAML or JSON; see lmstack.safety.presets.SafetyConfig): hard phrase bans no reply may
            contain (across token boundaries; requests cannot lift them) and the persona presets chat requests may
            pick with "safety_preset" (default, concise, friendly, strict, or the config's own).
        feedback_db: A SQLite file (created if missing) where every chat/completions response is recorded and
            POST /v1/feedback stores users' flags (rating up/down, category, correction); `lmstack align --method dpo
            --from-feedback PATH` turns them into preference pairs (see lmstack.safety.feedback).
        max_images: With a VLM (--model VLM_DIR): most image_url parts one chat request may carry (400 above).
        max_image_pixels: With a VLM: largest picture, width x height, checked from its header before decoding
            (400 above).
        allow_local_images: With a VLM: let image_url name a file on this machine (file:///x.png or a path); off,
            such a part is a 400 naming this flag. Data URLs (data:image/png;base64,...) are always read.
        asr: A speech recognizer directory (lmstack.multimodal.asr.SpeechRecognizer.save): serves
            /v1/audio/transcriptions (WAV, FLAC or MP3 uploads; see lmstack.serve.audio_routes).
        tts: A speech synthesizer directory (lmstack.multimodal.tts.SpeechSynthesizer.save): serves /v1/audio/speech.
        diffusion: An image generator directory (`lmstack mm train-diffusion`): serves /v1/images/generations.
        max_audio_seconds: Longest audio upload, in seconds, read from its header before decoding (400 above);
            the recognizer's own longest input lowers it.
        max_audio_bytes: Largest audio upload, in bytes (413 above; OpenAI's limit is 25 MB).
        video: A video QA directory (`lmstack mm train-video`): serves POST /v1/video/answers, an lmstack
            extension (frames or a sprite sheet + a question -> an answer; see lmstack.serve.video_routes).
    """
    # lazy: heavy (uvicorn), which this module does not import at its top
    import uvicorn

    if tensor_parallel_size != 1 and torchrun_rank(tensor_parallel_size) not in (None, 0):
        run_worker(tensor_parallel_size)  # ranks > 0 under torchrun: a shard of rank 0's engine, no HTTP
        return
    # A bad guard config or moderator fails here, before the model loads.
    guard_obj = Guard(load_guard_config(guard)) if guard else None
    safety_cfg = load_safety_config(safety)
    feedback_store = FeedbackStore(feedback_db) if feedback_db else None  # a bad path fails before the model loads
    audio_limits = AudioLimits(max_audio_seconds, max_audio_bytes)
    # The speech and picture models load before the LLM, so a wrong directory fails fast, naming its flag.
    speech = {}
    for flag, path, loader in (("asr", asr, SpeechRecognizer.from_dir), ("tts", tts, SpeechSynthesizer.from_dir),
                               ("diffusion", diffusion, ImageGenerator.from_dir),
                               ("video", video, VideoAnswerer.from_dir)):
        try:
            speech[flag] = loader(path) if path else None
        except LmstackError as e:
            raise LmstackError(f"--{flag} {path}: {e}") from None
    set_max_model_gib(max_model_gib)
    set_threads(threads)
    dev, torch_dtype = pick_device(device, dtype)
    api_key = api_key if api_key is not None else (os.environ.get("LMSTACK_API_KEY") or None)
    config = ServerConfig(model_name=model_name or Path(model).resolve().name, api_key=api_key, host=host,
                          max_request_bytes=max_request_bytes, max_tokens_limit=max_tokens_limit,
                          max_queue=max_queue, max_n=max_n, limits=limits, compression=compression,
                          tool_call_parser=tool_call_parser, safety=safety_cfg)
    app, aengine = build_app(model, config, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                             max_model_len=max_model_len, block_size=block_size, num_blocks=num_blocks,
                             enable_prefix_caching=enable_prefix_caching, device=dev, dtype=torch_dtype,
                             seed=seed, adapter_paths=parse_adapters(adapters),
                             tensor_parallel_size=tensor_parallel_size, kv_cache_dtype=kv_cache_dtype,
                             rag=load_rag(rag_index, embedder), guard=guard_obj, feedback=feedback_store,
                             images=ImageLimits(max_images, max_image_pixels, allow_local_images),
                             audio_limits=audio_limits, **speech)
    stats = aengine.stats()
    print(f"lmstack serve: {config.model_name} on http://{host}:{port} ({dev}, {str(torch_dtype)[6:]}, "
          f"{torch.get_num_threads()} threads, "
          f"{stats['num_blocks_total']} KV blocks of {stats['block_size']} tokens, "
          f"auth {'off' if not api_key else 'on for all but /health' if config.key_on_everything else 'on'}"
          f"{f', feedback to {feedback_db}' if feedback_store else ''})")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


COMMANDS = serve
