"""Our own forward pass for Llama-family models (llama, mistral, qwen2), for the batching engine.

Profiled on a 2-core CPU with SmolLM2-135M's shape, transformers' forward spent more of a
decode step in Python and small ops (module calls, cache objects, masks, 25-odd ops a layer)
than in its seven GEMMs a layer. Here a layer is two norms, three GEMMs (q, k and v fused; gate
and up fused; down) plus the output projection, rotary embedding from a precomputed table and
attention on the KV pool's slots (kv_pool.py). On CPU the weights are prepacked for oneDNN: in
bf16 (on CPUs that do it in hardware: AMX, AVX-512 bf16) that was about 1.6x faster than plain
`linear` at every batch size; in float32 (measured on an AVX2 EPYC) 1.5x at one row and 1.8x
at 16, and a GEMM's row no longer depends on how many rows share it (MKL's `linear` takes
another kernel for one row).

Every pass is packed (packed.py): the running rows' next tokens, then each prompt's tokens. A
prefill is a packed pass with no rows. A peft LoRA adapter the model was loaded with is folded
into the weights it changes, as peft's merge does; adapters chosen per request are added per
token (lora.py), so one pass serves several.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model_store.loader import cpu_has_native_bf16
from model_store.registry import Backend, Quantization
from tasks.engine.batching.kv_pool import KVPool, PassSlots
from tasks.engine.batching.lora import Shapes, StepAdapters
from tasks.engine.batching.packed import PackedStep

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
PACK_BATCH = 16  # the batch size oneDNN lays prepacked weights out for; any size runs


def supports(loaded) -> bool:
    """Whether the loaded model (model_store.loader.LoadedModel) can run on this forward: a
    Llama-family model in transformers, unquantized, whose attention is full at its context."""
    config = _base(loaded.model).config
    return (loaded.backend is Backend.TRANSFORMERS
            and loaded.spec.quantization is Quantization.NONE
            and config.model_type in SUPPORTED_TYPES
            and _full_attention(config, loaded.spec.context_length))


def _full_attention(config, context_length: int) -> bool:
    window = getattr(config, "sliding_window", None)
    return (not window or not getattr(config, "use_sliding_window", True)
            or window >= context_length)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepacks(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's prepacked GEMMs serve this dtype on this device: float32 on any CPU
    oneDNN runs on, bf16 where the CPU has it natively."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (dtype is torch.float32 or dtype is torch.bfloat16 and cpu_has_native_bf16()))


class Linear:
    """One (possibly fused) projection; prepacked for oneDNN where that is faster."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool):
        self.bias, self.prepacked = bias, prepack
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH) if prepack
                       else weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight, with a peft LoRA adapter's update folded in."""
    weight = getattr(linear, "base_layer", linear).weight.detach()
    for adapter in getattr(linear, "active_adapters", ()):
        if adapter in getattr(linear, "lora_A", {}):
            weight = weight + linear.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _bias(linear: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(linear, "base_layer", linear).bias
    return None if bias is None else bias.detach()


def _fused(linears: list[torch.nn.Module], prepack: bool) -> Linear:
    weights, biases = [_weight(linear) for linear in linears], [_bias(linear) for linear in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
    return Linear(torch.cat(weights), bias, prepack)


class _Layer:
    def __init__(self, layer: torch.nn.Module, prepack: bool):
        attention, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused([attention.q_proj, attention.k_proj, attention.v_proj], prepack)
        self.out = _fused([attention.o_proj], prepack)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj], prepack)
        self.down = _fused([mlp.down_proj], prepack)
        self.norm_in = layer.input_layernorm.weight.detach()
        self.norm_post = layer.post_attention_layernorm.weight.detach()


class LlamaForward:
    """The model's weights, fused, and one packed forward pass over them."""

    def __init__(self, loaded, context_length: int):
        model = _base(loaded.model)
        config, inner = model.config, model.model
        self.dtype = inner.embed_tokens.weight.dtype
        prepack = prepacks(self.dtype, loaded.device)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = inner.embed_tokens.weight.detach()
        self.layers = [_Layer(layer, prepack) for layer in inner.layers]
        self.shapes = _projection_shapes(inner.layers[0])
        self.norm = inner.norm.weight.detach()
        self.lm_head = _fused([model.lm_head], prepack)
        self.cos, self.sin = _rotary_table(inner.rotary_emb, self.embed,
                                           max(context_length, config.max_position_embeddings))
        self.scaling = self.head_dim ** -0.5

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                 step: PackedStep, pool: KVPool, slots: PassSlots,
                 adapters: StepAdapters | None = None) -> torch.Tensor:
        """Logits (kept tokens, vocab) of one packed pass: `step.rows` rows' tokens, then its
        prompts'. Every token's keys and values go to its slot in `pool` (`slots`).
        `adapters`: the LoRA adapters its tokens run with."""
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for index, layer in enumerate(self.layers):
            project = _Projector(index, adapters)
            attended = self._attention(index, layer, self._rms(x, layer.norm_in), cos, sin, step,
                                       pool, slots, project)
            x = x + project(layer.out, "out", attended)
            gate, up = project(layer.gate_up, "gate_up",
                               self._rms(x, layer.norm_post)).chunk(2, dim=-1)
            x = x + project(layer.down, "down", F.silu(gate) * up)
        return self.lm_head(self._rms(x[keep], self.norm))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers computes it: in float32, scaled in the model's dtype."""
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def _attention(self, index: int, layer: _Layer, h: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, step: PackedStep, pool: KVPool, slots: PassSlots,
                   project: _Projector) -> torch.Tensor:
        tokens, d = h.shape[0], self.head_dim
        qkv = project(layer.qkv, "qkv", h).view(tokens, self.heads + 2 * self.kv_heads, d)
        # q and k rotate together: half the small ops of rotating each
        qk = _rotate(qkv[:, :self.heads + self.kv_heads], cos, sin)
        q, k, v = qk[:, :self.heads], qk[:, self.heads:], qkv[:, self.heads + self.kv_heads:]
        pool.write(index, slots.written, k, v)
        rows, parts = step.rows, []
        if rows:  # each row's one token attends to its slots, this step's included
            keys, values = pool.gather(index, slots.rows)
            parts.append(self._row_attention(q[:rows], keys, values, slots.row_bias))
        for number, (start, end) in enumerate(step.spans):  # each prompt part, causally
            span = slice(rows + start, rows + end)
            parts.append(self._prompt_attention(q[span], k[span], v[span], pool, index,
                                                slots.contexts[number], step.offsets[number]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _row_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """Each row's one query, (rows, heads, dim), against its keys and values (rows, kv
        heads, columns, dim) → (rows, heads x dim): torch's kernel, but for several rows in bf16
        on CPU, where two batched matmuls and a float32 softmax (as transformers' eager
        attention) take a quarter of its time at 16 rows of one query each."""
        rows = q.shape[0]
        if bias is None or not (q.device.type == "cpu" and q.dtype is torch.bfloat16):
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), keys, values, None if bias is None else bias.to(q.dtype),
                scale=self.scaling, enable_gqa=True)
            return out.reshape(rows, -1)
        grouped = q.view(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.scaling + bias
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(weights, values).reshape(rows, -1)

    def _prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          pool: KVPool, layer: int, context: torch.Tensor | None,
                          offset: int) -> torch.Tensor:
        """A prompt part's attention, (tokens, heads, dim) → (tokens, heads x dim): causal
        over its own tokens, after the `offset` tokens before it (in `context`'s slots, which
        end with the part's own)."""
        q, mask, causal = q.transpose(0, 1).unsqueeze(0), None, True
        if context is None:  # a prompt's first part: its own keys are all it attends to
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        else:
            k, v = pool.gather(layer, context[None])
            tokens = q.shape[2]
            mask = torch.ones(tokens, tokens + offset, dtype=torch.bool,
                              device=q.device).tril(diagonal=offset)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=self.scaling,
                                             enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[2], -1)


class _Projector:
    """A layer's projections of a pass, each with its tokens' adapter updates added."""

    def __init__(self, layer: int, adapters: StepAdapters | None):
        self.layer, self.adapters = layer, adapters

    def __call__(self, linear: Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        y = linear(x)
        return y if self.adapters is None else self.adapters.add(y, x, self.layer, name)


def _projection_shapes(layer: torch.nn.Module) -> Shapes:
    """(in, out) features of each projection a layer's adapters may change (lora.py)."""
    modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {name: (getattr(module, "base_layer", module).in_features,
                   getattr(module, "base_layer", module).out_features)
            for name, module in modules.items() if name.endswith("_proj")}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotary_table(rotary: torch.nn.Module, like: torch.Tensor, positions: int):
    """cos and sin (positions, head dim) from the model's own rotary module, whatever its
    scaling (default, llama3, linear, yarn), in the model's dtype."""
    ids = torch.arange(positions, device=like.device).unsqueeze(0)
    cos, sin = rotary(like[:1].unsqueeze(0), ids)
    return cos[0], sin[0]
