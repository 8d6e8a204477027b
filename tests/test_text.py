"""The text side: prompt cleaning and the sentencepiece fallback of the tokenizer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tests.tiny import SENTENCES
from wanpipe.text_tokenizer import WanTextTokenizer, clean_prompt


def test_clean_prompt_matches_the_reference() -> None:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in ["  a  cat\n\twalks ", "fish &amp;amp; chips", "caf\u00c3\u00a9 au lait", "", "x" * 10]:
        assert clean_prompt(text) == prompt_clean(text)


def test_sentencepiece_fallback(tmp_path: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=model,
        vocab_size=60,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = WanTextTokenizer(tmp_path, max_length=12)
    prompts = ["a cat  walks", "the quick brown fox jumps over the lazy dog"]
    out = tok(prompts)
    short = sp.encode(clean_prompt(prompts[0])) + [1]
    assert out.ids[0].tolist() == short + [0] * (12 - len(short))
    assert out.mask[0].tolist() == [True] * len(short) + [False] * (12 - len(short))
    long = sp.encode(clean_prompt(prompts[1]))
    assert len(long) > 11 and out.truncated == [False, True]
    assert out.ids[1].tolist() == long[:11] + [1]  # truncated, the end token kept
    assert out.mask[1].all() and out.ids.dtype == np.int64


def test_offline_tokenizer_is_the_same_in_every_process() -> None:
    """The tiny test models and the demo checkpoint are built on ``train_tokenizer``: it must not change
    from run to run (``tokenizers``' own Unigram trainer did, and with it a test prompt's tokens)."""
    import os
    import subprocess
    import sys

    code = (
        "from tests.tiny import SENTENCES; from wanpipe.demo import train_tokenizer; "
        "t = train_tokenizer(SENTENCES * 10, vocab_size=96); "
        "print(t.to_str()); print(t.encode('worst quality, a cat walks on the grass').ids)"
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
        outputs.add(run.stdout)
    assert len(outputs) == 1
    from wanpipe.demo import train_tokenizer

    tok = train_tokenizer(SENTENCES * 10, vocab_size=96)
    assert tok.get_vocab_size() <= 96 and tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    ids = tok.encode("a cat walks on the grass").ids
    assert ids[-1] == 1 and tok.token_to_id("\u2581cat") in ids  # whole words are pieces, </s> appended
    assert tok.encode("zebra\u00e9").ids.count(tok.token_to_id("<unk>")) >= 1  # unseen characters: <unk>
