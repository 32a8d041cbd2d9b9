"""ModelConfig: one dataclass that describes every Transformer lmstack can build.

Model families (llama, mistral, mixtral, qwen2, gemma2, phi3, gpt2, bert) are presets of this one config,
never subclasses (see presets.py). Zero-valued size fields are derived in __post_init__, so a saved config
always holds the resolved numbers.

Usage:
    from lmstack.model.config import ModelConfig
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg = ModelConfig.from_preset("mixtral-tiny", n_layers=4)
    cfg = ModelConfig.from_dict({"d_model": 64, "position": "alibi"})   # strict: unknown keys raise
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lmstack.config import ConfigError, from_dict, to_dict
from lmstack.runtime.validation import check_choices, check_range, need

Norm = Literal["layernorm", "rmsnorm"]
Position = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
RopeScaling = Literal["none", "linear", "ntk", "yarn", "llama3"]
MLPKind = Literal["gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "geglu_tanh"]
Backend = Literal["sdpa", "naive", "blockwise"]
AttentionKind = Literal["softmax", "performer", "linformer", "lsh", "routing"]
SparsePattern = Literal["none", "longformer", "bigbird", "dilated"]
MemoryKind = Literal["none", "xl", "compressive", "knn"]


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    # ---- sizes
    vocab_size: int = 512
    """Number of token ids the embedding and LM head cover."""
    real_vocab_size: int | None = None
    """Ids below this are real tokens; rows from here up to vocab_size only pad the table (e.g. to a fast
    matmul size) and the LM head gives them zero probability (see vocab.py). None: every row is real."""
    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Number of query heads."""
    n_kv_heads: int = 0
    """Number of key/value heads: n_heads = MHA, 1 = MQA, in between = GQA. 0 means n_heads."""
    head_dim: int = 0
    """Width of one head. 0 means d_model // n_heads."""
    d_ff: int = 0
    """Hidden width of the MLP. 0 means 4*d_model, or 8/3*d_model rounded up to 32 for gated MLPs."""
    max_seq_len: int = 256
    """Longest context the model is built and trained for (RoPE extends past it; learned positions do not)."""
    # ---- norms
    norm: Norm = "rmsnorm"
    """Normalisation layer: layernorm or rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    norm_bias: bool = True
    """Whether LayerNorm has a bias (ignored for RMSNorm)."""
    norm_position: Literal["pre", "post", "sandwich"] = "pre"
    """pre: x + f(norm(x)) (GPT-2, Llama); post: norm(x + f(x)) (BERT, original Transformer);
    sandwich: x + post_norm(f(pre_norm(x))), four norms per block (Gemma 2)."""
    norm_plus_one: bool = False
    """RMSNorm scales by (1 + weight), the weight stored as an offset from 1 and initialised to 0 (Gemma)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention (stabilises training at high LR)."""
    embedding_norm: bool = False
    """Normalise the summed embeddings before the first block (BERT)."""
    # ---- positions
    position: Position = "rope"
    """Position scheme: learned or sinusoidal (added to embeddings), rope (rotates q/k), alibi (biases scores), none."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: RopeScaling = "none"
    """Context extension for RoPE: linear (position interpolation), ntk (static NTK-aware base), yarn, llama3."""
    rope_factor: float = 1.0
    """Scaling factor for rope_scaling (the context is stretched by this much)."""
    rope_original_max_seq_len: int = 0
    """Context the model was pretrained with, for yarn/llama3. 0 means max_seq_len."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_len/low_freq_factor are interpolated fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_len/high_freq_factor are left alone."""
    rope_yarn_beta_fast: float = 32.0
    """YaRN: rotations above which a dimension is extrapolated (not interpolated)."""
    rope_yarn_beta_slow: float = 1.0
    """YaRN: rotations below which a dimension is fully interpolated."""
    # ---- attention
    causal: bool = True
    """Causal (decoder) or bidirectional (encoder) attention."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (qwen2, gpt2, bert)."""
    out_bias: bool = False
    """Bias on the attention output projection (gpt2, bert)."""
    sliding_window: int = 0
    """Each query sees at most this many keys, itself included (Mistral). 0 turns it off."""
    sliding_window_layers: list[int] | None = None
    """Layers that use the sliding window; None means all layers (when sliding_window > 0)."""
    n_sink_tokens: int = 4
    """Attention-sink tokens a streaming (sink) cache keeps besides its window (StreamingLLM)."""
    attn_logit_softcap: float = 0.0
    """Cap attention logits with cap*tanh(s/cap) (Gemma 2). Needs attn_backend naive or blockwise. 0 = off."""
    query_pre_attn_scalar: float = 0.0
    """Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma 2). 0 means head_dim (the usual 1/sqrt(d))."""
    attn_backend: Backend = "sdpa"
    """sdpa (torch's fused kernels, flash on GPU), naive (explicit softmax), blockwise (FlashAttention reference)."""
    attn_block_size: int = 128
    """Tile size of the blockwise backend and of block-sparse patterns' skip test."""
    fused_kernels: bool = False
    """Fused RMSNorm and SwiGLU (model/fused.py): Triton on CUDA, compiled/plain torch on CPU. Same numbers."""
    fused_projections: bool = False
    """One qkv_proj Linear (q rows, then k, then v) per attention and one gate_up_proj (gate rows, then up) per
    gated MLP, Phi-3's checkpoint layout: fewer, larger matmuls, the same numbers (model/fused_projections.py).
    Transformer.fuse_projections()/unfuse_projections() convert a model in place; the engine fuses models it
    loads itself. Training adapters (LoRA, IA3, ...) target the split q/k/v/gate/up Linears: keep it off to train."""
    attention: AttentionKind = "softmax"
    """softmax, or linear-cost performer (random features) / linformer (low-rank K/V, bidirectional only)."""
    performer_features: int = 256
    """Random features of Performer attention; the estimate approaches softmax attention as this grows."""
    linformer_k: int = 64
    """Rows Linformer projects keys and values to along the sequence."""
    lsh_n_hashes: int = 4
    """attention='lsh' (Reformer): hash rounds; more rounds find more of each query's near keys."""
    lsh_chunk_size: int = 64
    """attention='lsh': chunk length after the sort; each chunk attends to itself and the previous chunk."""
    lsh_n_buckets: int = 0
    """attention='lsh': buckets per round (even); 0 = about T/lsh_chunk_size, as in Reformer."""
    lsh_shared_qk: bool = True
    """attention='lsh': Reformer's shared-QK (keys are the normalised queries; the model has no k_proj)."""
    routing_n_clusters: int = 8
    """attention='routing' (Routing Transformer): k-means centroids per routing head; each takes its nearest
    queries and keys, and a query attends only to the keys of its clusters."""
    routing_window: int = 0
    """attention='routing': queries and keys each cluster takes (w), also the local heads' window; 0 = ceil(T /
    routing_n_clusters), the paper's balanced choice (cost about T*w instead of T^2)."""
    routing_local_heads: int = 0
    """attention='routing': the first this-many heads attend to a causal local window of w keys instead (the
    paper mixes local and routing heads); the rest route."""
    routing_ema_decay: float = 0.999
    """attention='routing': decay of the centroids' moving average (mini-batch k-means in training, none in eval);
    0.999 is the paper's, for long runs; a short run learns much faster with about 0.9 (benchmarks/routing_attention)."""
    sparse_pattern: SparsePattern = "none"
    """Sparse attention mask: longformer (window + global tokens), bigbird (window, global, random blocks), dilated."""
    sparse_global_tokens: int = 0
    """longformer/bigbird: the first N positions attend to and are seen by every token."""
    sparse_random_blocks: int = 0
    """bigbird: random key blocks each query block sees, with blocks of attn_block_size."""
    sparse_dilation: int = 1
    """dilated: keys at offsets 0, d, 2d, ... within sliding_window*d."""
    # ---- MLP and mixture of experts
    mlp: MLPKind = "swiglu"
    """MLP kind: gelu, gelu_tanh, relu, relu2, silu, or gated swiglu / geglu / geglu_tanh (Gemma's tanh GELU)."""
    mlp_bias: bool = False
    """Bias on MLP projections."""
    n_experts: int = 0
    """Routed experts per MoE layer. 0 means a dense model."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    n_shared_experts: int = 0
    """Always-on shared experts (DeepSeekMoE / Qwen-MoE style), added to the routed output."""
    moe_layers: list[int] | None = None
    """Layers that are MoE; None means all (when n_experts > 0). Others stay dense: hybrid dense/MoE."""
    moe_d_ff: int = 0
    """Hidden width of one expert. 0 means d_ff."""
    moe_renormalize: bool = True
    """Renormalise the top-k router probabilities to sum to 1 (Mixtral)."""
    router_aux_loss_coef: float = 0.01
    """Weight of the Switch-style load-balancing loss (E * sum_i f_i * P_i)."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of router logits; ST-MoE)."""
    moe_capacity_factor: float = 0.0
    """Each expert takes at most ceil(factor * tokens * top_k / n_experts) tokens per forward; the overflow
    is dropped (counted in MoE.last_dropped) and passes through the residual only. 0 = no limit."""
    # ---- mixture of depths (mixture_of_depths.py)
    mod_capacity: float = 0.0
    """Mixture-of-Depths (Raposo et al. 2024): the fraction of each sequence's tokens a routed block processes
    (the rest skip it through the residual), e.g. 0.125. 0 = off."""
    mod_layers: list[int] | None = None
    """Blocks that are routed; None means every other block (1, 3, 5, ...), as the paper."""
    mod_aux_loss_coef: float = 0.01
    """Weight of the router's BCE loss against its own top-k choice, which makes sigmoid(router) > 0.5 a causal
    stand-in for top-k when sampling."""
    # ---- long-context memory (model/memory/)
    memory: MemoryKind = "none"
    """Long-context memory: xl (Transformer-XL: each layer also attends over its hidden states from earlier
    segments, gradient stopped), compressive (xl plus a second memory of older states compressed by
    cmem_rate, Compressive Transformer), knn (one layer also attends over the top-k keys/values stored from
    earlier segments, Memorizing Transformer). A memory model's forward without a cache runs a long input
    segment by segment through a fresh memory, so it trains and scores through the ordinary paths."""
    seg_len: int = 0
    """memory: tokens per segment; 0 = max_seq_len - mem_len - cmem_len (xl/compressive) or max_seq_len (knn)."""
    mem_len: int = 0
    """memory='xl'|'compressive': hidden states each layer carries from the segments before (>= 1)."""
    cmem_len: int = 0
    """memory='compressive': compressed memory slots each layer keeps (>= 1)."""
    cmem_rate: int = 2
    """memory='compressive': states evicted from the memory per compressed slot (the compression rate c)."""
    cmem_fn: Literal["conv", "mean", "max"] = "conv"
    """memory='compressive': the compression function: a strided 1-d convolution (learned), mean or max pooling."""
    cmem_loss_coef: float = 1.0
    """memory='compressive': weight of the attention-reconstruction loss that trains the compression (it reaches
    only the compressor's weights, as in the paper)."""
    cmem_lr_scale: float = 1 / 30
    """memory='compressive' with cmem_fn='conv': the compressor's learning rate as a fraction of the model's (the
    optimizer's param groups apply it, without weight decay): at the model's rate the convolution leaves its
    mean-pooling start and recall collapses (benchmarks/compressive_memory.py)."""
    knn_layer: int = -1
    """memory='knn': the layer that attends over the store; -1 = the second-to-last layer."""
    knn_top_k: int = 32
    """memory='knn': stored keys each query retrieves per head."""
    knn_capacity: int = 4096
    """memory='knn': pairs the store holds per row; the oldest are evicted first."""
    # ---- embeddings and heads
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    head: Literal["lm", "mlm", "none"] = "lm"
    """lm: logits over the vocab; mlm: BERT's transform + tied decoder; none: return hidden states."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(d_model) before the first block (Gemma)."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings, as BERT has. 0 = none."""
    final_logit_softcap: float = 0.0
    """Cap output logits with cap*tanh(z/cap). 0 = off."""
    # ---- block structure
    parallel_residual: bool = False
    """x + attn(norm1(x)) + mlp(norm2(x)) in one step (GPT-J / GPT-NeoX)."""
    n_unique_layers: int = 0
    """Cross-layer parameter sharing (ALBERT): layer i reuses block i % n_unique_layers. 0 = no sharing."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    init: Literal["gpt2", "normal", "small"] = "gpt2"
    """Weight init: gpt2 (N(0, std), residual outputs scaled by 1/sqrt(2*n_layers)), normal, small (std sqrt(2/(5d)))."""
    init_std: float = 0.02
    """Standard deviation for gpt2/normal init."""
    parametrization: Literal["standard", "mup"] = "standard"
    """standard: today's init and LRs. mup: maximal update parametrisation (Yang et al. 2022, model/mup.py): hidden
    matrices init with std * sqrt(mup_base_width/d_model) and train at lr * mup_base_width/d_model under Adam (their
    weight decay times d_model/mup_base_width, so lr * decay stays put), the readout keeps the base init std and its
    logits are multiplied by mup_base_width/d_model, attention scores scaled by sqrt(base_head_dim)/head_dim (1/d, not
    1/sqrt(d)), so the best LR found at the base width transfers to wider models."""
    mup_base_width: int = 0
    """parametrization='mup': the d_model the hyperparameters were tuned at (the base shape); needs > 0."""
    # ---- bookkeeping for export
    bos_token_id: int | None = None
    """Beginning-of-sequence id written to config.json / generation_config.json."""
    eos_token_id: int | None = None
    """End-of-sequence id written to config.json / generation_config.json."""
    pad_token_id: int | None = None
    """Padding id written to config.json."""
    hf_model_type: str = ""
    """The HF family this config mirrors (llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, phi3, gpt2, bert);
    used on export."""
    name: str = ""
    """Free-form name, e.g. the preset it came from."""

    # Fields whose sentinel value means "derive me from the others" (see __post_init__). The CLI and
    # from_dict reset a derived field to its sentinel before applying overrides, so that
    # `--model.d_model 128` re-derives head_dim and d_ff instead of keeping the default model's.
    DERIVED: ClassVar[dict[str, Any]] = {"n_kv_heads": 0, "head_dim": 0, "d_ff": 0, "moe_d_ff": 0,
                                         "rope_original_max_seq_len": 0}
    # `_derived` lives in a slot beside __dict__, so tools that read vars(cfg) as the init arguments
    # (jsonargparse's defaults) do not see it.
    __slots__ = ("_derived", "__dict__")

    def __post_init__(self) -> None:
        check_choices(self)
        # which fields this instance derived (not a dataclass field: never saved, never compared)
        self._derived = {k: v for k, v in self.DERIVED.items() if getattr(self, k) == v}
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                    "(or set head_dim explicitly)"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff == 0:
            self.d_ff = _round_up(int(8 * self.d_model / 3), 32) if self.gated else 4 * self.d_model
        if self.moe_d_ff == 0:
            self.moe_d_ff = self.d_ff
        if self.rope_original_max_seq_len == 0:
            self.rope_original_max_seq_len = self.max_seq_len
        self.validate()

    # ---- derived facts
    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu", "geglu_tanh")

    def window_for_layer(self, layer: int) -> int:
        """The sliding window of `layer` (0 = full attention)."""
        if self.sliding_window and (self.sliding_window_layers is None or layer in self.sliding_window_layers):
            return self.sliding_window
        return 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    def memory_seg_len(self) -> int:
        """The segment length a memory model runs long inputs in (seg_len, or what the window leaves)."""
        if self.seg_len:
            return self.seg_len
        if self.memory == "knn":
            return self.max_seq_len
        return self.max_seq_len - self.mem_len - self.cmem_len

    def memory_layer(self) -> int:
        """memory='knn': the index of the layer that attends over the store."""
        return self.knn_layer if self.knn_layer >= 0 else max(self.n_layers - 2, 0)

    def is_mod_layer(self, layer: int) -> bool:
        """Whether block `layer` is a Mixture-of-Depths (routed) block."""
        if not self.mod_capacity:
            return False
        return layer % 2 == 1 if self.mod_layers is None else layer in self.mod_layers

    # ---- validation
    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the field for any invalid combination."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.real_vocab_size is None or 1 <= self.real_vocab_size <= self.vocab_size,
             f"real_vocab_size={self.real_vocab_size} must be None or between 1 and vocab_size={self.vocab_size}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        need(self.position != "rope" or self.head_dim % 2 == 0, f"position=rope needs an even head_dim, got {self.head_dim}")
        need(self.rope_scaling == "none" or self.position == "rope",
             f"rope_scaling={self.rope_scaling!r} needs position='rope', got position={self.position!r}")
        need(self.rope_scaling == "none" or self.rope_factor >= 1.0,
             f"rope_factor must be >= 1 when rope_scaling is set, got {self.rope_factor}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check_range("sliding_window", self.sliding_window, low=0)
        for name in ("sliding_window_layers", "moe_layers", "mod_layers"):
            layers = getattr(self, name)
            if layers is not None:
                bad = [i for i in layers if not 0 <= i < self.n_layers]
                need(not bad, f"{name} has layer indices {bad} outside 0..{self.n_layers - 1}")
        check_range("n_sink_tokens", self.n_sink_tokens, low=0)
        check_range("attn_logit_softcap", self.attn_logit_softcap, low=0)
        need(not (self.attn_logit_softcap and self.attn_backend == "sdpa"),
             "attn_logit_softcap needs attn_backend='naive' or 'blockwise' (SDPA cannot cap logits)")
        need(not (self.dropout and self.attn_backend == "blockwise"),
             "attn_backend='blockwise' has no attention dropout; set dropout=0 or use sdpa/naive")
        need(self.attn_block_size > 0, f"attn_block_size must be positive, got {self.attn_block_size}")
        if self.sparse_pattern in ("longformer", "dilated"):
            need(self.sliding_window > 0, f"sparse_pattern={self.sparse_pattern!r} needs sliding_window > 0")
        check_range("sparse_dilation", self.sparse_dilation, low=1)
        need(self.sparse_global_tokens >= 0 and self.sparse_random_blocks >= 0,
             "sparse_global_tokens and sparse_random_blocks must be >= 0")
        if self.attention != "softmax":
            need(self.position not in ("alibi",), f"attention={self.attention!r} cannot add ALiBi biases")
            need(not self.sliding_window and self.sparse_pattern == "none",
                 f"attention={self.attention!r} does not take sliding_window or sparse_pattern masks")
            need(self.attention != "linformer" or not self.causal, "attention='linformer' needs causal=False")
            need(self.performer_features > 0 and 0 < self.linformer_k <= self.max_seq_len,
                 "performer_features must be > 0 and linformer_k in 1..max_seq_len")
        need(self.lsh_n_hashes >= 1 and self.lsh_chunk_size >= 1,
             f"lsh_n_hashes and lsh_chunk_size must be >= 1, got {self.lsh_n_hashes} and {self.lsh_chunk_size}")
        need(self.lsh_n_buckets == 0 or (self.lsh_n_buckets >= 2 and self.lsh_n_buckets % 2 == 0),
             f"lsh_n_buckets must be 0 (auto) or an even number >= 2, got {self.lsh_n_buckets}")
        need(self.routing_n_clusters >= 1 and self.routing_window >= 0,
             f"routing_n_clusters must be >= 1 and routing_window >= 0, got {self.routing_n_clusters} and "
             f"{self.routing_window}")
        need(0 <= self.routing_local_heads < self.n_heads,
             f"routing_local_heads must be in 0..n_heads-1={self.n_heads - 1}, got {self.routing_local_heads}")
        need(not self.routing_local_heads or self.causal, "routing_local_heads are causal local windows; "
             "set routing_local_heads=0 for a bidirectional (causal=False) model")
        need(0.0 <= self.routing_ema_decay < 1.0, f"routing_ema_decay must be in [0, 1), got {self.routing_ema_decay}")
        check_range("n_experts", self.n_experts, low=0)
        need(self.moe_capacity_factor >= 0, f"moe_capacity_factor must be >= 0 (0 = no limit), got {self.moe_capacity_factor}")
        if self.n_experts:
            need(1 <= self.moe_top_k <= self.n_experts,
                 f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")
        check_range("n_shared_experts", self.n_shared_experts, low=0)
        self._validate_mod()
        self._validate_memory()
        need(self.n_shared_experts == 0 or self.n_experts > 0, "n_shared_experts needs n_experts > 0")
        need(0 <= self.n_unique_layers <= self.n_layers,
             f"n_unique_layers={self.n_unique_layers} must be between 0 and n_layers={self.n_layers}")
        check_range("type_vocab_size", self.type_vocab_size, low=0)
        need(not (self.head == "mlm" and self.norm != "layernorm"), "head='mlm' (BERT's transform) needs norm='layernorm'")
        need(not self.norm_plus_one or self.norm == "rmsnorm", "norm_plus_one needs norm='rmsnorm'")
        need(not (self.norm_plus_one and self.fused_kernels),
             "fused_kernels' RMSNorm has no (1 + weight) form; set norm_plus_one=False or fused_kernels=False")
        need(not (self.norm_position == "sandwich" and self.parallel_residual),
             "norm_position='sandwich' and parallel_residual cannot be combined")
        check_range("query_pre_attn_scalar", self.query_pre_attn_scalar, low=0)
        need(self.parametrization == "mup" or not self.mup_base_width,
             f"mup_base_width={self.mup_base_width} needs parametrization='mup'")
        need(self.parametrization != "mup" or self.mup_base_width > 0,
             f"parametrization='mup' needs mup_base_width > 0 (the d_model the LR was tuned at), got {self.mup_base_width}")
        need(self.parametrization != "mup" or self.attention == "softmax",
             f"parametrization='mup' rescales softmax attention only, got attention={self.attention!r}")
        need(not (self.fused_projections and self.attention == "lsh" and self.lsh_shared_qk),
             "fused_projections needs a k_proj, which shared-QK attention='lsh' has not; set lsh_shared_qk=False "
             "or fused_projections=False")

    def _validate_memory(self) -> None:
        for name in ("seg_len", "mem_len", "cmem_len"):
            check_range(name, getattr(self, name), low=0)
        if self.memory == "none":
            set_ = [k for k in ("seg_len", "mem_len", "cmem_len") if getattr(self, k)]
            need(not set_, f"{', '.join(set_)} need a long-context memory; set memory to xl, compressive or knn")
            return
        what = f"memory={self.memory!r}"
        need(self.attention == "softmax", f"{what} needs softmax attention over a key set, got attention={self.attention!r}")
        need(self.causal, f"{what} is for causal (decoder) models; this config has causal=False")
        need(self.sparse_pattern == "none", f"{what} does not combine with sparse_pattern={self.sparse_pattern!r}")
        need(not self.mod_capacity, f"{what} does not combine with mod_capacity (Mixture-of-Depths): a routed block "
             "would skip tokens whose hidden states the memory carries; use one or the other")
        if self.memory == "knn":
            need(-1 <= self.knn_layer < self.n_layers, f"knn_layer must be -1 or in 0..{self.n_layers - 1}, got {self.knn_layer}")
            need(1 <= self.knn_top_k <= self.knn_capacity,
                 f"knn_top_k={self.knn_top_k} must be >= 1 and <= knn_capacity={self.knn_capacity}")
            need(not (self.mem_len or self.cmem_len), "mem_len and cmem_len are for memory='xl'|'compressive', not 'knn'")
            need(self.memory_seg_len() <= self.max_seq_len,
                 f"seg_len={self.seg_len} exceeds max_seq_len={self.max_seq_len}, the window one segment attends in")
            return
        need(self.position in ("rope", "alibi", "none"), f"{what} needs relative positions, but position="
             f"{self.position!r} adds absolute embeddings that cannot continue across the memory; use rope, alibi or none")
        need(self.mem_len >= 1, f"{what} needs mem_len >= 1 (hidden states carried per layer)")
        if self.memory == "compressive":
            need(self.cmem_lr_scale > 0, f"cmem_lr_scale must be > 0, got {self.cmem_lr_scale}")
            need(self.cmem_len >= 1 and self.cmem_rate >= 1,
                 f"memory='compressive' needs cmem_len >= 1 and cmem_rate >= 1, got {self.cmem_len} and {self.cmem_rate}")
        else:
            need(not self.cmem_len, "cmem_len needs memory='compressive'")
        need(self.seg_len or self.memory_seg_len() >= 1,
             f"mem_len={self.mem_len} + cmem_len={self.cmem_len} leave no room for a segment in max_seq_len="
             f"{self.max_seq_len}; lower them or raise max_seq_len")
        window = self.mem_len + self.cmem_len + self.memory_seg_len()
        need(window <= self.max_seq_len,
             f"mem_len={self.mem_len} + cmem_len={self.cmem_len} + seg_len={self.memory_seg_len()} = {window} must fit "
             f"in max_seq_len={self.max_seq_len}, the positions one segment and its memory span; lower one of them")

    def _validate_mod(self) -> None:
        need(0.0 <= self.mod_capacity <= 1.0,
             f"mod_capacity must be in (0, 1] (0 turns Mixture-of-Depths off), got {self.mod_capacity}")
        check_range("mod_aux_loss_coef", self.mod_aux_loss_coef, low=0)
        if not self.mod_capacity:
            need(self.mod_layers is None, "mod_layers needs mod_capacity > 0 (Mixture-of-Depths is off)")
            return
        both = [i for i in range(self.n_unique_layers or self.n_layers) if self.is_mod_layer(i) and self.is_moe_layer(i)]
        need(not both, f"blocks {both} are both Mixture-of-Depths (mod_layers) and MoE (moe_layers); a block is one "
             "or the other: set moe_layers and mod_layers apart")
        # Routed tokens keep their positions only through RoPE; these rules read distances in the routed frame.
        need(self.position != "alibi", "mod_capacity needs position rope, learned, sinusoidal or none, not alibi")
        need(not self.sliding_window and self.sparse_pattern == "none",
             "mod_capacity does not take sliding_window or sparse_pattern (a routed block's keys are a subset)")

    # ---- construction helpers
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        # lazy: cycle (lmstack.model.presets imports this module)
        from lmstack.model.presets import preset

        return preset(name, **overrides)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
