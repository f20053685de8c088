"""The Hugging Face tokenizer files of a SentencePiece BPE tokenizer (Mixtral's), as the real Mixtral
repositories ship them, so that `transformers.AutoTokenizer` on a checkpoint folder gives exactly the
ids mixserve's tokenizer gives (BOS included): tokenizer.json (the BPE vocabulary and merges with
byte fallback, SentencePiece's whitespace rules as normalizers), tokenizer_config.json,
special_tokens_map.json. Written with SentencePiece alone: no transformers or tokenizers needed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

SPECIAL = ("<unk>", "<s>", "</s>")


def _merges(pieces: list[str], scores: list[float]) -> list[list[str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces
    of the vocabulary is a merge, ranked by the merged piece's score (SentencePiece merges the pair
    whose result scores highest first), ties by the ids of its halves (transformers' extractor)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    found = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], vocab[left], vocab[right], left, right))
    found.sort()
    return [[left, right] for *_, left, right in found]


def tokenizer_files(sp_model: str | Path, max_len: int) -> dict[str, str]:
    """name -> text of the three files, from a SentencePiece model file."""
    return dict(_files(str(sp_model), max_len))


@functools.lru_cache(maxsize=4)  # checkpoints written by one process share the tokenizer (~1 s to derive)
def _files(sp_model: str, max_len: int) -> tuple[tuple[str, str], ...]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    special = {t: pieces.index(t) for t in SPECIAL}
    added = [
        {
            "id": special[t],
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t in SPECIAL
    ]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [special["<s>"]], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": _merges(pieces, scores),
        },
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_len,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        # mixserve's tokenizer encodes "<s>" or "</s>" inside a text as text, never as control tokens
        "split_special_tokens": True,
        # tokenizer.json as it is: transformers 5's Llama class rebuilds its own pipeline, whose
        # Metaspace drops a leading space that SentencePiece keeps
        "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False,
    }
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    files = {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": specials}
    return tuple((name, json.dumps(c, indent=1, ensure_ascii=False) + "\n") for name, c in files.items())


def write_tokenizer_files(folder: str | Path, sp_model: str | Path, max_len: int) -> None:
    for name, text in tokenizer_files(sp_model, max_len).items():
        (Path(folder) / name).write_text(text, encoding="utf-8")
