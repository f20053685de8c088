"""Tokenizer: SentencePiece through mistral-common, Mixtral-Instruct chat, streaming detokenisation.

`tokenizer.model` in the checkpoint folder wins; otherwise the Mixtral v1 SentencePiece model that
mistral-common ships (vocab 32000, bos 1, eos 2) is used.
"""

from __future__ import annotations

from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

DEFAULT_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
ROLES = {"system": SystemMessage, "developer": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


class ChatFormatError(ValueError):
    """Chat messages that the Mixtral-Instruct format cannot encode."""


class TokenizeError(ValueError):
    """Text that cannot be tokenised (not valid Unicode: a lone UTF-16 surrogate)."""


def check_text(text: str, what: str = "text") -> None:
    """Refuse strings that are not valid Unicode (JSON can carry a lone surrogate such as \\ud800,
    which has no UTF-8 form; SentencePiece fails on it with an opaque error)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizeError(f"{what} is not valid Unicode: {e.reason} at position {e.start}") from None


def tokenizer_path(model_dir: str | Path | None) -> Path:
    if model_dir is not None:
        p = Path(model_dir) / "tokenizer.model"
        if p.is_file():
            return p
    return DEFAULT_TOKENIZER


class VocabMismatchError(ValueError):
    """A tokenizer with more tokens than the model's embedding has rows."""


def check_vocab(tok: Tokenizer, vocab_size: int, config: str | Path) -> None:
    """The tokenizer's ids must be < the config's `vocab_size`. A model may pad its vocabulary (more
    rows than tokens), so a smaller tokenizer is fine; a larger one would index past the embedding."""
    if tok.vocab_size > vocab_size:
        raise VocabMismatchError(
            f"{tok.path}: the tokenizer has {tok.vocab_size} tokens, more than vocab_size={vocab_size} "
            f"in {config}; the model has no embedding rows for ids {vocab_size}..{tok.vocab_size - 1}"
        )


class Tokenizer:
    def __init__(self, path: str | Path = DEFAULT_TOKENIZER):
        self.path = Path(path)
        self.mistral = MistralTokenizer.from_file(str(self.path))
        self.sp = self.mistral.instruct_tokenizer.tokenizer
        self.vocab_size: int = self.sp.n_words
        self.bos_id: int = self.sp.bos_id
        self.eos_id: int = self.sp.eos_id

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> Tokenizer:
        """The checkpoint's tokenizer (or the default one), checked against its config.json: every
        token id it can produce must have a row in the embedding (see `check_vocab`)."""
        tok = cls(tokenizer_path(model_dir))
        if model_dir is not None and (Path(model_dir) / "config.json").is_file():
            from .config import MixtralConfig

            config = Path(model_dir) / "config.json"
            check_vocab(tok, MixtralConfig.from_file(config).vocab_size, config)
        return tok

    def encode(self, text: str, bos: bool = True) -> list[int]:
        check_text(text)
        return self.sp.encode(text, bos=bos, eos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control tokens (<s>, </s>) carry no text unless `skip_special_tokens` is
        False, when they are written as their names (vLLM's and Hugging Face's meaning)."""
        if not skip_special_tokens:
            return self.sp.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def piece(self, t: int) -> str:
        """One token as the vocabulary writes it, with SentencePiece's space marker as a space."""
        return self.sp.id_to_piece(t).replace("\u2581", " ")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """OpenAI-style [{"role", "content"}] -> prompt ids in the Mixtral-Instruct format."""
        if not messages:
            raise ChatFormatError("messages must not be empty")
        msgs = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ChatFormatError(f"messages[{i}].role={role!r} is not one of {', '.join(ROLES)}")
            if isinstance(content, list):  # OpenAI content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise ChatFormatError(f"messages[{i}].content: only text parts are supported")
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            if not isinstance(content, str):
                raise ChatFormatError(f"messages[{i}].content must be a string")
            try:
                check_text(content, f"messages[{i}].content")
            except TokenizeError as e:
                raise ChatFormatError(str(e)) from None
            msgs.append(ROLES[role](content=content))
        try:
            return self.mistral.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
        except Exception as e:  # mistral-common validates order (e.g. must end with a user turn)
            raise ChatFormatError(f"messages: {e}") from None


# A UTF-8 character is at most 4 bytes, so a text that ends in an incomplete character began it in
# its last 3 byte tokens; more held-back tokens than this can only be bytes that never form one.
MAX_HELD_TOKENS = 6
UNFINISHED_TOKENS = 3


class IncrementalDetokenizer:
    """Text deltas for a growing token list, safe for multi-byte characters and SentencePiece spaces.

    SentencePiece drops a leading space when a piece is decoded alone and a byte-fallback character
    spans several tokens, so each delta is the difference of two decodes over a short window
    (vLLM's prefix/read offsets), held back while it ends in an incomplete character. The window is
    bounded: once more than `MAX_HELD_TOKENS` are held back (bytes that never become a character,
    e.g. a forced run of lead bytes), everything but the last `UNFINISHED_TOKENS` is emitted with its
    replacement characters, as vLLM's detokeniser emits them, so each step decodes a few tokens
    instead of the whole held-back tail.
    """

    def __init__(self, tok: Tokenizer, prompt_tail: list[int] | None = None, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_tail or [])[-4:]
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def _window(self, upto: int) -> tuple[str, str]:
        """The text of the previous window and of the window up to `upto`."""
        return self.tok.decode(self.ids[self.prefix : self.read], self.skip), self.tok.decode(
            self.ids[self.prefix : upto], self.skip
        )

    def _commit(self, prefix_text: str, full: str, upto: int) -> str:
        """ids[read:upto] emitted: the new text, and the window moved on."""
        delta = full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
        self.prefix, self.read = self.read, upto
        self.text += delta
        return delta

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text, full = self._window(len(self.ids))
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            return self._commit(prefix_text, full, len(self.ids))
        if len(self.ids) - self.read > MAX_HELD_TOKENS:
            upto = len(self.ids) - UNFINISHED_TOKENS
            return self._commit(*self._window(upto), upto)
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back, replacement characters included."""
        delta = self._commit(*self._window(len(self.ids)), len(self.ids))
        self.prefix = self.read
        return delta
