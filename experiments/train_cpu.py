"""
Train the Feedback Transformer (key/value variant) on Tiny Shakespeare in a few minutes on a 2-core CPU.

    python experiments/train_cpu.py                       # the README's CPU recipe
    python experiments/train_cpu.py model=transformer     # any key=value overrides the recipe

It is `python -m labml_nn.transformers.feedback.experiment` with the settings below; progress, losses and
samples print as it trains, and the checkpoint lands in `logs/<model>/<run uuid>/checkpoints/`.
"""

import sys

from labml_nn.transformers.feedback.experiment import main

# A small model, one pass over the data, and a shorter Noam warm-up than the GPU setting's 2,000 steps
CPU_RECIPE = ['model=feedback_transformer_kv', 'd_model=128', 'heads=4', 'd_ff=256', 'n_layers=4', 'seq_len=64',
              'batch_size=32', 'epochs=1', 'inner_iterations=5', 'optimizer.warmup=400', 'num_threads=1']

if __name__ == '__main__':
    main(CPU_RECIPE + sys.argv[1:])
