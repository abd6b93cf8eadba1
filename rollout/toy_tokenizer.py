"""Byte-level tokenizers for random-weight checkpoints, built with the `tokenizers` library.

A model with random weights samples token ids uniformly over its whole vocabulary, so its
tokenizer must give every id some text, or the output reads as ''. Past the 256 byte tokens and
the special tokens, the vocabulary is filled with words of a made-up language ("Ġbranto",
"Kesmi", "lorat"): each one a BPE merge of a shorter token and one more character, so encoding
and decoding are ordinary byte-level BPE.
"""

from collections.abc import Iterator

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
_SYLLABLES = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
_STRIDE = 1_000_003  # a prime not dividing len(_SYLLABLES) ** 2: visits every pair once


def _words() -> Iterator[str]:
    """Words of one syllable, then of two (pairs spread over the syllables), each with a
    leading space ('Ġ' in the byte-level alphabet), bare, and capitalized after a space."""
    count = len(_SYLLABLES)
    one = iter(_SYLLABLES)
    two = (_SYLLABLES[k // count] + _SYLLABLES[k % count]
           for k in ((i * _STRIDE) % count ** 2 for i in range(count ** 2)))
    for source in (one, two):
        for word in source:
            yield from ("Ġ" + word, word, "Ġ" + word.capitalize())


def _merged_tokens(count: int, known: set[str]) -> Iterator[str]:
    """`count` new tokens, each a known token plus one character (its prefixes come first)."""
    made = 0
    if count == 0:
        return
    for word in _words():
        for end in range(2, len(word) + 1):
            piece = word[:end]
            if piece not in known:
                known.add(piece)
                yield piece
                made += 1
                if made == count:
                    return
    raise ValueError(f"cannot make {count} merged tokens; the made-up language has fewer")


def byte_level_tokenizer(vocab_size: int | None = None):
    """Bytes (ids 0-255), the special tokens (256-258), then merged tokens up to `vocab_size`
    (None: none), so that every id of a model with that vocabulary decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + SPECIAL_TOKENS)}
    base = len(vocab)
    if vocab_size is not None and vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} is below the {base} byte and special tokens")
    merges = []
    for piece in _merged_tokens(max(0, (vocab_size or 0) - base), set(vocab)):
        vocab[piece] = len(vocab)
        merges.append((piece[:-1], piece[-1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok
