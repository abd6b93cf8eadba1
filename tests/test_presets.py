"""Presets: every token id of the model decodes to text, and a cached preset written by another
version of the code is rebuilt, not reused."""

import json

from rollout.presets import PRESETS, preset_path
from rollout.tokenizer import load_tokenizer
from rollout.toy_tokenizer import SPECIAL_TOKENS, byte_level_tokenizer


def test_every_id_of_a_full_vocabulary_decodes_to_text():
    vocab = PRESETS["qwen3-0.6b-random"]["vocab_size"]
    tok = byte_level_tokenizer(vocab)
    assert tok.get_vocab_size() == vocab
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [256, 257, 258]
    ids = list(range(259, vocab, 997)) + [vocab - 1]
    assert all(tok.decode([i]) for i in ids)
    text = "Hello world, the capital of France is"
    assert tok.decode(tok.encode(text).ids) == text


def test_byte_tokenizer_alone_keeps_one_token_per_byte():
    tok = byte_level_tokenizer()
    assert tok.get_vocab_size() == 259 and len(tok.encode("hello").ids) == 5


def test_stale_cached_preset_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path))
    path = preset_path("qwen3-tiny-random")
    tokenizer = load_tokenizer(path)
    assert tokenizer.vocab_size == PRESETS["qwen3-tiny-random"]["vocab_size"]
    assert preset_path("qwen3-tiny-random") == path  # current: reused as is

    (path / "tokenizer.json").write_text(byte_level_tokenizer().to_str())  # an old preset
    marker = json.loads((path / "preset.json").read_text())
    (path / "preset.json").write_text(json.dumps({**marker, "format": marker["format"] - 1}))
    assert preset_path("qwen3-tiny-random") == path
    assert load_tokenizer(path).vocab_size == tokenizer.vocab_size
    assert [p.name for p in (tmp_path / "presets").iterdir()] == ["qwen3-tiny-random"]
