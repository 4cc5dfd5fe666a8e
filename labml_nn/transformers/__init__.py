"""
---
title: Transformers
summary: The Feedback Transformer and the building blocks it shares with an ordinary (causal) transformer.
contents: [feedback/, mha.py, feed_forward.py, pre_norm.py, recency.py, causal.py]
---

# Transformers

* [Feedback Transformer](feedback/index.html): the model this library is about.
* Its building blocks: [preparing queries, keys and values for multi-head attention](mha.html) and the
  [position-wise feed-forward network](feed_forward.html), the [pre-norm residual layer](pre_norm.html) both
  models' layers are made of, and the [preference for recent positions](recency.html) both attentions start with.
* [A causal transformer](causal.html), the parallel baseline it is compared with, built from the same blocks.
"""
