"""HF rollout engine: shapes, behaviour log-probs, EOS padding, grouping, determinism, stop
tokens, memory that does not grow with the vocabulary times the length; the engine helpers
shared with the vLLM engine (stop defaults, packing, weight wire format), tested without vLLM."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from services.policy.model import PolicySpec, build_policy
from services.policy.tokenizer import CharTokenizer, default_stop_token_ids, end_of_turn_token_id
from services.rollout.engine import (
    NO_STOP,
    RolloutEngine,
    cut_at_stop,
    pack_rows,
    resolve_stop_token_ids,
)
from services.rollout.hf_engine import HFRolloutEngine, RolloutBatch, top_p_filter
from services.tasks import Prompt

TOK = CharTokenizer()
# Prompts of different lengths so generation needs left padding.
PROMPTS = [
    Prompt("p0", "1+1=", "2", "arithmetic"),
    Prompt("p1", "12+345=", "357", "arithmetic"),
    Prompt("p2", "123+456=", "579", "arithmetic"),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_policy(PolicySpec(), TOK, seed=0)


def _recomputed_logp(model, batch: RolloutBatch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per row: log-softmax(logits / temperature) of each response token, by a plain unpadded
    forward pass over prompt + response."""
    out = []
    with torch.no_grad():
        for row in range(len(batch)):
            p_ids = batch.prompt_ids[row // batch.n]
            k = int(batch.response_lengths[row])
            resp = batch.responses[row, :k].tolist()
            logits = model(torch.tensor([p_ids + resp])).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)[len(p_ids) - 1 : len(p_ids) - 1 + k]
            out.append(logp.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1))
    return out


def test_shapes_and_types(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5)
    b = eng.generate(PROMPTS, n=4, seed=0)
    n_rows = len(PROMPTS) * 4
    t = b.responses.shape[1]
    assert 1 <= t <= 5 and len(b) == n_rows
    assert b.responses.shape == b.behav_logp.shape == b.response_mask.shape == (n_rows, t)
    assert b.responses.dtype == torch.int64 and b.behav_logp.dtype == torch.float32
    assert b.response_mask.dtype == torch.bool and b.response_lengths.shape == (n_rows,)
    assert b.prompt_ids == [TOK.encode(p.text) for p in PROMPTS]
    assert b.response_mask.sum(1).tolist() == b.response_lengths.tolist()
    assert t == int(b.response_lengths.max())
    for row, text in enumerate(b.texts):
        k = int(b.response_lengths[row])
        assert text == TOK.decode(b.responses[row, :k], skip_special_tokens=True)
    assert b.n == 4 and b.policy_version == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_plain_forward(model, temperature):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, temperature=temperature)
    b = eng.generate(PROMPTS, n=8, seed=1)
    ref = _recomputed_logp(model, b, temperature)
    for row, r in enumerate(ref):
        k = int(b.response_lengths[row])
        torch.testing.assert_close(b.behav_logp[row, :k], r, atol=1e-4, rtol=0)
    assert (b.behav_logp[b.response_mask] < 0).all()


def test_rows_grouped_by_prompt():
    """With a near-greedy temperature each row reproduces its own prompt's continuation, so a
    row attached to the wrong prompt shows."""
    model = build_policy(PolicySpec(), TOK, seed=0)
    # Large random weights make the continuation depend strongly on the prompt.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, temperature=1e-3)
    n = 3
    b = eng.generate(PROMPTS, n=n, seed=0)
    singles = [eng.generate([p], n=1, seed=0) for p in PROMPTS]
    assert len({s.texts[0] for s in singles}) == len(PROMPTS)  # prompts are distinguishable
    for row in range(len(b)):
        assert b.texts[row] == singles[row // n].texts[0]


def test_padding_after_eos(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5)
    b = eng.generate(PROMPTS * 8, n=4, seed=2)  # 96 rows: the random model emits EOS ~1/15 a step
    lengths = b.response_lengths
    ended = 0
    for row in range(len(b)):
        k = int(lengths[row])
        resp = b.responses[row]
        eos_at = (resp[:k] == TOK.eos_token_id).nonzero().flatten().tolist()
        if k < 5:
            assert eos_at == [k - 1]  # EOS is the last response token, and counted
            ended += 1
        else:
            assert eos_at in ([], [4])
        assert (resp[k:] == TOK.pad_token_id).all()
        assert (b.behav_logp[row, k:] == 0).all() and not b.response_mask[row, k:].any()
        assert b.behav_logp[row, k - 1] != 0
    assert ended > 0 and (lengths == 5).any()


def test_deterministic_given_seed_and_leaves_global_rng(model):
    eng = HFRolloutEngine(model, TOK)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = eng.generate(PROMPTS, n=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = eng.generate(PROMPTS, n=8, seed=5)
    c = eng.generate(PROMPTS, n=8, seed=6)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.behav_logp, b.behav_logp)
    assert not torch.equal(a.responses, c.responses)


def test_length_limit_and_position_check(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=2)
    b = eng.generate(PROMPTS, n=4, seed=0)
    assert b.responses.shape[1] <= 2 and (b.response_lengths <= 2).all()
    long = Prompt("x", "1" * 30 + "=", "1", "arithmetic")
    with pytest.raises(ValueError, match="positions"):
        HFRolloutEngine(model, TOK, max_new_tokens=5).generate([long], n=1, seed=0)


def test_load_state_dict_swaps_weights_and_version():
    model = build_policy(PolicySpec(), TOK, seed=0)
    other = build_policy(PolicySpec(), TOK, seed=1)
    eng = HFRolloutEngine(model, TOK)
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied: optional
    eng.load_state_dict(state, version=3)
    assert eng.version == 3
    x = torch.tensor([TOK.encode("12+34=")])
    assert torch.equal(eng.model(x).logits, other(x).logits)
    assert eng.generate(PROMPTS, n=1, seed=0).policy_version == 3
    with pytest.raises(KeyError):
        eng.load_state_dict({**other.state_dict(), "bogus.weight": torch.zeros(1)}, version=4)
    partial = {k: v for k, v in other.state_dict().items() if "h.0.mlp" not in k}
    with pytest.raises(KeyError):
        eng.load_state_dict(partial, version=5)


def test_rejects_bad_settings(model):
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK, temperature=0.0)
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK, top_p=0.0)
    with pytest.raises(ValueError):
        HFRolloutEngine(model, TOK).generate(PROMPTS, n=0, seed=0)


# ---- behaviour log-probs under top-p, against the transformers implementation ----------------


def test_top_p_filter_keeps_the_same_tokens_as_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ours = top_p_filter(logits, top_p)
        theirs = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert (~torch.isinf(ours)).sum(1).min() >= 1
    assert top_p_filter(logits, 1.0) is logits


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.8), (0.7, 0.9)])
def test_top_p_logprobs_match_full_forward_with_transformers_warpers(model, temperature, top_p):
    """Behaviour log-prob = log-softmax of the processed logits the token was drawn from; the
    reference applies transformers' own temperature and top-p warpers to one full forward pass."""
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, temperature=temperature, top_p=top_p)
    b = eng.generate(PROMPTS, n=8, seed=4)
    warp_t, warp_p = TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)
    with torch.no_grad():
        for row in range(len(b)):
            p_ids = b.prompt_ids[row // b.n]
            k = int(b.response_lengths[row])
            resp = b.responses[row, :k].tolist()
            logits = model(torch.tensor([p_ids + resp])).logits[0].float()
            scores = warp_p(None, warp_t(None, logits[len(p_ids) - 1 : len(p_ids) - 1 + k]))
            ref = (
                torch.log_softmax(scores, -1)
                .gather(-1, torch.tensor(resp).unsqueeze(-1))
                .squeeze(-1)
            )
            torch.testing.assert_close(b.behav_logp[row, :k], ref, atol=1e-4, rtol=0)
    assert torch.isfinite(b.behav_logp).all()


# ---- memory: nothing of size N x T x V -------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns (views of parameters
    excluded: they allocate nothing)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.untyped_storage().data_ptr() not in self.param_storages
            ):
                self.largest = max(self.largest, t.numel())
        return out


class _WideTokenizer:
    """The arithmetic char tokenizer inside a ``vocab``-token vocabulary (ids past the
    alphabet decode as their number): what the engine asks of a tokenizer, no more."""

    chat_template = None
    eos_token_id, pad_token_id = TOK.eos_token_id, TOK.pad_token_id

    def __init__(self, vocab: int) -> None:
        self.wide = vocab

    def __len__(self) -> int:
        return self.wide

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return TOK.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def _wide_vocab_model(vocab: int) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 whose vocabulary dwarfs everything else (CharTokenizer ids fit in it)."""
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=TOK.bos_token_id,
        eos_token_id=TOK.eos_token_id,
        pad_token_id=TOK.pad_token_id,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_no_tensor_grows_with_length_times_vocabulary():
    vocab, n = 4096, 4
    model = _wide_vocab_model(vocab)
    params = list(model.parameters())
    rows = len(PROMPTS) * n
    largest = {}
    for steps in (8, 32):
        eng = HFRolloutEngine(model, _WideTokenizer(vocab), max_new_tokens=steps, top_p=0.9)
        with LargestTensor(params) as probe:
            b = eng.generate(PROMPTS, n=n, seed=0)
        assert b.responses.shape[1] == steps  # a 4096-token vocabulary seldom says EOS
        largest[steps] = probe.largest
    # One step's [N, V] logits are the largest thing alive, whatever the length.
    assert largest[8] == largest[32] == rows * vocab

    # The probe does see an [N, T, V] tensor where one is made: generate's kept scores.
    ids = torch.tensor([TOK.encode("12+34=")] * rows)
    with LargestTensor(params) as probe, torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=32,
            min_new_tokens=32,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=TOK.pad_token_id,
        )
        torch.stack(out.scores, dim=1)
    assert probe.largest >= rows * 32 * vocab


# ---- stop tokens, warnings, greedy, weights, device --------------------------------------------


def test_stops_on_any_stop_token_and_records_which(model):
    plus, eq = TOK.encode("+")[0], TOK.encode("=")[0]
    stops = [TOK.eos_token_id, plus, eq]
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5, stop_token_ids=stops)
    assert eng.stop_token_ids == stops
    b = eng.generate(PROMPTS * 8, n=4, seed=2)
    seen = set()
    for row in range(len(b)):
        k = int(b.response_lengths[row])
        toks = b.responses[row, :k].tolist()
        assert not set(toks[:-1]) & set(stops)
        stop = int(b.stop_token[row])
        if stop == NO_STOP:
            assert k == 5 and toks[-1] not in stops
        else:
            assert toks[-1] == stop
            seen.add(stop)
    assert seen == set(stops)  # each of the three ended some row
    assert (b.stop_token == NO_STOP).any()


def test_default_stop_is_eos_for_the_char_tokenizer(model):
    eng = HFRolloutEngine(model, TOK)
    assert eng.stop_token_ids == [TOK.eos_token_id]
    b = eng.generate(PROMPTS * 8, n=4, seed=2)
    assert set(b.stop_token.tolist()) <= {TOK.eos_token_id, NO_STOP}


def test_generation_emits_no_warnings(model, caplog):
    eng = HFRolloutEngine(model, TOK, top_p=0.9)
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level("WARNING", logger="transformers"),
    ):
        warnings.simplefilter("always")
        eng.generate(PROMPTS, n=2, seed=0)
        eng.greedy(PROMPTS)
    assert [str(w.message) for w in caught] == []
    assert caplog.records == []


def test_greedy_is_the_argmax_continuation(model):
    eng = HFRolloutEngine(model, TOK, max_new_tokens=5)
    b = eng.greedy(PROMPTS)
    assert b.n == 1 and len(b) == len(PROMPTS)
    with torch.no_grad():
        for row, p in enumerate(PROMPTS):
            ids = TOK.encode(p.text)
            expect, logps = [], []
            for _ in range(5):
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                tok = int(logp.argmax())
                expect.append(tok)
                logps.append(float(logp[tok]))
                ids.append(tok)
                if tok == TOK.eos_token_id:
                    break
            k = int(b.response_lengths[row])
            assert b.responses[row, :k].tolist() == expect
            torch.testing.assert_close(
                b.behav_logp[row, :k], torch.tensor(logps), atol=1e-5, rtol=0
            )


def test_load_weights_streams_named_tensors_in_place():
    model = build_policy(PolicySpec(), TOK, seed=0)
    other = build_policy(PolicySpec(), TOK, seed=1)
    eng = HFRolloutEngine(model, TOK)
    assert isinstance(eng, RolloutEngine) and eng.model is model
    ptr = model.transformer.wte.weight.data_ptr()
    eng.load_weights(((k, v) for k, v in other.state_dict().items()), version=2)
    assert eng.version == 2 and model.transformer.wte.weight.data_ptr() == ptr  # in place
    x = torch.tensor([TOK.encode("12+34=")])
    assert torch.equal(eng.model(x).logits, other(x).logits)
    with pytest.raises(KeyError, match="bogus"):
        eng.load_weights([("bogus.weight", torch.zeros(1))], version=3)
    with pytest.raises(ValueError, match="shape"):
        eng.load_weights([("transformer.wte.weight", torch.zeros(3, 3))], version=3)
    assert eng.version == 2


def test_device_and_dtype_arguments():
    model = build_policy(PolicySpec(), TOK, seed=0)
    eng = HFRolloutEngine(model, TOK, device="cpu", dtype=torch.bfloat16)
    assert (
        eng.device == torch.device("cpu") and next(eng.model.parameters()).dtype == torch.bfloat16
    )
    b = eng.generate(PROMPTS, n=2, seed=0)
    assert b.behav_logp.dtype == torch.float32 and torch.isfinite(b.behav_logp).all()
    # New float32 weights land in the bf16 model.
    eng.load_state_dict(build_policy(PolicySpec(), TOK, seed=1).state_dict(), version=1)
    assert next(eng.model.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_defaults_to_bf16():
    eng = HFRolloutEngine(build_policy(PolicySpec(), TOK, seed=0), TOK, device="cuda")
    assert eng.device.type == "cuda" and next(eng.model.parameters()).dtype == torch.bfloat16
    b = eng.generate(PROMPTS, n=2, seed=0)
    assert b.responses.device.type == "cpu" and torch.isfinite(b.behav_logp).all()


# ---- helpers shared with the vLLM engine ---------------------------------------------------------


def _chat_tokenizer(template: str | None):
    """A word-level HF tokenizer with ``<eos>`` and, in the template, ``<|im_end|>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["<eos>", "<|im_start|>", "<|im_end|>", "hi", "x", "user", "\n"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=template,
    )


def test_default_stops_add_the_chat_templates_end_of_turn():
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    tok = _chat_tokenizer(template)
    assert end_of_turn_token_id(tok) == 2
    assert default_stop_token_ids(tok) == [0, 2]
    plain = _chat_tokenizer(None)
    assert end_of_turn_token_id(plain) is None and default_stop_token_ids(plain) == [0]
    # A template that ends turns with plain text has no end-of-turn token.
    text_end = _chat_tokenizer("{% for m in messages %}{{ m['content'] }} hi {% endfor %}")
    assert end_of_turn_token_id(text_end) is None


def test_resolve_stop_token_ids_checks_the_vocabulary():
    assert resolve_stop_token_ids(TOK, [2, 5, 2]) == [2, 5]
    assert resolve_stop_token_ids(TOK, None) == [TOK.eos_token_id]
    with pytest.raises(ValueError, match="empty"):
        resolve_stop_token_ids(TOK, [])
    with pytest.raises(ValueError, match="outside"):
        resolve_stop_token_ids(TOK, [99])


def test_pack_rows_and_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7], [2]) == 3 and cut_at_stop([5, 6], [2]) == 2
    responses, lengths, behav, mask, stop = pack_rows(
        [[5, 2], [5, 6, 7]], [[-1.0, -2.0], [-1.0, -1.0, -3.0]], [2], pad_id=0
    )
    assert responses.tolist() == [[5, 2, 0], [5, 6, 7]] and lengths.tolist() == [2, 3]
    assert behav.tolist() == [[-1.0, -2.0, 0.0], [-1.0, -1.0, -3.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]] and stop.tolist() == [
        2,
        NO_STOP,
    ]
    with pytest.raises(ValueError, match="one log-prob per token"):
        pack_rows([[5, 2]], [[-1.0]], [2], pad_id=0)


def test_vllm_engine_module_loads_without_vllm_and_its_wire_format_round_trips():
    from services.rollout.vllm_engine import prompt_seed
    from services.rollout.vllm_weights import from_wire, to_wire, weight_chunks

    # vLLM is imported only when an engine is built, so importing the module needs no vLLM.
    probe = "import sys, services.rollout.vllm_engine; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, generator=gen),
        "b": torch.randn(5, generator=gen).to(torch.bfloat16),
        "c": torch.arange(6).reshape(2, 3),
        "d": torch.zeros(0, 2),
    }
    for name, t in tensors.items():
        back_name, back = from_wire(to_wire(name, t))
        assert back_name == name and back.dtype == t.dtype and torch.equal(back, t)
    chunks = list(weight_chunks(tensors.items(), max_bytes=50))
    # 48 bytes; 48 + 10 > 50 starts a chunk; 10 + 48 > 50 starts one; the empty one joins it.
    assert [[w[0] for w in c] for c in chunks] == [["a"], ["b"], ["c", "d"]]
    # Samples of one call never share a seed: prompt i's n samples use seeds s_i .. s_i + n - 1.
    n = 8
    seeds = {prompt_seed(3, i, n) + j for i in range(50) for j in range(n)}
    assert len(seeds) == 50 * n


def test_weight_group_options_come_from_the_config_once_and_cross_the_wire(model, tmp_path):
    """The vLLM weight path's one options type: what the workers' receiver is built with, and
    which receiver a rollout actor gets for each engine and transport."""
    import inspect

    from services.rollout.vllm_engine import VLLMRolloutEngine
    from services.rollout.vllm_weights import WeightGroupOptions, rollout_receiver
    from services.weightsync.collective import CollectivePublisher, CollectiveReceiver
    from services.weightsync.config import WeightSyncConfig
    from services.weightsync.files import FilesReceiver

    ws = WeightSyncConfig(
        transport="collective",
        path=tmp_path,
        timeout_s=12.0,
        sample_every=3,
        sample_elements=64,
        engine_digest=True,
    )
    opts = WeightGroupOptions.from_config(ws, "10.0.0.1:2345")
    assert opts == WeightGroupOptions("10.0.0.1:2345", str(tmp_path), 12.0, 3, 64, True)
    assert WeightGroupOptions("a:1", catchup_dir=tmp_path).catchup_dir == str(tmp_path)
    assert WeightGroupOptions.from_wire(opts.to_wire()) == opts
    kwargs = opts.receiver_kwargs()
    assert kwargs == {
        "catchup_dir": str(tmp_path),
        "timeout_s": 12.0,
        "sample_every": 3,
        "sample_elements": 64,
    }
    assert set(kwargs) <= set(inspect.signature(CollectiveReceiver).parameters)
    with pytest.raises(ValueError, match="bogus"):
        WeightGroupOptions.from_wire({**opts.to_wire(), "bogus": 1})

    # The HF engine's actor receives the weights itself; vLLM's workers join the group, which
    # needs the rendezvous (given, or looked up in Redis).
    hf = HFRolloutEngine(model, TOK)
    files = WeightSyncConfig(transport="files", path=tmp_path)
    assert isinstance(rollout_receiver(hf, files, "ns", "rollout-0"), FilesReceiver)
    assert not hf.joins_weight_group and VLLMRolloutEngine.joins_weight_group
    unbuilt = VLLMRolloutEngine.__new__(VLLMRolloutEngine)  # no vLLM here: never started
    with pytest.raises(ValueError, match="weight_sync.rendezvous"):
        rollout_receiver(unbuilt, ws, "ns", "rollout-0")
    pub = CollectivePublisher(catchup_every=0)
    try:
        given = ws.model_copy(update={"rendezvous": pub.address})
        receiver = rollout_receiver(hf, given, "ns", "rollout-0")
        assert isinstance(receiver, CollectiveReceiver)
        receiver.close()
        with pytest.raises(RuntimeError, match="not running"):  # it asked its workers to join
            rollout_receiver(unbuilt, given, "ns", "rollout-0")
    finally:
        pub.close()
