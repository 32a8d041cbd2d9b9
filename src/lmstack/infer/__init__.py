"""lmstack.infer: the inference engine (paged KV cache, continuous batching, prefix caching, sampling,
beam search, speculative and constrained decoding, multi-LoRA hook, prompt compression, sink-cache chat).

Usage:
    from lmstack.infer import LLM, SamplingParams
    llm = LLM("runs/model")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    engine = LLMEngine("runs/model"); engine.add_request("r1", "Hi", SamplingParams()); engine.step()
"""
from lmstack.infer.async_engine import AsyncLLMEngine
from lmstack.infer.engine import LLMEngine
from lmstack.infer.llm import LLM
from lmstack.infer.lora_hook import LinearLoRA
from lmstack.infer.outputs import CompletionOutput, RequestFailed, RequestMetrics, RequestOutput
from lmstack.infer.sampling_params import SamplingParams, SamplingParamsError
from lmstack.infer.sink_cache_chat import SinkCacheChat
from lmstack.infer.speculative import SpeculativeConfig

__all__ = ["AsyncLLMEngine", "CompletionOutput", "LLM", "LLMEngine", "LinearLoRA", "RequestFailed", "RequestMetrics",
           "RequestOutput", "SamplingParams", "SamplingParamsError", "SinkCacheChat", "SpeculativeConfig"]
