"""Fused elementwise kernels of the decoder block: one launch where the plain-PyTorch code needs several.

Each kernel reproduces the torch backend's roundings (spec 4.2-4.7): where the reference rounds an
intermediate to the model dtype, the kernel rounds it too, so the two agree to the last bit up to the
order of a reduction. Rows may be strided (column slices of a fused projection); the last dimension
must have unit stride.

- `rms_norm`: optional residual add (rounded to the model dtype: the new residual stream), RMS over the
  row in fp32, cast to the model dtype, times the weight. Its input may be a projection's split-K
  partial sums, which it adds up as the GEMM's own reduction kernel would (one launch less).
- `gated_rms_norm`: per-head RMSNorm of the delta-rule output times an fp32 weight and silu(z), all in
  fp32, rounded once.
- `silu_mul`: silu(gate) rounded, times up, for the MLP's [N, 2 I] gate|up projection.
- `gdn_gates`: g = -exp(A_log) softplus(a + dt_bias) (fp32) and beta = sigmoid(b), from the a and b
  columns of the GDN projection.
- `rope_`: half-split rotary embedding applied in place to the q|k heads of the SWA projection.
- `rope_fp32_`: the vision tower's rotary embedding (transformers' `apply_rotary_pos_emb_vision`): fp32
  math on fp32 cos/sin, rounded once; any even head dim (80 in the release), in place.
- `mrope_cos_sin`: the M-RoPE cos/sin tables of a batch from its position triples in one launch (the
  plain code takes about a dozen small kernels at the head of every decode step).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from model.backends.base import SplitKPartials
from model.backends.triton_kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, D, stride_x, stride_split, stride_res, stride_y, stride_ro,
    eps, HAS_RESIDUAL: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    dt = y_ptr.dtype.element_ty  # the model dtype
    if SPLITS > 0:  # x: fp32 split-K partial sums, added in split order and rounded once (as decode_gemm)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(x_ptr + s * stride_split + row * stride_x + offs, mask=mask, other=0.0)
        x = acc.to(dt)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)  # the residual stream
    if HAS_RESIDUAL or SPLITS > 0:
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf) / D + eps)
    normed = (xf * inv).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (normed * w).to(dt), mask=mask)


def rms_norm(
    x: torch.Tensor | SplitKPartials, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(s) * weight, s) with s = x + residual (or x): x, residual [N, D] model dtype. x may be
    a product's split-K partials (decode_gemm with reduce=False): the kernel adds them up first, so
    the reduction costs no launch of its own."""
    splits = 0
    if isinstance(x, SplitKPartials):
        splits, n, d = x.partials.shape
        dtype, x = x.dtype, x.partials
    else:
        (n, d), dtype = x.shape, x.dtype
    _check_unit_stride(x, residual)
    y = torch.empty((n, d), dtype=dtype, device=x.device)
    own_stream = residual is not None or splits > 0  # s is a new tensor (else x itself)
    res_out = torch.empty((n, d), dtype=dtype, device=x.device) if own_stream else x
    res = residual if residual is not None else y  # not read without a residual
    if n:
        _rms_norm_kernel[(n,)](
            x, res, weight, y, res_out, d, x.stride(-2), x.stride(0) if splits else 0, res.stride(0),
            y.stride(0), res_out.stride(0), eps, HAS_RESIDUAL=residual is not None, SPLITS=splits,
            BLOCK_D=triton.next_power_of_2(d), num_warps=_warps(d), **pdl.launch_kwargs(),
        )  # fmt: skip
    return y, res_out


@triton.jit
def gated_norm_math(o, z, w, eps, DV):
    """The GDN gated output norm in fp32 over the last axis of o and z (DV wide), w [DV] fp32:
    rmsnorm(o) * w * silu(z). Every kernel that applies the norm uses this, so their roundings agree."""
    inv = 1.0 / tl.sqrt(tl.sum(o * o, axis=len(o.shape) - 1, keep_dims=True) / DV + eps)
    return o * inv * w * (z / (1.0 + tl.exp(-z)))


@triton.jit
def _gated_rms_norm_kernel(
    o_ptr, z_ptr, w_ptr, y_ptr, H, DV, stride_o, stride_oh, stride_z, stride_y, eps,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_v = tl.arange(0, BLOCK_V)
    mask = (offs_h[:, None] < H) & (offs_v[None, :] < DV)
    o = tl.load(o_ptr + row * stride_o + offs_h[:, None] * stride_oh + offs_v[None, :], mask=mask, other=0.0)
    col = offs_h[:, None] * DV + offs_v[None, :]  # z and y are [N, H * DV] rows
    z = tl.load(z_ptr + row * stride_z + col, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_v, mask=offs_v < DV, other=0.0).to(tl.float32)
    y = gated_norm_math(o.to(tl.float32), z, w, eps, DV)
    tl.store(y_ptr + row * stride_y + col, y.to(y_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(o) * weight * silu(z) per head: o [N, H, d_v], z [N, H * d_v], weight [d_v] fp32.
    Returns [N, H * d_v] in o's dtype."""
    n, h, dv = o.shape
    if o.stride(2) != 1 or z.stride(1) != 1:
        raise ValueError("gated_rms_norm expects unit stride on the value dim")
    y = torch.empty((n, h * dv), dtype=o.dtype, device=o.device)
    if n:
        _gated_rms_norm_kernel[(n,)](
            o, z, weight, y, h, dv, o.stride(0), o.stride(1), z.stride(0), y.stride(0), eps,
            BLOCK_H=triton.next_power_of_2(h), BLOCK_V=triton.next_power_of_2(dv), num_warps=_warps(h * dv),
            **pdl.launch_kwargs(),
        )  # fmt: skip
    return y


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, INTER, stride_x, stride_y, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32)  # silu rounded first
    tl.store(y_ptr + row * stride_y + offs, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [N, 2 I] (gate columns first); returns [N, I]."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    _check_unit_stride(gate_up, None)
    y = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if n:
        grid = (n, triton.cdiv(inter, block))
        _silu_mul_kernel[grid](
            gate_up, y, inter, gate_up.stride(0), y.stride(0), BLOCK=block, num_warps=4, **pdl.launch_kwargs()
        )
    return y


@triton.jit
def gate_math(a, b, dt_bias, neg_exp_a):
    """(g, beta) in fp32 from fp32 a, b: -exp(A_log) softplus(a + dt_bias) (torch's threshold 20) and
    sigmoid(b); shared by the gates kernel and the delta-rule kernel that computes its own gates."""
    x = a + dt_bias
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return softplus * neg_exp_a, 1.0 / (1.0 + tl.exp(-b))


@triton.jit
def _gdn_gates_kernel(
    a_ptr, b_ptr, neg_exp_a_ptr, dt_bias_ptr, g_ptr, beta_ptr, N, H, stride_a, stride_b,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < N) & (offs_h[None, :] < H)
    rows64 = rows.to(tl.int64)
    a = tl.load(a_ptr + rows64[:, None] * stride_a + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows64[:, None] * stride_b + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_bias_ptr + offs_h, mask=offs_h < H, other=0.0)
    nea = tl.load(neg_exp_a_ptr + offs_h, mask=offs_h < H, other=0.0)
    g, beta = gate_math(a, b, dt[None, :], nea[None, :])
    out = rows64[:, None] * H + offs_h[None, :]
    tl.store(g_ptr + out, g, mask=mask)
    tl.store(beta_ptr + out, beta.to(beta_ptr.dtype.element_ty), mask=mask)


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, neg_exp_a: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [N, H] fp32, beta [N, H] b's dtype) from a, b [N, H] (any row stride); constants fp32 [H]."""
    n, h = a.shape
    _check_unit_stride(a, b)
    g = torch.empty((n, h), dtype=torch.float32, device=a.device)
    beta = torch.empty((n, h), dtype=b.dtype, device=b.device)
    block_h = triton.next_power_of_2(h)
    block_n = max(1, 1024 // block_h)
    if n:
        _gdn_gates_kernel[(triton.cdiv(n, block_n),)](
            a, b, neg_exp_a, dt_bias, g, beta, n, h, a.stride(0), b.stride(0),
            BLOCK_N=block_n, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    return g, beta


@triton.jit
def rope_halves(x_ptrs, mask, cos_row, sin_row, HALF: tl.constexpr):
    """RoPE of the vectors whose first halves x_ptrs [..., HALF] point at (the second halves lie HALF
    further) with one token's cos/sin rows (the same angles in both halves: rotate_half pairs d with
    d + HALF): x * cos + rotate_half(x) * sin in fp32, each product rounded to the model dtype as the
    reference does. Returns the (first, second) halves in the model dtype."""
    dt = x_ptrs.dtype.element_ty
    offs = tl.arange(0, HALF)
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_row + offs).to(tl.float32)
    c2 = tl.load(cos_row + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_row + offs).to(tl.float32)
    s2 = tl.load(sin_row + HALF + offs).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    return y1.to(dt), y2.to(dt)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, NH, stride_x, stride_xh, stride_c, stride_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = offs_h[:, None] < NH
    p1 = x_ptr + row * stride_x + offs_h[:, None] * stride_xh + offs_d[None, :]
    y1, y2 = rope_halves(p1, mask, cos_ptr + row * stride_c, sin_ptr + row * stride_s, HALF)
    tl.store(p1, y1, mask=mask)
    tl.store(p1 + HALF, y2, mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] (unit stride on D) in place with cos/sin [N, D]; returns x."""
    n, nh, d = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or d & (d - 1):
        raise ValueError("rope_ expects unit stride on D and a power-of-two head dim")
    if n:
        _rope_kernel[(n,)](
            x, cos, sin, nh, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HALF=d // 2, BLOCK_H=triton.next_power_of_2(nh), num_warps=4,
            **pdl.launch_kwargs(),
        )  # fmt: skip
    return x


@triton.jit
def _rope_fp32_kernel(
    x_ptr, cos_ptr, sin_ptr, NH, stride_x, stride_xh, stride_c, stride_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    md = offs_d < HALF
    mask = (offs_h[:, None] < NH) & md[None, :]
    p1 = x_ptr + row * stride_x + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + row * stride_c + offs_d, mask=md, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + row * stride_c + HALF + offs_d, mask=md, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + row * stride_s + offs_d, mask=md, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + row * stride_s + HALF + offs_d, mask=md, other=0.0)[None, :]
    # x * cos + rotate_half(x) * sin in fp32, rounded once to x's dtype
    dt = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * c1 - x2 * s1).to(dt), mask=mask)
    tl.store(p1 + HALF, (x2 * c2 + x1 * s2).to(dt), mask=mask)


def rope_fp32_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] (unit stride on D, any even D) in place with fp32 cos/sin [N, D]; returns x."""
    n, nh, d = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or d % 2:
        raise ValueError("rope_fp32_ expects unit stride on D and an even head dim")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("rope_fp32_ expects fp32 cos and sin")
    if n:
        _rope_fp32_kernel[(n,)](
            x, cos, sin, nh, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HALF=d // 2, BLOCK_H=triton.next_power_of_2(nh), BLOCK_HALF=triton.next_power_of_2(d // 2),
            num_warps=4,
        )  # fmt: skip
    return x


def _check_unit_stride(x: torch.Tensor, other: torch.Tensor | None) -> None:
    if x.stride(-1) != 1 or (other is not None and other.stride(-1) != 1):
        raise ValueError("expected unit stride on the last dim")


def _warps(num_elements: int) -> int:
    return 8 if num_elements >= 4096 else 4 if num_elements >= 1024 else 2


if os.environ.get("TRITON_INTERPRET") == "1":  # numpy's float32 cos/sin

    @triton.jit
    def _cos_sin(x):
        return tl.cos(x), tl.sin(x)

else:  # CUDA's cosf/sinf, as torch's cos/sin kernels compute them (tl.cos may lower to an approximation)
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _cos_sin(x):
        return libdevice.cos(x), libdevice.sin(x)


@triton.jit
def _mrope_cos_sin_kernel(
    pos_ptr, inv_ptr, cos_ptr, sin_ptr, ids_ptr, table_ptr, h_ptr, N, NRB, HIDDEN,
    stride_p, stride_c, stride_s, stride_t, stride_h,
    S0: tl.constexpr, S01: tl.constexpr, HALF: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr, EMBED: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # programs 0 .. NRB-1: BLOCK_R rows of the tables each; with EMBED, program NRB + i gathers the
    # embedding row of token i (table[ids[i]] into h[i])
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    if EMBED:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if pid >= NRB:
            i = (pid - NRB).to(tl.int64)
            src = table_ptr + tl.load(ids_ptr + i).to(tl.int64) * stride_t
            for c in range(0, HIDDEN, BLOCK_H):
                offs = c + tl.arange(0, BLOCK_H)
                mh = offs < HIDDEN
                tl.store(h_ptr + i * stride_h + offs, tl.load(src + offs, mask=mh), mask=mh)
            return
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.arange(0, BLOCK_F)
    mr = rows < N
    mf = f < HALF
    pt = tl.load(pos_ptr + rows, mask=mr, other=0)[:, None]
    ph = tl.load(pos_ptr + stride_p + rows, mask=mr, other=0)[:, None]
    pw = tl.load(pos_ptr + 2 * stride_p + rows, mask=mr, other=0)[:, None]
    # frequency slot f takes its position from axis t, h or w by contiguous sections
    pos = tl.where(f[None, :] < S0, pt, tl.where(f[None, :] < S01, ph, pw)).to(tl.float32)
    angle = pos * tl.load(inv_ptr + f, mask=mf, other=0.0)[None, :]
    c, s = _cos_sin(angle)
    dt = cos_ptr.dtype.element_ty
    c = c.to(dt)
    s = s.to(dt)
    mask = mr[:, None] & mf[None, :]
    pc = cos_ptr + rows[:, None].to(tl.int64) * stride_c + f[None, :]
    ps = sin_ptr + rows[:, None].to(tl.int64) * stride_s + f[None, :]
    tl.store(pc, c, mask=mask)  # both halves hold the same angles (rotate_half pairs f with f + HALF)
    tl.store(pc + HALF, c, mask=mask)
    tl.store(ps, s, mask=mask)
    tl.store(ps + HALF, s, mask=mask)


def mrope_cos_sin(
    positions: torch.Tensor,  # [3, N] int64 (t, h, w), unit stride on N
    inv_freq: torch.Tensor,  # [head_dim / 2] fp32, as model.layers.mrope_cos_sin computes it
    mrope_section: tuple[int, ...],
    dtype: torch.dtype,
    embed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """cos/sin [N, head_dim] in `dtype`: model.layers.mrope_cos_sin in one launch (fp32 angles, the
    same cos/sin, rounded once). With embed (ids [N], table [V, hidden] with unit stride on hidden),
    the same launch also gathers the embeddings: (cos, sin, table[ids])."""
    half = inv_freq.shape[0]
    if positions.dim() != 2 or positions.shape[0] != 3 or positions.stride(1) != 1:
        raise ValueError("mrope_cos_sin expects positions [3, N] with unit stride on N")
    if len(mrope_section) != 3 or sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must be three sections summing to {half}")
    n = positions.shape[1]
    cos = torch.empty((n, 2 * half), dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if embed is not None:
        ids, table = embed
        if ids.shape != (n,) or table.dim() != 2 or table.stride(1) != 1:
            raise ValueError(f"embed expects ids [{n}] and a table [V, hidden] with unit stride on hidden")
        h = torch.empty((n, table.shape[1]), dtype=table.dtype, device=table.device)
    else:
        ids, table = positions, cos  # placeholders
        h = cos
    block_r = 16
    nrb = triton.cdiv(n, block_r)
    if n:
        _mrope_cos_sin_kernel[(nrb + (n if embed is not None else 0),)](
            positions, inv_freq, cos, sin, ids, table, h, n, nrb, h.shape[1],
            positions.stride(0), cos.stride(0), sin.stride(0), table.stride(0), h.stride(0),
            S0=mrope_section[0], S01=mrope_section[0] + mrope_section[1], HALF=half,
            BLOCK_F=triton.next_power_of_2(half), BLOCK_R=block_r, EMBED=embed is not None,
            BLOCK_H=min(4096, triton.next_power_of_2(h.shape[1])), num_warps=4, **pdl.launch_kwargs(),
        )  # fmt: skip
    return (cos, sin) if embed is None else (cos, sin, h)
