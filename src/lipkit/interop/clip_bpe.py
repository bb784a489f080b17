"""OpenAI CLIP's BPE tokenizer as a Hugging Face `tokenizers.Tokenizer`.

OpenCLIP's `SimpleTokenizer` cleans text with `ftfy.fix_text`, unescapes HTML twice, collapses
whitespace and lower-cases, splits with CLIP's regex, and runs byte-level BPE with a `</w>`
end-of-word suffix. The tokenizer built here does the same with `tokenizers` building blocks, so
token ids match OpenCLIP's (and Hugging Face's `CLIPTokenizer`, which skips the ftfy step) without
either library at run time. The ftfy steps reproduced are the character-level ones that change
ordinary text: Windows-1252 C1 controls, Latin ligatures, full/half-width forms, curly quotes,
terminal escapes, control characters and NFC. Mojibake repair (ftfy's `fix_encoding`) and rare
HTML entities are not reproduced; captions that need them tokenize as Hugging Face's CLIP would.

Ids: the 256 byte symbols, the same with `</w>`, 48,894 merges, then `<|startoftext|>` (49406)
and `<|endoftext|>` (49407). Padding uses id 0 like OpenCLIP.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lipkit.errors import UserError

INSTALL_HINT = "pip install 'lipkit[interop]'"  # the peers (open_clip, transformers, onnx) live in this extra

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2
SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Latin ligatures and digraphs that ftfy splits (ftfy.chardata.LIGATURES).
_LIGATURES = {
    "Ĳ": "IJ",
    "ĳ": "ij",
    "ŉ": "ʼn",
    "Ǳ": "DZ",
    "ǲ": "Dz",
    "ǳ": "dz",
    "Ǆ": "DŽ",
    "ǅ": "Dž",
    "ǆ": "dž",
    "Ǉ": "LJ",
    "ǈ": "Lj",
    "ǉ": "lj",
    "Ǌ": "NJ",
    "ǋ": "Nj",
    "ǌ": "nj",
    "ﬀ": "ff",
    "ﬁ": "fi",
    "ﬂ": "fl",
    "ﬃ": "ffi",
    "ﬄ": "ffl",
    "ﬅ": "ſt",
    "ﬆ": "st",
}
# The HTML entities captions scraped from the web carry most often (OpenCLIP unescapes twice).
_ENTITIES = {
    "&amp;": "&",
    "&lt;": "<",
    "&gt;": ">",
    "&quot;": '"',
    "&apos;": "'",
    "&#39;": "'",
    "&#x27;": "'",
    "&#34;": '"',
    "&nbsp;": "\xa0",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _c1_map() -> dict[str, str]:
    """ftfy.fix_c1_controls: stray C1 controls are read as their Windows-1252 characters."""
    out = {}
    for b in range(0x80, 0xA0):
        try:
            out[chr(b)] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            continue  # undefined in cp1252: ftfy leaves it (and removes nothing)
    return out


def _width_map() -> dict[str, str]:
    """ftfy.fix_character_width: full-width ASCII to ASCII, half-width kana/hangul to full width."""
    out = {"\u3000": " "}
    for i in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(i))
        if alt != chr(i):
            out[chr(i)] = alt
    return out


def clip_normalizer() -> normalizers.Normalizer:
    """OpenCLIP's `whitespace_clean(basic_clean(text)).lower()` as a normalizer sequence."""
    steps: list[normalizers.Normalizer] = []
    for table in (_c1_map(), _LIGATURES, _width_map()):
        steps += [normalizers.Replace(k, v) for k, v in table.items()]
    steps += [
        normalizers.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"),  # uncurl quotes
        normalizers.Replace(Regex("[\u201c-\u201f]"), '"'),
        normalizers.Replace(Regex(r"\x1b\[(?:\d|;)*[a-zA-Z]"), ""),  # terminal escapes
        normalizers.Replace(Regex("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]"), ""),
        normalizers.NFC(),
    ]
    for _ in range(2):  # html.unescape(html.unescape(text))
        steps += [normalizers.Replace(k, v) for k, v in _ENTITIES.items()]
    steps += [
        normalizers.Replace(Regex(r"\s+"), " "),
        # str.lower() turns a word-final capital sigma into ς; a per-character lower-case would not.
        normalizers.Replace(Regex(r"(?<=[\p{Lu}\p{Ll}\p{Lt}])Σ(?![\p{Lu}\p{Ll}\p{Lt}])"), "ς"),
        normalizers.Lowercase(),
    ]
    return normalizers.Sequence(steps)


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` that reproduces OpenCLIP's token ids for this vocab and merge list."""
    for special in (SOT, EOT):
        if special not in vocab:
            raise UserError(f"The CLIP vocabulary lacks '{special}'; use the vocab of a CLIP BPE tokenizer.")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=None,
            fuse_unk=False,
        )
    )
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tok.add_special_tokens([SOT, EOT])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    # CLIP has no pad token: OpenCLIP pads with id 0 ("!"); TextTokenizer takes the pad from here.
    pad = next(t for t, i in vocab.items() if i == 0)
    tok.enable_padding(pad_id=0, pad_token=pad)
    return tok


def open_clip_bpe_path() -> Path:
    """The BPE merge file shipped inside the open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"CLIP's BPE vocabulary comes from the open_clip_torch package, which is not installed; "
            f"run {INSTALL_HINT}."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"open_clip's BPE file '{path}' is missing; reinstall it with {INSTALL_HINT}.")
    return path


@lru_cache(maxsize=2)
def _read_merge_file(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : N_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of OpenAI's CLIP BPE (`bpe_simple_vocab_16e6.txt.gz`, OpenCLIP's copy by default)."""
    vocab, merges = _read_merge_file(str(bpe_path or open_clip_bpe_path()))
    return dict(vocab), list(merges)


def clip_tokenizer(bpe_path: str | Path | None = None) -> Tokenizer:
    """CLIP's tokenizer, built from OpenCLIP's bundled vocabulary."""
    return build_clip_tokenizer(*clip_vocab_and_merges(bpe_path))


def is_clip_vocab(vocab: dict[str, int]) -> bool:
    """True when a vocab looks like CLIP's BPE (end-of-word `</w>` symbols and CLIP's special tokens)."""
    return SOT in vocab and EOT in vocab and "a</w>" in vocab


def vocab_and_merges_from_hf(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]] | None:
    """Read a BPE vocab and merges from a Hugging Face tokenizer dir (tokenizer.json or vocab.json + merges.txt)."""
    tj = directory / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
        if model.get("type") == "BPE" and model.get("vocab"):
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            vocab = dict(model["vocab"])
            return vocab, merges  # type: ignore[return-value]
    vj, mt = directory / "vocab.json", directory / "merges.txt"
    if vj.is_file() and mt.is_file():
        vocab = json.loads(vj.read_text(encoding="utf-8"))
        lines = mt.read_text(encoding="utf-8").split("\n")
        merges = [tuple(x.split()) for x in lines if x and not x.startswith("#version")]
        return vocab, merges  # type: ignore[return-value]
    return None
