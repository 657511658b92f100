"""The ``torch`` backend: memory-efficient PyTorch for CPU, and the fallback on GPU.

- Attention: global heads run one fused SDPA-style attention; sparse-dense heads gather each
  group's tokens into a dense batch (groups of equal size share one batch), attend, and
  scatter back — never a masked ``(N, N)`` score matrix. On CPU the per-group attention is
  ATen's fused flash kernel (which returns the log-sum-exp, so the backward needs no
  recompute of the forward); elsewhere it is a row-chunked exact softmax in PyTorch.
- TEAM: closed-form backward from saved per-channel / per-token statistics.
- Soft merge: streamed over token chunks, memory ``O((L + L') * D + chunk * L')``.
- Selection: vectorised over tokens, one loop over the ``K`` greedy steps.

Every op here has an explicit backward, so the public ops run as ``torch.library`` custom ops.
"""
from __future__ import annotations

import torch

from .. import patterns, reference, sdpa
from ..checks import FLOAT_DTYPES
from ..dispatch import OPS, Backend
from ..kernels.limits import NORM_EPS
from ..kernels.limits import accumulation_dtype as acc_dtype


def _rows_per_chunk(chunk_elements: int, rows: int, row_elements: int) -> int:
    return max(1, min(rows, chunk_elements // max(row_elements, 1)))


# --------------------------------------------------------------------------- attention
def chunked_attention_forward(q, k, v, scale, chunk_elements):
    """Exact softmax attention over query-row chunks; returns ``(out, lse)``; ``lse`` in acc dtype."""
    acc = acc_dtype(q.dtype)
    n = q.shape[-2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
    k_t, v_a = k.to(acc).transpose(-1, -2), v.to(acc)
    step = _rows_per_chunk(chunk_elements, n, q.shape[0] * q.shape[1] * k.shape[-2])
    for s in range(0, n, step):
        scores = (q[..., s:s + step, :].to(acc) @ k_t) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        out[..., s:s + step, :] = torch.exp(scores - row_lse[..., None]) @ v_a
        lse[..., s:s + step] = row_lse
    return out, lse


def chunked_attention_backward(grad_out, q, k, v, out, lse, scale, chunk_elements):
    """FlashAttention-2 backward math over query-row chunks: ``P`` recomputed from ``lse``."""
    acc = acc_dtype(q.dtype)
    n = q.shape[-2]
    q_a, k_a, v_a, do_a = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    delta = (do_a * out.to(acc)).sum(-1)                                          # rowsum(dO * O)
    dq = torch.empty_like(q_a)
    dk, dv = torch.zeros_like(k_a), torch.zeros_like(v_a)
    step = _rows_per_chunk(chunk_elements, n, q.shape[0] * q.shape[1] * k.shape[-2])
    for s in range(0, n, step):
        rows = slice(s, s + step)
        p = torch.exp((q_a[..., rows, :] @ k_a.transpose(-1, -2)) * scale - lse[..., rows, None])
        dv += p.transpose(-1, -2) @ do_a[..., rows, :]
        ds = p * (do_a[..., rows, :] @ v_a.transpose(-1, -2) - delta[..., rows, None]) * scale
        dq[..., rows, :] = ds @ k_a
        dk += ds.transpose(-1, -2) @ q_a[..., rows, :]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _gather(x, heads, bucket):
    """``x[:, heads]`` restricted to ``bucket``'s groups, as a contiguous ``(B*count, Hs, size, ...)``."""
    x = x[:, heads]
    if bucket is None:
        return x
    b, hs = x.shape[:2]
    rest = x.shape[3:]
    g = x.index_select(2, bucket.index).view(b, hs, bucket.count, bucket.size, *rest)
    return g.movedim(2, 1).reshape(b * bucket.count, hs, bucket.size, *rest)


def _scatter(dst, heads, bucket, val):
    """Inverse of :func:`_gather`: write ``val`` into ``dst[:, heads]`` at the bucket's tokens."""
    if bucket is None:
        dst[:, heads] = val
        return
    view = dst[:, heads]
    b, hs = view.shape[:2]
    rest = view.shape[3:]
    val = val.view(b, bucket.count, hs, bucket.size, *rest).movedim(1, 2)
    view.index_copy_(2, bucket.index, val.reshape(b, hs, bucket.count * bucket.size, *rest))


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _parts(layout, num_heads, num_global_heads):
    """(head slice, bucket) pairs: global heads in one part, sparse heads once per size bucket."""
    if num_global_heads:
        yield slice(0, num_global_heads), None
    if num_global_heads < num_heads:
        for bucket in layout.buckets:
            yield slice(num_global_heads, num_heads), bucket


class TorchBackend(Backend):
    name = "torch"
    ops = frozenset(OPS)
    devices = frozenset({"cpu", "cuda", "meta"})  # meta: shapes only (FLOP counting), via the fake impls
    dtypes = {"cpu": frozenset(FLOAT_DTYPES), "cuda": frozenset(FLOAT_DTYPES), "meta": frozenset(FLOAT_DTYPES)}

    #: Elements of the largest temporary score tile (``rows x keys`` or ``tokens x L'``).
    chunk_elements = 1 << 22
    #: On CPU, per-group attention uses ATen's fused flash kernel; False selects the row-chunked
    #: path that runs on other devices (the tests use it to exercise that path here).
    fused_cpu_attention = True

    def not_supported_reasons(self, inputs):
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        return reasons

    # ----------------------------------------------------------------------- attention
    def _attention_forward(self, q, k, v, scale):
        if q.device.type == "cpu" and self.fused_cpu_attention:
            # The private kernel (unlike public SDPA) assumes a unit-stride head dim.
            q, k, v = (_unit_stride(t) for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return chunked_attention_forward(q, k, v, scale, self.chunk_elements)

    def _attention_backward(self, grad_out, q, k, v, out, lse, scale):
        if q.device.type == "cpu" and self.fused_cpu_attention:
            grad_out, q, k, v, out = (_unit_stride(t) for t in (grad_out, q, k, v, out))
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
        return chunked_attention_backward(grad_out, q, k, v, out, lse, scale, self.chunk_elements)

    def hsda_forward(self, q, k, v, grid, pattern, num_global_heads, scale):
        """Returns ``(out (B, H, N, d), lse (B, H, N) in acc dtype)``."""
        layout = patterns.layout(pattern, grid, q.device)
        out = sdpa.token_major_empty(q)
        lse = torch.empty(q.shape[:-1], dtype=acc_dtype(q.dtype), device=q.device)
        for heads, bucket in _parts(layout, q.shape[1], num_global_heads):
            o, row_lse = self._attention_forward(*(_gather(t, heads, bucket) for t in (q, k, v)), scale)
            _scatter(out, heads, bucket, o)
            _scatter(lse, heads, bucket, row_lse.to(lse.dtype))
        return out, lse

    def hsda_backward(self, grad_out, q, k, v, out, lse, grid, pattern, num_global_heads, scale):
        layout = patterns.layout(pattern, grid, q.device)
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        for heads, bucket in _parts(layout, q.shape[1], num_global_heads):
            parts = [_gather(t, heads, bucket).contiguous() for t in (grad_out, q, k, v, out, lse)]
            for dst, g in zip(grads, self._attention_backward(*parts, scale)):
                _scatter(dst, heads, bucket, g)
        return tuple(grads)

    # ----------------------------------------------------------------------- TEAM
    # The saved statistics are the column max and sum-exp (and f at full precision), so P is
    # exp(X - max) / sum: in float32, exp(X - lse) would lose about |lse| ulps.
    def feature_summary_forward(self, x):
        """Returns ``(f (B, D), stats (B, 3, D))``: column max, sum-exp and ``f`` in acc dtype."""
        xa = x.to(acc_dtype(x.dtype))
        m = xa.amax(dim=1)
        e = torch.exp(xa - m[:, None])
        z = e.sum(dim=1)
        f = (e * xa).sum(dim=1) / z
        return f.to(x.dtype), torch.stack([m, z, f], dim=1)

    def feature_summary_backward(self, grad_f, x, f, stats):
        """``dX = P * (1 + X - f) * df`` with ``P = exp(X - max) / sum``."""
        xa = x.to(acc_dtype(x.dtype))
        m, z, fa = stats.unbind(1)
        p = torch.exp(xa - m[:, None]).div_(z[:, None])
        dx = (xa - fa[:, None]).add_(1).mul_(p).mul_(grad_f.to(xa.dtype)[:, None])
        return dx.to(x.dtype).contiguous()  # the fake impl promises contiguous

    def team_gate_forward(self, x, h):
        """Returns ``(y, s)``: the gated tokens and ``s``, the token softmax the backward reads."""
        acc = acc_dtype(x.dtype)
        xp = torch.sigmoid(h.to(acc))[:, None, :] * x.to(acc)
        q = torch.softmax(xp, dim=-1)                                            # over channels
        s = torch.softmax((q * xp).sum(dim=-1), dim=-1)                          # over tokens, of s0
        return xp.mul_(s[..., None]).to(x.dtype).contiguous(), s

    def team_gate_backward(self, grad_y, x, h, s):
        acc = acc_dtype(x.dtype)
        xa, dy = x.to(acc), grad_y.to(acc)
        g = torch.sigmoid(h.to(acc))
        xp = g[:, None, :] * xa
        q = torch.softmax(xp, dim=-1)                                            # over channels
        s0 = (q * xp).sum(-1, keepdim=True)
        ds = (dy * xp).sum(-1)                                                   # dL/ds
        ds0 = s * (ds - (s * ds).sum(-1, keepdim=True))                          # through softmax over tokens
        # dX' = s dY + ds0 * Q * (1 + X' - s0): the direct path and the path through s0.
        dxp = (xp - s0).add_(1).mul_(q).mul_(ds0[..., None]).addcmul_(s[..., None], dy)
        dg = (dxp * xa).sum(1)
        dx = dxp.mul_(g[:, None, :]).to(x.dtype).contiguous()
        return dx, (dg * g * (1 - g)).to(h.dtype).contiguous()

    # ----------------------------------------------------------------------- STTM
    def orthogonal_select(self, x, k, start):
        xh = x.to(acc_dtype(x.dtype))
        xh = xh / xh.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        b, length, _ = xh.shape
        rows = torch.arange(b, device=x.device)
        chosen = torch.empty(b, k, dtype=torch.long, device=x.device)
        taken = torch.zeros(b, length, dtype=torch.bool, device=x.device)
        worst = torch.zeros(b, length, dtype=xh.dtype, device=x.device)
        cur = start.long()
        chosen[:, 0] = cur
        for i in range(1, k):
            taken[rows, cur] = True
            cos = torch.bmm(xh, xh[rows, cur][:, :, None]).squeeze(-1).abs()
            worst = torch.maximum(worst, cos)
            cur = worst.masked_fill(taken, float("inf")).argmin(dim=-1)           # first minimum: lowest index
            chosen[:, i] = cur
        return chosen

    def soft_merge_forward(self, u, idx, x, e, tau):
        """One streamed pass. ``C1`` lies in [0, 1], so the token-axis softmax needs no running
        max: ``W = exp(C1)`` is in [1, e]. Returns ``(A, P, row_lse (B, L), col_sum (B, L'))``."""
        acc = acc_dtype(x.dtype)
        b, length, du = u.shape
        lp = idx.shape[1]
        meta = torch.gather(u, 1, idx[:, :, None].expand(b, lp, du)).to(acc)
        col_sum = torch.zeros(b, lp, dtype=acc, device=x.device)
        a = torch.zeros(b, lp, x.shape[-1], dtype=acc, device=x.device)
        p = torch.zeros_like(a)
        row_lse = torch.empty(b, length, dtype=acc, device=x.device)
        step = _rows_per_chunk(self.chunk_elements, length, b * lp)
        for s in range(0, length, step):
            rows = slice(s, s + step)
            scores = u[:, rows].to(acc) @ meta.transpose(1, 2) / tau               # (B, c, L')
            lse = torch.logsumexp(scores, dim=-1)
            w = torch.exp(torch.exp(scores - lse[..., None]))                      # exp(C1)
            col_sum += w.sum(1)
            a += w.transpose(1, 2) @ x[:, rows].to(acc)
            p += w.transpose(1, 2) @ e[:, rows].to(acc)
            row_lse[:, rows] = lse
        a /= col_sum[..., None]
        p /= col_sum[..., None]
        return a.to(x.dtype), p.to(e.dtype), row_lse, col_sum

    def soft_merge_backward(self, grad_a, grad_p, u, idx, x, e, a, p, row_lse, col_sum, tau):
        acc = acc_dtype(x.dtype)
        b, length, du = u.shape
        lp = idx.shape[1]
        meta = torch.gather(u, 1, idx[:, :, None].expand(b, lp, du)).to(acc)
        da, dp = grad_a.to(acc), grad_p.to(acc)
        # sum_n C[n,j] dC[n,j] = dA[j].A[j] + dP[j].P[j], since A = C^T X and P = C^T E.
        col_dot = (da * a.to(acc)).sum(-1) + (dp * p.to(acc)).sum(-1)               # (B, L')
        du_all = torch.empty(b, length, du, dtype=acc, device=x.device)
        dx = torch.empty(x.shape, dtype=acc, device=x.device)
        de = torch.empty(b, length, e.shape[-1], dtype=acc, device=x.device)
        dmeta = torch.zeros_like(meta)
        step = _rows_per_chunk(self.chunk_elements, length, b * lp)
        for s in range(0, length, step):
            rows = slice(s, s + step)
            u_c, x_c, e_c = u[:, rows].to(acc), x[:, rows].to(acc), e[:, rows].to(acc)
            c1 = torch.exp(u_c @ meta.transpose(1, 2) / tau - row_lse[:, rows, None])
            c = torch.exp(c1) / col_sum[:, None, :]
            dx[:, rows] = c @ da
            de[:, rows] = c @ dp
            dc1 = c * (x_c @ da.transpose(1, 2) + e_c @ dp.transpose(1, 2) - col_dot[:, None, :])
            ds = c1 * (dc1 - (c1 * dc1).sum(-1, keepdim=True)) / tau
            du_all[:, rows] = ds @ meta
            dmeta += ds.transpose(1, 2) @ u_c
        du_all.scatter_add_(1, idx[:, :, None].expand(b, lp, du), dmeta)
        return du_all.to(u.dtype), dx.to(x.dtype), de.to(e.dtype)

    # ----------------------------------------------------------------------- classifier pooling
    @staticmethod
    def group_mean(x, grid, pattern="checkerboard", num_groups=None):
        """The reference's normalised one-hot product, accumulated in float32: a float16 sum of
        ~800 tokens overflows, and a token-by-token ``index_add`` loses precision."""
        return reference.group_mean(x.to(acc_dtype(x.dtype)), grid, pattern, num_groups).to(x.dtype)
