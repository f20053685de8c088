"""Tokenizer round trips, chat format equal to mistral-common's, streaming detokenisation."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.build import local_engine
from model.tokenizer import DEFAULT_TOKENIZER, ChatFormatError, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "  leading and  double  spaces ",
    "naïve café Ünïcödé",
    "你好，世界 🤷‍♂️ emoji",
    "line1\nline2\n\ttab",
    "x" * 50,
    "1234567890 + -*/ = ?",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_real_mixtral_vocab(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello")[0] == 1


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenisation_equals_full_decode(tok, text):
    prompt = tok.encode("Prompt:")
    ids = tok.encode(text, bos=False)
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert all("\ufffd" not in x for x in deltas)


def test_chat_encoding_equals_mistral_common(tok):
    ref = MistralTokenizer.from_file(str(DEFAULT_TOKENIZER))
    msgs = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?")]
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    want = ref.encode_chat_completion(ChatCompletionRequest(messages=[cls[r](content=c) for r, c in msgs])).tokens
    assert tok.encode_chat([{"role": r, "content": c} for r, c in msgs]) == want
    text = tok.sp.decode(want)
    assert "[INST]" in text and "[/INST]" in text


@pytest.mark.parametrize(
    "msgs,match",
    [
        ([], "empty"),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "text"),
    ],
)
def test_bad_chat_messages(tok, msgs, match):
    with pytest.raises(ChatFormatError, match=match):
        tok.encode_chat(msgs)


def test_checkpoint_tokenizer_is_preferred(tmp_path):
    import shutil

    shutil.copyfile(DEFAULT_TOKENIZER, tmp_path / "tokenizer.model")
    assert Tokenizer.for_model(tmp_path).path == tmp_path / "tokenizer.model"
    assert Tokenizer.for_model(tmp_path / "nothing-here").path == DEFAULT_TOKENIZER


def test_tokenizer_larger_than_the_config_vocab_is_refused(tmp_path):
    """A real checkpoint whose config.json has fewer embedding rows than its tokenizer.model has
    tokens: every loader (LLMEngine.local here; the ingress and the Serve engine go through the same
    Tokenizer.for_model) refuses it, naming both sizes and both files."""
    from model.tiny import preset_config, write_checkpoint
    from model.tokenizer import VocabMismatchError

    d = write_checkpoint(tmp_path / "small-vocab", preset_config("tiny", num_hidden_layers=1, vocab_size=1000))
    for load in (lambda: Tokenizer.for_model(d), lambda: local_engine(str(d), "float32")):
        with pytest.raises(VocabMismatchError) as e:
            load()
        msg = str(e.value)
        assert "32000" in msg and "vocab_size=1000" in msg, msg
        assert str(d / "config.json") in msg and str(d / "tokenizer.model") in msg, msg
    # Without tokenizer.model the default (Mixtral v1, 32000 tokens) is checked the same way.
    (d / "tokenizer.model").unlink()
    with pytest.raises(VocabMismatchError, match=str(DEFAULT_TOKENIZER)):
        Tokenizer.for_model(d)


def test_padded_config_vocab_is_fine(tmp_path):
    from model.tiny import preset_config, write_checkpoint

    d = write_checkpoint(tmp_path / "padded", preset_config("tiny", num_hidden_layers=1, vocab_size=32768))
    assert Tokenizer.for_model(d).vocab_size == 32000


def test_autotokenizer_on_a_written_checkpoint_gives_mixserves_ids(tiny_dir, tok):
    """The checkpoint is a whole Hugging Face repo: transformers' AutoTokenizer on the folder (what
    lm-eval, benchmark clients and guidellm load) gives exactly mixserve's ids, BOS included, and decodes
    them to the same text, on texts at the edges of SentencePiece's rules; generation_config.json names
    the config's BOS and EOS."""
    import json
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_dir)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    gen = json.loads((Path(tiny_dir) / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    rng = random.Random(7)
    alphabet = list(" \n\t  abcXYZ019.,;:!?'\"()[]<>/\\-_=+*&^%$#@~`éüßøñç你好世界🤖🎉\u2581\u00a0\u200b") + [
        "</s>",
        "<s>",
        "<unk>",
        "[INST]",
        " [/INST]",
    ]
    texts = ["", " ", "Hello world", " leading space", "  two", "trailing ", "a\n\n\tb", "</s> in text"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 48))) for _ in range(1500)]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text)
