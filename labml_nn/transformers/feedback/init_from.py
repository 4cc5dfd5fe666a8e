r"""
---
title: Initialize a Feedback Transformer from a pretrained parallel transformer
summary: Copy every compatible weight of a trained causal transformer (embedding, attention, feed-forward, norms,
  head, relative positions) into a Feedback Transformer, and say what was copied and what was not.
---

# Initialization from a parallel transformer

A parallel (causal) transformer trains many times faster than a Feedback Transformer, and the two share almost
all their parts. The paper starts feedback training from a pretrained transformer; here
`init_from=<run uuid | run folder | checkpoint>` does it for a checkpoint of the experiment's `model=transformer`.
The causal baseline (`transformers/causal.py`) is built from the same modules under the same names, so most
weights go across by name:

| feedback parameter | copied from the parallel transformer |
|---|---|
| `src_embed`, `generator`, `transformer.norm` | the same names |
| per layer: norms, `feed_forward`, `attn.query`, `attn.output`, `attn.query_pos_bias` | the same layer |
| per layer (`feedback_transformer`): `attn.key`, `attn.value` | the same layer |
| `transformer.key`, `.value` (`feedback_transformer_kv`, shared) | the **mean** of the layers' keys / values |
| per layer: `attn.key_pos_embeddings`, `attn.key_pos_bias` | the same layer, **shifted by one distance** (below) |
| `transformer.weights` (the memory weights $w$) | nothing: left at initialization |

Layers present in only one of the models are left at initialization (feedback) or unused (transformer).

## Relative positions

Both models keep Transformer-XL style tables indexed by distance, but a causal query also attends to itself
($\Delta = 0 \dots P-1$ in rows $0 \dots P-1$), while a feedback query attends to earlier memory only
($\Delta = 1 \dots P$ in rows $0 \dots P-1$). So feedback row $r$ (distance $r + 1$) takes causal row
$\min(r + 1, P_{causal} - 1)$: every distance keeps its learned embedding, and distances beyond the causal table
take its last row, as the causal model itself does.

## What it does not make equal

A causal layer attends to the previous layer's outputs; a feedback layer attends to the memory, a mixture of
all layers. The copied model is therefore not the same function as the pretrained one: it is a starting point
whose embedding, feed-forward networks, queries and head already know the text. How much that helps is
measured in the [accelerators log](https://github.com/labml-feedback/labml_nn/blob/main/experiments/accelerators_log.md).
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

# How a feedback parameter is made from the checkpoint: a description, the source names, and `make(target)`
Rule = Tuple[str, List[str], Callable[[torch.Tensor], torch.Tensor]]

# The experiment's default model, for checkpoints whose configuration does not name one
_DEFAULT_MODEL = 'feedback_transformer'


def check_source_checkpoint(payload: Dict, init_from: str) -> Dict[str, torch.Tensor]:
    """The model weights of a `model=transformer` training checkpoint; a `ValueError` for any other model."""
    model = payload.get('config', {}).get('model', _DEFAULT_MODEL)
    if model != 'transformer':
        raise ValueError(f"init_from={init_from}: the checkpoint was trained with model={model}; init_from "
                         f"takes a checkpoint of model=transformer (use resume= to continue a feedback run)")
    return payload['model']


def _shifted_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Feedback table row `r` (distance `r + 1`) from causal row `min(r + 1, P - 1)` (distance `r + 1`, clipped)."""
    index = torch.arange(1, rows + 1).clamp_(max=table.shape[0] - 1)
    return table[index]


def _source_rule(name: str, source: Dict[str, torch.Tensor], n_source_layers: int) -> Optional[Rule]:
    """
    Where feedback parameter `name` comes from: `(description, source names, make)` where `make(target)` returns
    the value, or `None` when the transformer has nothing for it.
    """
    if name in ('transformer.key.weight', 'transformer.value.weight'):
        kind = name.split('.')[1]
        names = [f'transformer.layers.{i}.attn.{kind}.linear.weight' for i in range(n_source_layers)]
        if not names or any(n not in source for n in names):
            return None
        return (f'mean of transformer.layers.*.attn.{kind}.linear.weight', names,
                lambda target: torch.stack([source[n] for n in names]).mean(dim=0))
    if name.endswith(('.attn.key_pos_embeddings', '.attn.key_pos_bias')) and name in source:
        return (f'{name} (shifted by one distance)', [name],
                lambda target: _shifted_positions(source[name], target.shape[0]))
    if name in source:
        return name, [name], lambda target: source[name]
    return None


def copy_from_transformer(source: Dict[str, torch.Tensor], target: nn.Module) -> Tuple[List[Tuple[str, str]],
                                                                                   List[str], List[str]]:
    """
    Copy every compatible weight of a causal transformer's `state_dict` `source` into the feedback
    `AutoregressiveModel` `target`, in place.

    Returns `(copied, left, unused)`: `(feedback name, source description)` pairs that were copied, the feedback
    parameters left at initialization, and the transformer's parameters nothing was copied from. A parameter
    whose shape differs raises a `ValueError` naming it and both shapes, before anything is changed.
    """
    n_source_layers = len({k.split('.')[2] for k in source if k.startswith('transformer.layers.')})
    values: Dict[str, torch.Tensor] = {}
    copied: List[Tuple[str, str]] = []
    left: List[str] = []
    used = set()
    for name, param in target.named_parameters():
        rule = _source_rule(name, source, n_source_layers)
        if rule is None:
            left.append(name)
            continue
        description, names, make = rule
        value = make(param)
        if value.shape != param.shape:
            raise ValueError(f"init_from: incompatible shapes for {name}: the feedback model has "
                             f"{list(param.shape)}, the transformer checkpoint's {description} has "
                             f"{list(value.shape)}")
        values[name] = value
        copied.append((name, description))
        used.update(names)
    with torch.no_grad():
        params = dict(target.named_parameters())
        for name, value in values.items():
            params[name].copy_(value)
    unused = [k for k in source if k not in used]
    return copied, left, unused
