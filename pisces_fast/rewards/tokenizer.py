"""A word-level BERT tokenizer for small closed vocabularies (the embedded shapes world, tests).

It is a real ``transformers.BertTokenizerFast`` built from a vocabulary list, so a model trained
with it can later swap in a pretrained WordPiece tokenizer (InternVideo2 and BLIP both use BERT
tokenizers) without code changes: ``[CLS] w1 … wn [SEP]`` then ``[PAD]``; unknown words → ``[UNK]``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Tuple

SPECIAL_TOKENS: Tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BERT's pre-tokenizer splits punctuation into tokens of its own; give the common ones ids.
DEFAULT_PUNCTUATION: Tuple[str, ...] = (",", ".", "!", "?", "'", "-")


def build_word_tokenizer(
    words: Iterable[str],
    *,
    lowercase: bool = True,
    max_length: int = 32,
    punctuation: Iterable[str] = DEFAULT_PUNCTUATION,
):
    """A ``BertTokenizerFast`` whose vocabulary is the special tokens, ``punctuation`` and ``words``.

    Ids: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``, then punctuation, then the words in the
    given order (duplicates dropped). Words must be alphanumeric or one punctuation character
    (BERT's pre-tokenizer would split anything else). ``max_length`` becomes ``model_max_length``.

    Save it with ``tokenizer.save_pretrained(dir)``; reload with ``BertTokenizerFast.from_pretrained(dir)``.
    """
    from transformers import BertTokenizerFast

    if isinstance(words, str):
        raise TypeError("words must be an iterable of strings (a vocabulary list), not a single str")
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for p in punctuation:
        if p not in seen:
            vocab.append(p)
            seen.add(p)
    n_words = 0
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w:
            raise ValueError(f"words[{i}] must be a non-empty str, got {w!r}")
        if not (w.isalnum() or (len(w) == 1 and not w.isspace())):
            raise ValueError(
                f"words[{i}]={w!r} must be alphanumeric or a single punctuation character: BERT's pre-tokenizer would split it"
            )
        w = w.lower() if lowercase else w
        if w in seen:
            continue
        vocab.append(w)
        seen.add(w)
        n_words += 1
    if n_words == 0:
        raise ValueError("words must contain at least one word")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3 ([CLS], a word, [SEP]), got {max_length!r}")
    ids = {tok: i for i, tok in enumerate(vocab)}
    common = dict(do_lower_case=lowercase, model_max_length=max_length, tokenize_chinese_chars=False, strip_accents=False)
    # transformers 5.x builds the WordPiece model from a ``vocab`` dict; 4.x reads a vocab file.
    tokenizer = BertTokenizerFast(vocab=ids, **common)
    if len(tokenizer) != len(vocab):
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.txt"
            vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
            tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), **common)
    if len(tokenizer) != len(vocab) or tokenizer.convert_tokens_to_ids(vocab[-1]) != len(vocab) - 1:
        raise RuntimeError("could not build a BertTokenizerFast from the vocabulary (unsupported transformers version?)")
    return tokenizer
