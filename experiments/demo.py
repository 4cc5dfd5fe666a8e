"""
A one-minute look at the Feedback Transformer: build both variants, run a sequence in one call and in chunks,
and check the two agree. Run with `python experiments/demo.py`.
"""

import time

import torch

from labml_nn.transformers.feedback.build import ModelConfig, build_transformer


def build(kind: str) -> torch.nn.Module:
    name = 'feedback_transformer_kv' if kind == 'kv' else 'feedback_transformer'
    return build_transformer(ModelConfig(name, d_model=128, heads=4, d_ff=256, n_layers=4))


def main():
    torch.manual_seed(0)
    x = torch.randn(64, 16, 128)
    for kind in ('weighted', 'kv'):
        model = build(kind)
        start = time.perf_counter()
        out = model(x)
        out.square().mean().backward()
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            first, state = model(x[:40], return_state=True)
            rest, state = model(x[40:], state=state, return_state=True)
            diff = (torch.cat([first, rest]) - out).abs().max().item()
        print(f"{kind:>8}: out {list(out.shape)}, forward+backward {elapsed * 1e3:.0f} ms, "
              f"memory weights {model.memory_weights().detach().numpy().round(3)}, chunked vs full max diff {diff:.1e}")


if __name__ == '__main__':
    main()
