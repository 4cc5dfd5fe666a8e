"""
An independent, naive Feedback Transformer for the tests: no cache, no Stack, no precomputed position terms.
Every step re-stacks the whole memory with `torch.stack` and re-projects it, and scores each memory slot by its
distance written out explicitly. It reads the parameters of a model under test, so outputs and gradients can be
compared.
"""

import torch
import torch.nn.functional as F


def _layer_norm(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention(attn, z, memory, key_w, value_w, span):
    """One query `z` [B, D] over raw memory vectors `memory` (list of [B, D]), naive."""
    t = len(memory)
    lo = 0 if span is None else max(0, t - span)
    heads, d_k = attn.heads, attn.d_k
    batch = z.shape[0]
    q = (z @ attn.query.linear.weight.t()).view(batch, heads, d_k)
    scores, values = [], []
    for j in range(lo, t):
        k_j = (memory[j] @ key_w.t()).view(batch, heads, d_k)
        v_j = (memory[j] @ value_w.t()).view(batch, heads, d_k)
        row = min(t - j, attn.max_distance) - 1
        a = ((q + attn.query_pos_bias) * k_j).sum(-1) + (q * attn.key_pos_embeddings[row]).sum(-1) \
            + attn.key_pos_bias[row]
        scores.append(a / d_k ** 0.5)
        values.append(v_j)
    p = torch.softmax(torch.stack(scores, dim=-1), dim=-1)          # [B, H, n]
    o = (p.unsqueeze(-1) * torch.stack(values, dim=2)).sum(2)       # [B, H, d_k]
    return attn.output(o.reshape(batch, heads * d_k))


def reference_forward(model, x_seq, memory=None, span=None):
    """
    Outputs [T, B, D] of `model` (a FeedbackTransformer or FeedbackTransformerKV, dropout off) for `x_seq`,
    optionally after the raw memory vectors `memory` of earlier steps. Returns (outputs, memory).
    """
    memory = list(memory or [])
    w = torch.softmax(model.weights, dim=0)
    outputs = []
    for t in range(x_seq.shape[0]):
        x = x_seq[t]
        xs = [x]
        for layer in model.layers:
            if memory:
                if hasattr(model, 'key'):
                    key_w, value_w = model.key.weight, model.value.weight
                else:
                    key_w, value_w = layer.attn.key.linear.weight, layer.attn.value.linear.weight
                seen = memory
                if model.memory_norm:
                    # The authors' pre-norm memory: each layer's pre-attention norm, or the shared one (KV)
                    norm = model.norm_memory if hasattr(model, 'key') else layer.norm_self_attn
                    seen = [_layer_norm(m, norm) for m in memory]
                z = _layer_norm(x, layer.norm_self_attn)
                x = x + _attention(layer.attn, z, seen, key_w, value_w, span)
            ff = layer.feed_forward
            x = x + ff.layer2(torch.relu(ff.layer1(_layer_norm(x, layer.norm_ff))))
            xs.append(x)
        memory.append(sum(w[i] * xs[i] for i in range(len(xs))))
        outputs.append(_layer_norm(x, model.norm))
    return torch.stack(outputs), memory
