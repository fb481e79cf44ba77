"""GPT-2 byte-level BPE tokenizer from local files (no hub): the model directory's own vocab/merges, else the GPT-2
files shipped in data/tokenizer/."""
from __future__ import annotations

import os
from pathlib import Path

# data/ sits beside the package in the repository (ftlab is installed editable); FTLAB_DATA overrides it
DATA_DIR = Path(os.environ.get("FTLAB_DATA", Path(__file__).resolve().parent.parent / "data"))
GPT2_VOCAB_SIZE = 50257
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt"))


class Tokenizer:
    def __init__(self, vocab_file: str | Path, merges_file: str | Path):
        from tokenizers import ByteLevelBPETokenizer

        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        # add_prefix_space=False is how GPT-2 encodes (checked against the reference encoder)
        self._bpe = ByteLevelBPETokenizer(str(vocab_file), str(merges_file), add_prefix_space=False)

    @property
    def vocab_size(self) -> int:
        return self._bpe.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:  # the byte-level BPE files carry no special-token list: <|endoftext|> is GPT-2's one
            ids = [i for i in ids if i != self.end_of_text_id]
        return self._bpe.decode(list(ids), skip_special_tokens=False)

    @property
    def end_of_text_id(self) -> int | None:
        return self._bpe.token_to_id("<|endoftext|>")


def find_tokenizer_files(model_dir: str | Path | None) -> tuple[Path, Path] | None:
    """The vocab/merges pair in the model directory or its parent (FT keeps them beside `<N>-gpu/`)."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    for directory in (model_dir, model_dir.parent):
        for vocab, merges in _FILE_PAIRS:
            if (directory / vocab).is_file() and (directory / merges).is_file():
                return directory / vocab, directory / merges
    return None


def load_tokenizer(model_dir: str | Path | None = None, vocab_size: int | None = None) -> Tokenizer | None:
    """The model's tokenizer; the bundled GPT-2 one when the model has none and its vocabulary is GPT-2's (possibly
    padded, like Megatron's 50304); None when no tokenizer fits."""
    files = find_tokenizer_files(model_dir)
    if files is not None:
        return Tokenizer(*files)
    if vocab_size is None or GPT2_VOCAB_SIZE <= vocab_size <= GPT2_VOCAB_SIZE + 1024:
        return Tokenizer(DATA_DIR / "tokenizer" / "gpt2-vocab.json", DATA_DIR / "tokenizer" / "gpt2-merges.txt")
    return None
