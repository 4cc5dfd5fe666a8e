r"""
---
title: Sample text from a trained checkpoint
summary: A command that loads a checkpoint of the Feedback Transformer experiment and continues a prompt with
  cached generation.
---

# Sampling from a checkpoint

```
python -m labml_nn.transformers.feedback.generate checkpoint=<run uuid | run folder | checkpoint file> \
    prompt="It is" tokens=300 temperature=0.8 top_k=10 seed=1
```

Arguments are `key=value`, like the experiment's:

* `checkpoint` (required): what the experiment's `resume=` takes: a checkpoint file, a run folder, or a run
  UUID looked up among labml's runs;
* `prompt`: the text to continue (default `It is`); every character must be in the model's vocabulary;
* `tokens`: how many characters to add (default 200);
* `temperature`: $\tau \ge 0$ (default 1); `0` is greedy decoding;
* `top_k`: sample among the `top_k` most likely characters only (default: all);
* `seed`: seed of the sampler's `torch.Generator` (default 0), so a command prints the same text every time;
* `samples`: how many independent continuations, sampled side by side as one batch (default 1);
* `text_path`: only for checkpoints written before checkpoints stored their vocabulary: the training text,
  which defines the character vocabulary (default: the `text_path` the run was trained with, else
  `$TINY_SHAKESPEARE_PATH`, else labml's data folder).

The checkpoint holds the run's configuration and its vocabulary; the model is rebuilt with the experiment's own
configs and its weights loaded, so any model the experiment trains can be sampled, including the parallel
baseline (with its key/value cache), and no text file is needed. (An older checkpoint without a vocabulary
takes it from the training text, as above; a different text with as many characters would decode to garbage,
which is why checkpoints now carry it.) The text goes to standard output (with several samples, each after a line
`--- sample <i> ---`); progress messages go to standard error. A bad argument, a missing checkpoint or a
prompt character outside the vocabulary stops the command with a message and exit status 2.
"""

import contextlib
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from labml import lab

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.cli import configure_lab, convert, parse_key_values
from labml_nn.tasks.text import Vocabulary, character_tokenizer, load_text, resolve_text_path
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel, check_sampling_args
from labml_nn.transformers.feedback.build import build_model, model_config_of

# The command's keys, with their types and defaults
ARGUMENTS: Dict[str, Any] = {
    'checkpoint': (str, None),
    'prompt': (str, 'It is'),
    'tokens': (int, 200),
    'temperature': (float, 1.0),
    'top_k': (int, None),
    'seed': (int, 0),
    'samples': (int, 1),
    'text_path': (str, None),
}

USAGE = ("Usage: python -m labml_nn.transformers.feedback.generate checkpoint=PATH_OR_UUID [prompt=TEXT] "
         "[tokens=N] [temperature=T] [top_k=K] [seed=S] [samples=N] [text_path=FILE]")


def parse_arguments(argv: List[str]) -> Dict[str, Any]:
    """`key=value` strings to typed values, with the defaults for the keys not given."""
    def convert_one(key: str, raw: str) -> Any:
        if key not in ARGUMENTS:
            raise ValueError(f"unknown argument {f'{key}={raw}'!r}; arguments are key=value with keys "
                             f"{', '.join(ARGUMENTS)}")
        return convert(key, raw, ARGUMENTS[key][0])

    values = {key: default for key, (_, default) in ARGUMENTS.items()}
    values.update(parse_key_values(argv, convert_one, keys=', '.join(ARGUMENTS)))
    if values['checkpoint'] is None:
        raise ValueError("checkpoint= is required: a checkpoint file, a run folder or a run UUID")
    # The sampling arguments as `generate()` checks them, before a checkpoint is read
    check_sampling_args(values['tokens'], values['temperature'], values['top_k'], tokens_name='tokens')
    if values['samples'] < 1:
        raise ValueError(f"samples must be an int >= 1, got {values['samples']}")
    return values


def load_model(checkpoint: str, text_path: Optional[str] = None) -> Tuple[AutoregressiveModel, Vocabulary]:
    """
    Rebuild the model of a training checkpoint from the configuration it stores ([build.py](build.html)) and load
    its weights. Returns `(model, vocabulary)`: the vocabulary stored in the checkpoint, or, for an older checkpoint
    without one, the vocabulary of its training text (`text_path`, else the one it was trained with).
    """
    configure_lab()
    try:
        path = ckpt.find_checkpoint(checkpoint, lab.get_experiments_path())
    except FileNotFoundError as e:
        # The experiment words it for its `resume=` argument
        raise FileNotFoundError(str(e).replace('resume=', 'checkpoint=', 1)) from None
    payload = ckpt.load_checkpoint(path)
    config = payload['config']
    itos = (payload.get('data') or {}).get('itos')
    if itos is None:
        # An older checkpoint: the vocabulary of the text it was trained on
        text = resolve_text_path(text_path or config.get('text_path', ''), lab.get_data_path())
        itos = load_text(text, character_tokenizer).itos
    elif text_path is not None:
        print(f"text_path={text_path} is not used: the checkpoint stores its vocabulary", file=sys.stderr)
    model = build_model(model_config_of(config, len(itos)))
    try:
        model.load_state_dict(payload['model'])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's weights do not fit the model its configuration builds "
                         f"(is text_path the text it was trained on?): {e}") from None
    return model, Vocabulary.of(itos)


def encode_prompt(prompt: str, stoi: Dict[str, int]) -> torch.Tensor:
    """The prompt's token ids `[prompt_len]`; an error names any character outside the vocabulary."""
    if not prompt:
        raise ValueError("prompt must not be empty")
    unknown = sorted(set(prompt) - set(stoi))
    if unknown:
        raise ValueError(f"prompt has characters outside the model's vocabulary: {unknown!r}")
    return torch.tensor([stoi[c] for c in prompt], dtype=torch.long)


def sample_text(model: AutoregressiveModel, itos: List[str], stoi: Dict[str, int], *, prompt: str,
                tokens: int, temperature: float, top_k: Optional[int], seed: int,
                samples: int) -> List[str]:
    """`samples` continuations of `prompt` (each including the prompt) by cached generation."""
    device = model.src_embed.weight.device
    # `[prompt_len, samples]`: the same prompt in every column
    ids = encode_prompt(prompt, stoi)[:, None].expand(-1, samples).to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, tokens, temperature=temperature, top_k=top_k, rng=rng)
    return [''.join(itos[i] for i in column) for column in out.t().tolist()]


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        defaults = ', '.join(f'{k}={v!r}' for k, (_, v) in ARGUMENTS.items() if k != 'checkpoint')
        print(f'{USAGE}\n\nDefaults: {defaults}')
        return 0
    try:
        args = parse_arguments(argv)
        # labml reports its progress on standard output: keep that clean for the text
        with contextlib.redirect_stdout(sys.stderr):
            model, text = load_model(args['checkpoint'], args['text_path'])
        texts = sample_text(model, text.itos, text.stoi, prompt=args['prompt'], tokens=args['tokens'],
                            temperature=args['temperature'], top_k=args['top_k'], seed=args['seed'],
                            samples=args['samples'])
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f'--- sample {i + 1} ---')
        print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
