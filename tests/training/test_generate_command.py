"""
The sampling command, `python -m labml_nn.transformers.feedback.generate checkpoint=...`: the text it prints is the
model's greedy continuation (checked against re-running the model for every token), sampling is reproducible, the
checkpoint's vocabulary is enough, and bad arguments are clear errors.
"""

import re

import pytest
import torch
from reference import greedy_by_recomputation
from support import TEXT

from labml_nn.transformers.feedback import generate as cli


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A checkpoint of a tiny Feedback Transformer KV, in the experiment's format (built by its configs)."""
    # The training experiment (another branch until merged) defines the models and the checkpoint format
    configs = pytest.importorskip("labml_nn.transformers.feedback.experiment").Configs
    ckpt = pytest.importorskip("labml_nn.experiments.checkpoint")
    if not TEXT.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {TEXT}; set TINY_SHAKESPEARE_PATH")
    from labml import experiment
    # labml's project folder (and its data folder) in the test's own directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINY_SHAKESPEARE_PATH", str(TEXT))
    config = {"model": "feedback_transformer_kv", "d_model": 16, "heads": 2, "d_ff": 32, "n_layers": 2}
    conf = configs()
    experiment.evaluate()
    experiment.configs(conf, config)
    torch.manual_seed(0)
    model = conf.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / "run" / "checkpoints" / ckpt.CHECKPOINT_NAME
    ckpt.save_atomic({"version": 1, "model": model.state_dict(), "optimizer": {}, "progress": {}, "rng": [],
                      "config": config, "history": {}}, path)
    return path, model.eval(), conf.text


def test_command_greedy_text(checkpoint, capsys):
    path, model, text = checkpoint
    # A run folder works as well as the file
    assert cli.main([f"checkpoint={path.parent.parent}", "prompt=It is", "tokens=25", "temperature=0"]) == 0
    out = capsys.readouterr().out
    expected = greedy_by_recomputation(model, torch.tensor([text.stoi[c] for c in "It is"])[:, None], 25)
    assert out == "".join(text.itos[i] for i in expected[:, 0].tolist()) + "\n"


def test_command_sampling_is_reproducible(checkpoint, capsys):
    path = checkpoint[0]
    args = [f"checkpoint={path}", "prompt=ROMEO:", "tokens=40", "temperature=0.9", "top_k=5", "samples=3"]
    assert cli.main(args + ["seed=3"]) == 0
    first = capsys.readouterr().out
    assert cli.main(args + ["seed=3"]) == 0
    assert capsys.readouterr().out == first
    assert cli.main(args + ["seed=4"]) == 0
    assert capsys.readouterr().out != first
    samples = re.split(r"--- sample \d ---\n", first)
    assert samples[0] == "" and len(samples) == 4
    assert all(s.startswith("ROMEO:") and len(s) == 47 and s.endswith("\n") for s in samples[1:])


def test_command_with_a_tiny_temperature(checkpoint, capsys):
    path = checkpoint[0]
    assert cli.main([f"checkpoint={path}", "tokens=20", "temperature=0"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main([f"checkpoint={path}", "tokens=20", "temperature=1e-46"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.fixture
def checkpoint_with_vocabulary(checkpoint):
    """The same checkpoint as a current training run writes it: with its vocabulary and data."""
    path, model, text = checkpoint
    payload = torch.load(path, weights_only=True)
    payload["data"] = {"path": str(TEXT), "sha256": "", "itos": list(text.itos)}
    torch.save(payload, path)
    return path, model, text


def test_command_needs_no_text_when_the_checkpoint_has_its_vocabulary(checkpoint_with_vocabulary, capsys, monkeypatch,
                                                                      tmp_path):
    path, model, text = checkpoint_with_vocabulary
    # No text anywhere: not in the environment, not in labml's data folder
    monkeypatch.setenv("TINY_SHAKESPEARE_PATH", str(tmp_path / "missing.txt"))
    assert cli.main([f"checkpoint={path}", "prompt=It is", "tokens=25", "temperature=0"]) == 0
    expected = greedy_by_recomputation(model, torch.tensor([text.stoi[c] for c in "It is"])[:, None], 25)
    assert capsys.readouterr().out == "".join(text.itos[i] for i in expected[:, 0].tolist()) + "\n"
    # Another text with as many characters would decode to other characters; the stored vocabulary wins
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(0x3b1 + i) for i in range(len(text.itos))))
    assert cli.main([f"checkpoint={path}", "prompt=It is", "tokens=25", "temperature=0", f"text_path={other}"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(text.itos[i] for i in expected[:, 0].tolist()) + "\n"
    assert "is not used: the checkpoint stores its vocabulary" in captured.err


@pytest.mark.parametrize("args,message", [
    (["prompt=It is"], "checkpoint= is required"),
    (["checkpoint=no_such_run"], "checkpoint=no_such_run: not a checkpoint file"),
    (["checkpoint={path}", "prompt=héllo"], r"prompt has characters outside the model's vocabulary: \['é'\]"),
    (["checkpoint={path}", "prompt="], "prompt must not be empty"),
    (["checkpoint={path}", "tokens=-1"], "tokens must be an int >= 0"),
    (["checkpoint={path}", "tokens=ten"], "tokens must be an int, got 'ten'"),
    (["checkpoint={path}", "temperature=-0.5"], r"temperature must be a finite number >= 0"),
    (["checkpoint={path}", "top_k=0"], "top_k must be (None .*or )?an int >= 1"),
    (["checkpoint={path}", "samples=0"], "samples must be an int >= 1"),
    (["checkpoint={path}", "steps=3"], "unknown argument 'steps=3'"),
])
def test_command_errors(checkpoint, capsys, args, message):
    args = [a.format(path=checkpoint[0]) for a in args]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(message, captured.err), captured.err
