from pathlib import Path


class Tokenizer:
    """Text <-> token ids, from a checkpoint's tokenizer.json (or transformers as a fallback)."""

    def __init__(self, encode, decode, vocab_size: int):
        self._encode, self._decode = encode, decode
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._decode(token_ids, skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as FastTokenizer
        try:
            tok = FastTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{str(path / 'tokenizer.json')!r} does not load: {e}") from None
        # encode_batch lets go of the GIL while it works (encode holds it: seconds for a long
        # text, when every other thread of the process waits)
        return Tokenizer(lambda text: tok.encode_batch([text])[0].ids,
                         lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
                         tok.get_vocab_size())
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path))
        return Tokenizer(tok.encode, lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
                         len(tok))
    return None
