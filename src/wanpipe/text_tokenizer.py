"""The checkpoint's UMT5 tokenizer files (``tokenizer.json`` or ``spiece.model``), read without
transformers, and the reference's prompt cleaning."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex

try:  # the reference cleans prompts with ftfy when it is installed, and so do we
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def clean_prompt(text: str) -> str:
    """The reference's prompt cleaning: ftfy (when installed), HTML unescaping twice, whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class TokenizedText:
    """Token ids and attention masks, padded to ``max_length``: ids (B, L) int64, mask (B, L) bool."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: list[bool]


class WanTextTokenizer:
    """The checkpoint's UMT5 tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, or the
    sentencepiece model (``spiece.model``) when there is no ``tokenizer.json``.

    Encodes like transformers' tokenizer called with ``padding="max_length", truncation=True,
    add_special_tokens=True``: pieces, then the end-of-sequence token, cut to ``max_length``.
    """

    def __init__(self, folder: Path, max_length: int = 512):
        folder = Path(folder)
        self.max_length = max_length
        self._fast = None
        self._sp = None
        config: dict[str, Any] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = folder / name
            if p.is_file():
                config.update(json.loads(p.read_text()))
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._fast.no_padding()
            self._fast.no_truncation()
            pad = _token_text(config.get("pad_token"), "<pad>")
            eos = _token_text(config.get("eos_token"), "</s>")
            self.pad_id = self._fast.token_to_id(pad)
            self.eos_id = self._fast.token_to_id(eos)
            # Does the post-processor append </s> itself? Find out on a probe text.
            probe = self._fast.encode("a", add_special_tokens=True).ids
            self._append_eos = not probe or probe[-1] != self.eos_id
        elif (folder / "spiece.model").is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else 1
            self._append_eos = True
        else:
            raise FileNotFoundError(f"tokenizer: neither tokenizer.json nor spiece.model in {folder}")
        if self.pad_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer: {folder} lacks the pad or end-of-sequence token")

    def _ids(self, text: str) -> list[int]:
        if self._fast is not None:
            ids = list(self._fast.encode(text, add_special_tokens=True).ids)
        else:
            ids = list(self._sp.encode(text))
        if self._append_eos:
            ids.append(self.eos_id)
        return ids

    def __call__(self, prompts: list[str]) -> TokenizedText:
        """Clean, tokenize, truncate and pad ``prompts`` to ``max_length``."""
        n, length = len(prompts), self.max_length
        ids = np.full((n, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, length), dtype=bool)
        truncated = []
        for i, prompt in enumerate(prompts):
            tokens = self._ids(clean_prompt(prompt))
            truncated.append(len(tokens) > length)
            if len(tokens) > length:
                # transformers keeps the special tokens when it truncates: drop pieces, keep </s>.
                tokens = tokens[: length - 1] + [tokens[-1]] if tokens[-1] == self.eos_id else tokens[:length]
            ids[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = True
        return TokenizedText(ids=ids, mask=mask, truncated=truncated)


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value) if value else default
