"""Character tokenizer, policy build/save/load, warm-start caching and greedy evaluation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from services.policy.config import PolicySpec, StartBand, WarmstartConfig
from services.policy.evaluate import evaluate_greedy
from services.policy.model import (
    build_policy,
    left_pad,
    load_policy,
    num_parameters,
    save_policy,
)
from services.policy.tokenizer import (
    ARITHMETIC_ALPHABET,
    CharTokenizer,
    char_alphabet,
    char_tokenizer,
    char_tokenizer_from_texts,
    decode_ids,
    encode_text,
)
from services.policy.warmstart import (
    METADATA_FILE,
    NoStartInBand,
    attempt_seed,
    demonstration_batch,
    warmstart,
)
from services.tasks import VERIFIERS, ArithmeticTask, Prompt

TINY = PolicySpec(n_layer=1, n_embd=16, n_head=2, n_positions=16)

# --- tokenizer ----------------------------------------------------------------------------


def test_char_tokenizer_default_alphabet_and_round_trip(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = CharTokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.vocab_size == len(tok) == 15  # 10 digits, '+', '=', pad, bos, eos
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode("123+045=")
    assert ids == [4, 5, 6, 13, 3, 7, 8, 14]  # one id per character, the alphabet from id 3
    assert tok.decode(ids) == "123+045="
    specials = [tok.bos_token_id, *tok.encode("12"), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(specials, skip_special_tokens=True) == "12"
    assert tok.decode(specials) == "<bos>12<eos><pad>"
    assert tok.decode(torch.tensor(ids)) == "123+045="
    with pytest.raises(ValueError, match="'x'"):
        encode_text(tok, "1x")
    # Saved and loaded the Hugging Face way, it is the same tokenizer.
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert char_alphabet(loaded) == ARITHMETIC_ALPHABET
    assert loaded.encode("99+1=") == tok.encode("99+1=")
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0


def test_char_tokenizer_keeps_spaces_newlines_and_never_parses_special_tokens():
    tok = char_tokenizer_from_texts(["What is 2+2?\n", "Ünïcode ✓ <eos>"])
    text = "What is 2+2?\n ✓ <eos>"
    ids = encode_text(tok, text)
    assert len(ids) == len(text) and tok.eos_token_id not in ids
    assert decode_ids(tok, ids) == text
    assert len(tok) == 3 + len(set("What is 2+2?\nÜnïcode ✓ <eos>"))
    with pytest.raises(ValueError, match="repeated"):
        char_tokenizer("aa")
    with pytest.raises(ValueError, match="empty"):
        char_tokenizer("")


# --- model --------------------------------------------------------------------------------


def test_build_policy_size_and_seed():
    tok = CharTokenizer()
    model = build_policy(PolicySpec(), tok, seed=0)
    assert 0.55e6 < num_parameters(model) < 0.65e6  # the 0.6M-parameter default
    x = torch.tensor([tok.encode("123+456=")])
    same = build_policy(PolicySpec(), tok, seed=0)
    other = build_policy(PolicySpec(), tok, seed=1)
    assert torch.equal(model(x).logits, same(x).logits)
    assert not torch.equal(model(x).logits, other(x).logits)


def test_save_load_round_trip_identical_logits(tmp_path):
    tok = CharTokenizer()
    model = build_policy(TINY, tok, seed=3)
    save_policy(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded, ltok = load_policy(tmp_path / "ckpt")
    assert ltok.get_vocab() == tok.get_vocab() and not loaded.training
    x = torch.tensor([tok.encode("12+34="), tok.encode("99+01=")])
    assert torch.equal(model(x).logits, loaded(x).logits)
    # The tied head survives the round trip (a broken tie would still give equal logits once).
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_load_policy_loads_the_directory_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    char_tok = CharTokenizer("ab")  # same vocab size (5) for the model
    model = build_policy(TINY, char_tok, seed=0)
    save_policy(model, hf_tok, tmp_path)
    _, tok = load_policy(tmp_path)
    assert char_alphabet(tok) is None
    assert tok.encode("a b", add_special_tokens=False) == [3, 4]


def test_load_policy_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "nope")


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --- warm start ---------------------------------------------------------------------------


def test_demonstration_batch_masks_prompt_and_padding():
    tok = CharTokenizer()
    prompts = [Prompt("a", "12+34=", "46", "arithmetic"), Prompt("b", "1+2=", "3", "arithmetic")]
    ids, labels, mask = demonstration_batch(tok, prompts, ["46", "3"])
    # Row 0: 6 prompt chars + "46" + EOS = 9 tokens -> 8 inputs; only "4", "6", EOS are learnt.
    assert ids.shape == labels.shape == mask.shape == (2, 8)
    assert decode_ids(tok, labels[0][labels[0] >= 0]) == "46"
    assert labels[0][labels[0] >= 0].tolist()[-1] == tok.eos_token_id
    assert (labels[0] >= 0).sum() == 3 and (labels[1] >= 0).sum() == 2
    assert labels[0, :5].eq(-100).all()


def _tiny_spec(cache_dir, **kw) -> WarmstartConfig:
    base = dict(
        steps=4,
        batch_size=8,
        lr=1e-3,
        band=None,
        eval_prompts=16,
        dev_prompts=16,
        warmup_steps=2,
        cache_dir=cache_dir,
    )
    base.update(kw)
    return WarmstartConfig(**base)


def _key(spec: WarmstartConfig) -> str:
    return spec.cache_key(TINY, 2)


def test_warmstart_caches_and_does_not_retrain(tmp_path):
    calls: list[int] = []
    spec = _tiny_spec(tmp_path)
    path = warmstart(spec, TINY, 2, progress=lambda s, t, loss: calls.append(s))
    assert calls == [1, 2, 3, 4]
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["steps_run"] == 4 and 0.0 <= meta["heldout_accuracy"] <= 1.0
    _, tok = load_policy(path)
    assert char_alphabet(tok) == ARITHMETIC_ALPHABET
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    again = warmstart(_tiny_spec(tmp_path), TINY, 2, progress=lambda s, t, loss: calls.append(s))
    assert again == path and calls == [1, 2, 3, 4]  # no training the second time
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    # Only the finished checkpoint is left: no temporary directories.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # Any change to the spec is a different checkpoint; clean ignores wrong_fraction.
    assert _key(_tiny_spec(tmp_path, seed=1)) != _key(spec)
    assert _key(_tiny_spec(tmp_path, clean=True)) == _key(
        _tiny_spec(tmp_path, clean=True, wrong_fraction=0.0)
    )
    assert _key(_tiny_spec(tmp_path, clean=True)) != _key(spec)
    # The architecture and the task are part of what was trained; the cache location is not.
    assert spec.cache_key(TINY, 3) != _key(spec)
    assert spec.cache_key(PolicySpec(n_layer=2, n_embd=16, n_head=2, n_positions=16), 2) != _key(
        spec
    )
    assert _key(_tiny_spec(tmp_path / "elsewhere")) == _key(spec)


def test_warmstart_stops_at_the_first_probe_inside_the_band(tmp_path):
    band = StartBand(min_sample_accuracy=0.0, max_greedy_accuracy=1.0, samples=2)
    spec = _tiny_spec(tmp_path, band=band, steps=4, max_steps=40, check_every=2)
    meta = json.loads((warmstart(spec, TINY, 2) / METADATA_FILE).read_text())
    assert meta["steps_run"] == 4 and meta["in_band"] and meta["attempt"] == 0
    assert meta["probe"]["step"] == 4 and meta["probe"]["samples"] == 2
    assert meta["seed_used"] == spec.seed


def test_warmstart_outside_its_band_tries_fresh_starts_then_fails_naming_the_band(tmp_path, caplog):
    band = StartBand(min_sample_accuracy=1.0, samples=2)  # a 4-step model never gets there
    spec = _tiny_spec(tmp_path, band=band, steps=4, max_steps=8, check_every=2, attempts=2)
    with (
        caplog.at_level(logging.WARNING, logger="services.policy.warmstart"),
        pytest.raises(NoStartInBand, match=r"none of 2 attempts reached warmstart\.band"),
    ):
        warmstart(spec, TINY, 2)
    tried = [r.message for r in caplog.records if "never reached the band" in r.message]
    assert len(tried) == 2 and "attempt 0 (seed 0)" in tried[0] and "attempt 1" in tried[1]
    assert list(tmp_path.iterdir()) == []  # nothing cached
    assert attempt_seed(0, 0) == 0 and len({attempt_seed(0, k) for k in range(5)}) == 5


def test_a_clean_warm_start_needs_no_band():
    with pytest.raises(ValueError, match="band: null with warmstart.clean"):
        WarmstartConfig(clean=True)
    assert WarmstartConfig(clean=True, band=None).effective_wrong_fraction == 0.0


def test_evaluate_greedy_matches_unbatched_decoding(monkeypatch):
    """Batched, left-padded greedy decoding must give what one-prompt-at-a-time argmax gives."""
    tok = CharTokenizer()
    model = build_policy(PolicySpec(n_positions=32), tok, seed=0)
    texts = ["1+2=", "12+345=", "999+999=", "7=", "00+1="]

    def greedy(text: str, steps: int = 5) -> str:
        ids = tok.encode(text)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(steps):
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
        return tok.decode(out)

    refs = [greedy(t) for t in texts]
    monkeypatch.setitem(VERIFIERS, "echo", lambda r, a: float(r == a))
    # Answers right for the first 3 prompts, wrong for the last 2: accuracy must be exactly 0.6.
    prompts = [
        Prompt(str(i), t, refs[i] if i < 3 else refs[i] + "x", "echo") for i, t in enumerate(texts)
    ]
    model.train()
    assert evaluate_greedy(model, tok, prompts, max_new_tokens=5, batch_size=2) == pytest.approx(
        0.6
    )
    assert model.training  # mode restored


def test_evaluate_greedy_random_model_scores_zero_on_arithmetic():
    tok = CharTokenizer()
    model = build_policy(TINY, tok, seed=0)
    task = ArithmeticTask(digits=2)
    assert evaluate_greedy(model, tok, task.heldout(50), max_new_tokens=4) == 0.0
