import pytest

from lipkit.errors import UserError
from lipkit.text.tokenizer import TextTokenizer

CAPTIONS = [
    "grinning face",
    "nerd face",
    "waving hand: medium skin tone",
    "visage de geek",
    "笑顔",
    "улыбка",
    "flag: egypt",
    "red heart ❤️",
    "brainy, clever, geek, glasses",
] * 20


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=400, context_length=16)


def test_round_trip_any_unicode(tok):
    long = TextTokenizer(tok.tok, context_length=64)
    for text in ["nerd face", "Visage de GEEK", "笑顔 🙂 émoji", "never seen words xyzzy"]:
        ids = long([text])[0].tolist()
        assert long.decode(ids) == text.lower()
        ids = tok([text])[0].tolist()
        assert ids[0] == tok.sot_id


def test_padding_truncation_keeps_end_token(tok):
    ids = tok(["a", "word " * 50])
    assert ids.shape == (2, 16)
    n = int((ids[0] != tok.pad_id).sum())
    assert ids[0, 0].item() == tok.sot_id and ids[0, n - 1].item() == tok.eot_id
    assert (ids[0, n:] == tok.pad_id).all() and n < 16
    assert ids[1, -1].item() == tok.eot_id and (ids[1] != tok.pad_id).all()


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path, 16)
    assert (again(CAPTIONS[:9]) == tok(CAPTIONS[:9])).all()
    assert tok.vocab_size <= 400


def test_missing_tokenizer_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TextTokenizer.load(tmp_path / "nope", 16)
