"""The tokenizer gives OpenAI's token ids, including on awkward text, and never fails on long prompts."""
import numpy as np
import pytest

from cascade.models import tokenize
from cascade.models.tokenizer import get_tokenizer

from _reference import openai_tokenize, openai_tokenizer

HARD_PROMPTS = [
    "a photo of a dog.",
    "",
    "   ",
    "A Photo Of A CAT!!!",
    "a photo of a crème brûlée, a type of food.",
    "Ångström, naïve café, São Paulo, Zürich, Dvořák",
    "a photo of a german_shepherd_dog",
    "black-and-tan coonhound / bluetick... (dog)",
    "a photo of a 🐶 and a 🍕 🇨🇳",
    "fish &amp; chips &lt;tasty&gt; &#39;quoted&#39; &amp;amp;",
    "it's a dog's life, we're sure they'll've done it, I'd say, you've, I'm",
    "北京烤鸭, 寿司, 김치, пельмени, φαλάφελ, शाही पनीर",
    "numbers 12345 and 3.14 and ½ and ①",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "mojibake: The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "zero\u200bwidth and combining e\u0301 accents, ﬁ ligature",
    "x" * 300,
    " ".join(["a photo of a beautiful golden retriever"] * 30),
]


@pytest.mark.parametrize("text", HARD_PROMPTS)
def test_ids_match_openai(text):
    ours = tokenize([text])
    ref = openai_tokenize([text])
    assert ours.dtype == np.int64 and ours.shape == (1, 77)
    np.testing.assert_array_equal(ours, ref)


def test_batch_shape_and_context_length():
    ids = tokenize(HARD_PROMPTS[:5], context_length=32)
    assert ids.shape == (5, 32) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, openai_tokenize(HARD_PROMPTS[:5], context_length=32))
    assert tokenize("a dog").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)


def test_overlong_prompt_is_truncated_with_end_token():
    tok = get_tokenizer()
    text = " ".join(f"word{i}" for i in range(200))
    ids = tokenize([text])[0]
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
    assert (ids != 0).all()  # every slot used
    assert int(np.argmax(ids)) == 76  # the text tower reads the end token's position


def test_vocabulary_matches_openai():
    ours, ref = get_tokenizer(), openai_tokenizer()
    assert ours.vocab_size == len(ref.encoder) == 49408
    assert ours.token_id == ref.encoder
    assert (ours.sot_id, ours.eot_id) == (49406, 49407)


def test_decode_round_trip():
    tok = get_tokenizer()
    assert tok.decode(tokenize(["A photo of a Crème Brûlée!"])[0]) == "a photo of a crème brûlée !"


def test_rejects_non_strings():
    with pytest.raises(TypeError):
        tokenize(["ok", None])
