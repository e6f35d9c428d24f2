"""A Triton kernel of `wattn::WindowAttention3D`: flash attention inside each window (the plugin's implementation).

Same contract as `window_attention.py` (shared/design.md §3): q, k, v `[N, T, H, W, d]` contiguous, N = batch x
heads batch-major, windows `(wt, wh, ww)` (-1 = full extent), optional relative-position bias `[heads, L, L]`.
One program handles BLOCK_M queries of one window and streams that window's keys in BLOCK_N blocks with an online
softmax (running max and sum, float32 accumulators), so no L x L matrix is ever stored. The window partition is
index arithmetic: token l of window w sits at (it*wt + l // (wh*ww), ih*wh + l // ww % wh, iw*ww + l % ww).

Runs on a GPU, or on the CPU under `TRITON_INTERPRET=1` (set before this module is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from walt_export.window_attention import check_inputs


@triton.jit
def _token_offsets(offs, n, it, ih, iw, T, H, W, D, WT, WH, WW):
    """Window-local token indices of window (it, ih, iw) of sample n -> element offsets of their feature 0."""
    t = it * WT + offs // (WH * WW)
    h = ih * WH + (offs // WW) % WH
    x = iw * WW + offs % WW
    return (((n * T + t) * H + h) * W + x) * D


@triton.jit
def _window_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale,
    T, H, W, D, heads,  # grid sizes and head dim
    WT, WH, WW, NH, NW, L,  # window, windows per axis (H, W), window volume
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    window = tl.program_id(0)  # over N * num_windows
    n_win = (T // WT) * NH * NW
    n = window // n_win
    w = window % n_win
    it, ih, iw = w // (NH * NW), (w // NW) % NH, w % NW

    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # query tokens of the window
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q_off = _token_offsets(offs_m, n, it, ih, iw, T, H, W, D, WT, WH, WW)
    mask_m = offs_m < L
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q = (q * scale).to(q.dtype)  # scale on q before q k^T (the contract's order)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        kv_off = _token_offsets(offs_n, n, it, ih, iw, T, H, W, D, WT, WH, WW)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) float32
        if HAS_BIAS:
            head = n % heads
            b_ptrs = bias_ptr + (head * L + offs_m[:, None]) * L + offs_n[None, :]
            s += tl.load(b_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def window_attention_triton(q: Tensor, k: Tensor, v: Tensor, window, scale: float, bias: Tensor | None = None,
                            out: Tensor | None = None, block_m: int = 64, block_n: int = 64) -> Tensor:
    """The op through the Triton kernel; float16 or float32 `[N, T, H, W, d]` tensors (made contiguous).
    `out`: a contiguous buffer of q's shape and dtype to write into (a TensorRT plugin's output)."""
    wt, wh, ww = check_inputs(q, k, v, bias, window)
    q, k, v = (x.contiguous() for x in (q, k, v))
    n, t, h, w, d = q.shape
    length = wt * wh * ww
    block_m = min(block_m, max(16, triton.next_power_of_2(length)))
    block_n = min(block_n, max(16, triton.next_power_of_2(length)))
    out = torch.empty_like(q) if out is None else out
    heads = bias.shape[0] if bias is not None else 1
    bias_arg = bias.to(q.dtype).contiguous() if bias is not None else q  # unused without HAS_BIAS
    grid = (n * (t // wt) * (h // wh) * (w // ww), triton.cdiv(length, block_m))
    _window_attention_kernel[grid](
        q, k, v, bias_arg, out, float(scale), t, h, w, d, heads, wt, wh, ww, h // wh, w // ww, length,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out
