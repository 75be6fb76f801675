"""InfiniteVL for causal LM: text decoder (SWA + Gated DeltaNet layers) plus the vision tower.

Module paths map onto the checkpoint's legacy names: `model.embed_tokens`, `model.layers.{i}.*`,
`model.norm`, `visual.*`. Logits are tied to `model.embed_tokens.weight`.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backends.base import Backend, GatedNormed, SplitKPartials
from model.batch import BatchMeta
from model.config import LINEAR, ModelConfig, TextConfig
from model.layers import MLP, GatedDeltaNet, RMSNorm, SlidingWindowAttention, mrope_cos_sin
from model.state import StateTensors
from model.vision import VisionTower


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h += mixer(norm(h)); h += mlp(norm(h)). Residual stream in model dtype."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_linear = cfg.layer_types[layer_idx] == LINEAR
        # rank among layers of the same kind: index into the state tensors' first dimension
        kinds = cfg.gdn_layers if self.is_linear else cfg.swa_layers
        self.state_index = kinds.index(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn: nn.Module = GatedDeltaNet(cfg) if self.is_linear else SlidingWindowAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        h: torch.Tensor | SplitKPartials,  # [N, hidden] output of the previous block (or the embeddings)
        residual: torch.Tensor | None,  # [N, hidden] residual stream before h is added; None at layer 0
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: BatchMeta,
        state: StateTensors,
        backend: Backend,
    ) -> tuple[torch.Tensor | SplitKPartials, torch.Tensor]:
        """(mlp output, residual stream before it is added): the sum is this block's output. Deferring
        each residual add into the next norm lets a backend fuse the two (same roundings), and the
        output projections before those norms may leave their split-K sums to them (`partial`)."""
        # the attention kernel may rotate q and k itself (Backend.rope_in_attention)
        late_rope = not self.is_linear and backend.rope_in_attention(meta)
        mixer_in, residual = self.head(h, residual, rope, backend, rotate=not late_rope)
        mid = self.mix(mixer_in, meta, state, backend, gated_norm=True, rope=rope if late_rope else None)
        return self.tail(mid, mixer_in, residual, backend)

    # The block in three parts, so that a caller may run the stateless ones (head, tail) apart from the
    # stateful one (mix), e.g. in CUDA graphs captured for a fixed number of tokens while the mix runs
    # eagerly on the step's own tokens (serving.piecewise_graph). Every part works row by row.

    def head(
        self,
        h: torch.Tensor | SplitKPartials,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: Backend,
        rotate: bool = True,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The input norm (adding h to the residual stream) and the mixer's input projection: (the
        mixer's inputs: (proj,) for Gated DeltaNet, (q, k, v) for attention, q and k rotated unless
        not `rotate` (then `mix` gets the rope tables); the residual stream)."""
        mixer, norm = self.self_attn, self.input_layernorm
        weight = mixer.in_proj_weight if self.is_linear else mixer.qkv_weight
        if weight is not None:  # fused projection: the backend may fold the norm into its GEMM
            bias = None if self.is_linear else mixer.qkv_bias
            proj, residual = backend.norm_linear(h, residual, norm.weight, norm.eps, weight, bias)
            return ((proj,) if self.is_linear else mixer.heads(proj, rope, backend, rotate)), residual
        x, residual = norm.add_forward(h, residual, backend.pointwise)
        if self.is_linear:
            return (mixer.project(x, backend),), residual
        return mixer.project(x, rope, backend, rotate), residual

    def mix(
        self,
        mixer_in: tuple[torch.Tensor, ...],
        meta: BatchMeta,
        state: StateTensors,
        backend: Backend,
        gated_norm: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | GatedNormed:
        """The mixer's stateful part on its inputs from `head`: the delta-rule output [N, H, d_v] or the
        attention output [N, Hq, D]; this layer's pool rows of meta.slot_ids updated. With gated_norm
        a Gated DeltaNet's output may come back through its gated norm already (GatedNormed, which
        `tail` takes as well), where the backend fuses the two. With rope (cos, sin), attention's q
        and k from `head` are not rotated yet."""
        i = self.state_index
        if self.is_linear:
            conv, rec = state.conv[i], state.recurrent[i]
            return self.self_attn.recur(mixer_in[0], meta, conv, rec, backend, gated_norm)
        return self.self_attn.attend(*mixer_in, meta, state.key[i], state.value[i], backend, rope)

    def tail(
        self,
        mid: torch.Tensor | GatedNormed,
        mixer_in: tuple[torch.Tensor, ...],
        residual: torch.Tensor,
        backend: Backend,
    ) -> tuple[torch.Tensor | SplitKPartials, torch.Tensor]:
        """The mixer's output projection (after the gated norm, for Gated DeltaNet, whose output gate
        is in the projection `mixer_in`), the post-attention norm and the MLP: (mlp output, residual)."""
        if self.is_linear:
            a = self.self_attn.finish(mid, mixer_in[0], backend, partial=True)
        else:
            a = self.self_attn.finish(mid, backend, partial=True)
        mlp, norm = self.mlp, self.post_attention_layernorm
        if mlp.gate_up_weight is not None:  # fused gate|up: the norm may go into its GEMM
            act, residual = backend.norm_linear(
                a, residual, norm.weight, norm.eps, mlp.gate_up_weight, silu_mul=True
            )
            return mlp.down(act, backend, partial=True), residual
        x, residual = norm.add_forward(a, residual, backend.pointwise)
        return mlp(x, backend, partial=True), residual


class TextModel(nn.Module):
    """Embedding, decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InfiniteVLForCausalLM(nn.Module):
    """The whole model. `forward` runs one packed varlen batch against the slot pool's state."""

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.model = TextModel(config.text)
        self.visual = VisionTower(config.vision)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def fuse_projections(self) -> None:
        """Fuse each decoder block's input projections into one GEMM (see `model.layers`).

        Call once the weights are in place on their final device and dtype (load_model does);
        idempotent. Parameter names, shapes and the state dict are unchanged: the checkpoint-named
        Linears view the fused tensors, so no weight memory is duplicated.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        self.visual.fuse_projections()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, hidden] in the model dtype."""
        return self.model.embed_tokens(input_ids)

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision tokens [M, hidden] of all entries concatenated (M = sum(t*h*w) / merge**2)."""
        return self.visual.encode(pixel_values, grid_thw, self.backend.pointwise).to(self.dtype)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,  # [N] int64
        image_features: torch.Tensor | None = None,  # [num image pads in input_ids, hidden]
        video_features: torch.Tensor | None = None,  # [num video pads in input_ids, hidden]
    ) -> torch.Tensor:
        """Token embeddings [N, hidden] with vision features written, in order, over the
        `<|image_pad|>` / `<|video_pad|>` rows (spec 6.2 injection); counts must match exactly."""
        h = self.embed(input_ids)
        cfg = self.config.text
        for token_id, feats, kind in (
            (cfg.image_token_id, image_features, "image"),
            (cfg.video_token_id, video_features, "video"),
        ):
            mask = input_ids == token_id
            count = int(mask.sum())
            have = 0 if feats is None else feats.shape[0]
            if have != count:
                raise ValueError(f"{count} {kind} placeholder tokens but {have} {kind} feature rows")
            if count:
                h[mask] = feats.to(device=h.device, dtype=h.dtype)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64 packed new tokens
        positions: torch.Tensor,  # [3, N] int64 M-RoPE (t, h, w) positions
        meta: BatchMeta,
        state: StateTensors,
        inputs_embeds: torch.Tensor | None = None,  # [N, hidden]; replaces embed(input_ids) if given
    ) -> torch.Tensor:
        """Final-norm hidden states [N, hidden] of every packed token; updates `state` in place."""
        if inputs_embeds is None and self.backend.embed_with_rope_tables(meta):
            cfg, table = self.config.text, self.model.embed_tokens.weight
            h, cos, sin = self.backend.pointwise.embed_mrope_cos_sin(
                input_ids, table, positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section
            )
            rope = (cos, sin)
        else:
            h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)
            rope = self.rope_tables(positions, h.dtype)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, rope, meta, state, self.backend)
        return self.final_norm(h, residual)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The M-RoPE cos/sin tables [N, head_dim] in `dtype` of positions [3, N]: the backend's fused op,
        or the plain code."""
        cfg, pw = self.config.text, self.backend.pointwise
        return (mrope_cos_sin if pw is None else pw.mrope_cos_sin)(
            positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype
        )

    def final_norm(self, h: torch.Tensor | SplitKPartials, residual: torch.Tensor | None) -> torch.Tensor:
        """The final RMSNorm of the last block's output h added to the residual stream [N, hidden]."""
        return self.model.norm.add_forward(h, residual, self.backend.pointwise)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, vocab] fp32 from final-norm hidden states [N, hidden] (tied to the embedding):
        the product is rounded to the model dtype, then widened (into `out` when given)."""
        weight = self.model.embed_tokens.weight
        if out is None:
            out = torch.empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32, device=hidden.device)
        return self.backend.linear(hidden, weight, out=out)
