"""The rollout engine against transformers `generate` and the model's own distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo import GRPOConfig
from grpo.logprobs import completion_logps
from grpo.rollout import RolloutEngine, TransformersGenerator, sampling
from grpo.rollout.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
)

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2


class Tokenizer:
    pad_token_id, eos_token_id = PAD, EOS


def make_model(arch: str, eos_scale: float = 6.0) -> torch.nn.Module:
    """A random model whose EOS logit is boosted so that completions end at varied lengths."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=PAD,
                  bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    with torch.no_grad():
        model.lm_head.weight[EOS] *= eos_scale
    return model.eval()


PROMPTS = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 10, 11, 12, 13, 14, 15, 16, 17], [BOS, 20, 21]]


def config(**kwargs) -> GRPOConfig:
    settings = dict(num_generations=4, per_device_train_batch_size=16, max_completion_length=24)
    settings.update(kwargs)
    return GRPOConfig(**settings)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(arch):
    model = make_model(arch)
    args = config(generation_kwargs={"do_sample": False})
    ours = RolloutEngine(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 4)
    reference = TransformersGenerator(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 4)
    width = reference.completion_mask.sum(1).max()
    assert ours.completion_ids.size(1) == width
    torch.testing.assert_close(ours.completion_ids, reference.completion_ids[:, :width], rtol=0, atol=0)
    torch.testing.assert_close(ours.completion_mask, reference.completion_mask[:, :width], rtol=0, atol=0)
    assert torch.equal(ours.is_eos, reference.is_eos)
    lengths = ours.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # uneven completions: some rows left the batch early
    assert torch.equal(ours.prompt_ids, reference.prompt_ids)


def test_rows_stop_at_eos_and_masks_are_right():
    model = make_model("llama")
    out = RolloutEngine(Tokenizer(), config().sampling_params, seed=1).generate(model, PROMPTS, 4)
    lengths = out.completion_mask.sum(1)
    assert out.is_eos.any() and (~out.is_eos).any()
    for row, length in enumerate(lengths.tolist()):
        ids = out.completion_ids[row]
        assert torch.equal(out.completion_mask[row, :length], torch.ones(length, dtype=torch.long))
        assert (ids[length:] == PAD).all()  # nothing after the end
        assert not (ids[: length - 1] == EOS).any()  # no EOS before the last token
        assert bool(ids[length - 1] == EOS) == bool(out.is_eos[row])
        if not out.is_eos[row]:
            assert length == 24  # only rows that hit max_completion_length lack an EOS


class SamplingRecorder:
    """Records, from the engine's own calls, the distribution each decode step sampled from and how the rows still
    decoding were reordered when some finished, so that `logps` can tell each sampled token's log-probability."""

    def __init__(self, monkeypatch):
        from grpo.rollout import engine

        self.events = []
        sample, keep = engine.sample_and_measure, engine.fill_from_the_end

        def recording_sample(processed, params, generator, measure=True):
            tokens, measured = sample(processed, params, generator, measure)
            self.events.append(("step", processed.log_softmax(-1), tokens))
            return tokens, measured

        def recording_keep(finished):
            order = keep(finished)
            self.events.append(("keep", order))
            return order

        monkeypatch.setattr(engine, "sample_and_measure", recording_sample)
        monkeypatch.setattr(engine, "fill_from_the_end", recording_keep)

    def logps(self, generation) -> torch.Tensor:
        """(rows, completion length) log-probs of the sampled tokens under the sampling distribution (0 after a
        completion's end), for a generation made in one chunk; the record starts afresh."""
        logps = torch.zeros(generation.completion_ids.shape)
        active, step = torch.arange(len(logps)), 0  # the original row of each row still decoding
        for event in self.events:
            if event[0] == "keep":
                active = active[event[1]]
            else:
                logps[active, step] = event[1].gather(1, event[2].unsqueeze(1)).squeeze(1)
                step += 1
        self.events = []
        return logps


def test_sampled_tokens_have_the_log_probs_of_a_separate_forward_pass(monkeypatch):
    """The KV-cached decode with rows leaving the batch samples from the model's own distribution."""
    model = make_model("qwen2")
    recorder = SamplingRecorder(monkeypatch)
    out = RolloutEngine(Tokenizer(), config(temperature=0.7).sampling_params, seed=2).generate(model, PROMPTS, 4)
    sampled = recorder.logps(out)
    logps, _ = completion_logps(model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask,
                                temperature=0.7)
    mask = out.completion_mask.bool()
    assert out.completion_mask.sum(1).min() < out.completion_mask.sum(1).max()  # rows left the batch early
    torch.testing.assert_close(sampled[mask], logps[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(sampling.kernel() is None, reason="no C compiler: torch's sampler measures no entropy")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_sampler_measures_the_log_probs_and_entropy_a_forward_pass_gives(arch):
    """Each token's log-prob and entropy of softmax(logits / T) as the sampler drew it are a separate forward
    pass's (pi_old's log-probs, the `entropy` the trainer logs), 0 past each row's end; none where anything but the
    temperature reshapes the distribution."""
    model = make_model(arch)
    out = RolloutEngine(Tokenizer(), config(temperature=0.7).sampling_params, seed=2).generate(model, PROMPTS, 4)
    logps, entropy = completion_logps(model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                      out.completion_mask, temperature=0.7, with_entropy=True)
    mask = out.completion_mask.bool()
    assert out.completion_mask.sum(1).min() < out.completion_mask.sum(1).max()  # rows left the batch early
    torch.testing.assert_close(out.entropies[mask], entropy[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logps[mask], logps[mask], atol=1e-5, rtol=1e-5)
    assert out.entropies[~mask].eq(0).all() and out.logps[~mask].eq(0).all()
    assert entropy[mask].std() > 1e-3 and logps[mask].std() > 0.1  # far above the tolerance
    for reshaped in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.2),
                     dict(generation_kwargs={"suppress_tokens": [3]}),
                     dict(generation_kwargs={"no_repeat_ngram_size": 2}), dict(generation_kwargs={"do_sample": False})):
        engine = RolloutEngine(Tokenizer(), config(**reshaped).sampling_params)
        out = engine.generate(model, PROMPTS[:2], 2)
        assert out.entropies is None and out.logps is None, reshaped


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(min_p=0.2)])
def test_first_tokens_follow_the_model_distribution(settings):
    """Pearson chi-square of 6000 first tokens against the processed model distribution (fixed seed)."""
    model = make_model("llama", eos_scale=1.0)
    args = config(max_completion_length=1, **settings)
    samples = 6000
    out = RolloutEngine(Tokenizer(), args.sampling_params, seed=3).generate(model, [PROMPTS[0]], samples)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=VOCAB).double()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    probs = process_logits(logits.unsqueeze(0), args.sampling_params).softmax(-1)[0].double()
    assert counts[probs == 0].sum() == 0  # filtered tokens are never sampled
    support = probs > 0
    expected = probs[support] * samples
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    assert statistic < dof + 5 * (2 * dof) ** 0.5  # far in the tail of chi2(dof) if the sampler were wrong
    # and the test has power: a sampler from the unprocessed distribution would fail whenever filtering applies


def test_same_seed_same_rollout_and_different_seed_differs():
    model = make_model("llama")
    first = RolloutEngine(Tokenizer(), config().sampling_params, seed=5).generate(model, PROMPTS, 4)
    again = RolloutEngine(Tokenizer(), config().sampling_params, seed=5).generate(model, PROMPTS, 4)
    other = RolloutEngine(Tokenizer(), config().sampling_params, seed=6).generate(model, PROMPTS, 4)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids[:, :5], other.completion_ids[:, :5])


def test_chunked_generation_gives_the_same_greedy_rows():
    model = make_model("qwen2")
    args = config(generation_kwargs={"do_sample": False})
    whole = RolloutEngine(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 4)
    chunked = RolloutEngine(Tokenizer(), args.sampling_params, max_batch_rows=4).generate(model, PROMPTS, 4)
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert torch.equal(whole.prompt_ids, chunked.prompt_ids)


def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch):
    model = make_model("llama")
    engine = RolloutEngine(Tokenizer(), config(generation_kwargs={"do_sample": False}).sampling_params)
    real = engine._generate_chunk
    chunk_sizes = []

    def tight_memory(model, decoder, prompt_ids, g, turn):
        chunk_sizes.append(len(prompt_ids))
        if len(prompt_ids) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(model, decoder, prompt_ids, g, turn)

    monkeypatch.setattr(engine, "_generate_chunk", tight_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = engine.generate(model, PROMPTS, 4)
    greedy = config(generation_kwargs={"do_sample": False}).sampling_params
    expected = RolloutEngine(Tokenizer(), greedy).generate(model, PROMPTS, 4)
    assert chunk_sizes[:3] == [4, 2, 1]
    assert torch.equal(out.completion_ids, expected.completion_ids)


def test_filters_match_transformers_processors():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    ids = torch.randint(0, VOCAB, (6, 10))
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    torch.testing.assert_close(top_k_filter(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    torch.testing.assert_close(top_p_filter(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))
    torch.testing.assert_close(min_p_filter(logits, 0.1), MinPLogitsWarper(0.1)(ids, logits.clone()))


def test_generation_kwargs_override_and_search_kwargs_switch_to_generate():
    params = config(temperature=0.9, generation_kwargs={"temperature": 0.5, "top_k": 3}).sampling_params
    assert params.temperature == 0.5 and params.top_k == 3
    with pytest.warns(UserWarning, match=r"\['num_beams'\] need transformers' generate"):
        assert config(generation_kwargs={"num_beams": 2}).generation_backend == "transformers"
    assert config(generation_kwargs={"num_beams": 1}).generation_backend == "engine"  # the neutral value


# generation_kwargs the engine runs through transformers' processors, each chosen to change greedy decoding of
# make_model("llama") (checked below), with a repetition penalty on so that its per-row state is compacted too.
# typical_p and epsilon_cutoff sample, but leave one token, so sampling is deterministic.
PROCESSOR_KWARGS = {
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1, "repetition_penalty": 1.0},  # the penalty hides repeats
    "bad_words_ids": {"bad_words_ids": [[33], [46, 47]]},  # a token, and a two-token sequence
    "min_new_tokens": {"min_new_tokens": 10},
    "min_length": {"min_length": 14},
    "sequence_bias": {"sequence_bias": {(3,): 4.0, (9, 3): -6.0}},  # a token, and a token after another
    "begin_suppress_tokens": {"begin_suppress_tokens": [17, 42, 60]},  # first tokens without it
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (1, 2.0)},
    "forced_eos_token_id": {"forced_eos_token_id": 2, "min_new_tokens": 99},  # EOS only at the last step
    "typical_p": {"do_sample": True, "typical_p": 1e-4},
    "epsilon_cutoff": {"do_sample": True, "epsilon_cutoff": 0.5, "temperature": 3.0},
}


@pytest.mark.parametrize("name", sorted(PROCESSOR_KWARGS))
def test_generation_kwargs_run_inside_the_engine_exactly_as_generate(name):
    """Each keyword through the engine's transformers processors gives generate's tokens, rows leaving the batch
    at different steps (their token history and the processors' per-row state compacted with them)."""
    model = make_model("llama")
    kwargs = {"do_sample": False} | PROCESSOR_KWARGS[name]
    # the same settings without the keyword under test, greedy (typical_p and epsilon_cutoff sample)
    base = {k: v for k, v in kwargs.items() if k != name} | {"do_sample": False}
    outputs = []
    for settings in (kwargs, base):
        args = config(generation_kwargs=settings, repetition_penalty=1.3)
        assert args.generation_backend == "engine"
        ours = RolloutEngine(Tokenizer(), args.sampling_params, seed=0).generate(model, PROMPTS, 2)
        reference = TransformersGenerator(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 2)
        width = ours.completion_ids.size(1)
        assert torch.equal(ours.completion_mask, reference.completion_mask[:, :width])
        assert torch.equal(ours.completion_ids * ours.completion_mask, reference.completion_ids[:, :width]
                           * ours.completion_mask)
        assert torch.equal(ours.is_eos, reference.is_eos)
        outputs.append(ours)
    with_kwarg, without = outputs
    changed = not (with_kwarg.completion_ids.shape == without.completion_ids.shape
                   and torch.equal(with_kwarg.completion_ids, without.completion_ids))
    assert changed or name == "epsilon_cutoff", f"{name} changed nothing"  # epsilon: here only the top token is left
    lengths = with_kwarg.completion_mask.sum(1)
    # rows left the batch at different steps, except where the keyword makes them all run to the limit
    assert lengths.min() < lengths.max() or name in ("min_length", "forced_eos_token_id", "sequence_bias", "typical_p")


def test_stop_strings_end_rows_inside_the_engine_as_in_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(text).input_ids for text in ("hello", "a longer prompt", "x")]
    # greedy, this model writes "jjjj...", "tttt..." and "xxxRRRR..." after these prompts
    args = config(generation_kwargs={"do_sample": False, "stop_strings": ["jj", "R"]}, max_completion_length=16)
    ours = RolloutEngine(tokenizer, args.sampling_params).generate(model, prompts, 2)
    reference = TransformersGenerator(tokenizer, args.sampling_params).generate(model, prompts, 2)
    lengths = ours.completion_mask.sum(1)
    assert lengths.tolist() == [2, 2, 16, 16, 4, 4]  # "jj" spans two tokens; "R" ends "xxxR"
    assert ours.is_eos.tolist() == [True, True, False, False, True, True]  # ended, not truncated
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(ours.completion_ids[row, :length], reference.completion_ids[row, :length])


def test_both_backends_take_the_same_sampling_settings():
    """One SamplingParams from the config: the engine samples with it, transformers generate gets it as kwargs,
    and generation_kwargs the engine does not know pass through to generate."""
    args = config(temperature=0.9, top_p=0.8, generation_kwargs={"top_k": 3, "max_new_tokens": 5, "num_beams": 2},
                  generation_backend="transformers")
    params = args.sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.9, 0.8, 3, 5)
    assert params.other_generation_kwargs == {"num_beams": 2}
    assert RolloutEngine(Tokenizer(), params).params is params
    kwargs = TransformersGenerator(Tokenizer(), params).generate_kwargs
    assert kwargs == dict(do_sample=True, max_new_tokens=5, temperature=0.9, top_p=0.8, top_k=3, min_p=None,
                          repetition_penalty=1.0, pad_token_id=PAD, eos_token_id=[EOS], use_cache=True, num_beams=2)
    defaults = TransformersGenerator(Tokenizer(), config().sampling_params).generate_kwargs
    assert defaults["top_k"] is None and defaults["max_new_tokens"] == 24 and "suppress_tokens" not in defaults


def test_an_architecture_without_rotary_embeddings_gpt2_matches_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 6.0  # tied to the input embedding here, which is fine for generation
    args = config(generation_kwargs={"do_sample": False})
    ours = RolloutEngine(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 2)
    reference = TransformersGenerator(Tokenizer(), args.sampling_params).generate(model, PROMPTS, 2)
    width = ours.completion_ids.size(1)
    assert torch.equal(ours.completion_ids, reference.completion_ids[:, :width])
    assert torch.equal(ours.completion_mask, reference.completion_mask[:, :width])


def test_fill_from_the_end_moves_only_as_many_rows_as_finished():
    from grpo.rollout.engine import PreallocatedLayer, fill_from_the_end

    finished = torch.tensor([False, True, False, False, True, False, False])
    # 5 rows stay: holes at 1 and 4 are filled by the live rows above 5 (5 and 6); rows 0, 2, 3 do not move
    assert fill_from_the_end(finished).tolist() == [0, 5, 2, 3, 6]
    assert fill_from_the_end(torch.tensor([False, False, True])).tolist() == [0, 1]  # the last row just leaves
    assert fill_from_the_end(torch.tensor([True, True])).tolist() == []

    layer = PreallocatedLayer(capacity=4)
    keys = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 1, 2, 1).contiguous()
    layer.update(keys, keys + 100)
    copies = []
    original = torch.Tensor.__setitem__

    def counting(self, index, value):
        copies.append(value.shape[0] if torch.is_tensor(value) and value.dim() == 4 else 0)
        return original(self, index, value)

    keep = fill_from_the_end(finished)
    torch.Tensor.__setitem__ = counting
    try:
        layer.batch_select_indices(keep)
    finally:
        torch.Tensor.__setitem__ = original
    assert copies == [2]  # two rows of keys and values, not the five kept
    assert layer.keys[:, 0, 0, 0].tolist() == [0, 5, 2, 3, 6]
    assert layer.values[:, 0, 1, 0].tolist() == [100, 105, 102, 103, 106]


def test_long_prompts_share_their_cache_and_sample_the_same_tokens(monkeypatch):
    """Prompts of 64+ tokens decode over one copy of each prompt's cache (GroupKV, on CPU): sampled rows that
    end at different steps get the same tokens and log-probs as decoding through transformers' forward."""
    from grpo.rollout.kv_cache import GroupKV

    model = make_model("qwen2")
    generator = torch.Generator().manual_seed(3)
    prompts = [[BOS] + torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (70, 90, 64)]
    calls = []
    original = GroupKV.from_prefill.__func__
    monkeypatch.setattr(GroupKV, "from_prefill",
                        classmethod(lambda cls, *a, **k: calls.append(1) or original(cls, *a, **k)))
    args = config(max_completion_length=16)
    recorder = SamplingRecorder(monkeypatch)
    shared = RolloutEngine(Tokenizer(), args.sampling_params, seed=4).generate(model, prompts, 4)
    shared_logps = recorder.logps(shared)
    assert calls
    plain = RolloutEngine(Tokenizer(), args.sampling_params, seed=4, lean=False).generate(model, prompts, 4)
    lengths = shared.completion_mask.sum(1)
    assert lengths.min() < lengths.max()
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    torch.testing.assert_close(shared_logps, recorder.logps(plain), rtol=1e-4, atol=1e-5)
