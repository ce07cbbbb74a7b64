"""Chunked log-probs from hidden states against the plain full-logits computation."""

from __future__ import annotations

import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import grpo.logprobs as logprobs
from grpo.logprobs import completion_logps, completion_logps_in_chunks
from grpo.models import lm_body_and_head

VOCAB, TEMPERATURE = 300, 0.7
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":  # untied head
        return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False))
    if arch == "llama_bias":  # a head with a bias, as phi's
        model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False))
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        return model
    if arch == "qwen2":  # tied embeddings
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    if arch == "gemma2":  # soft-capped logits
        return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0))
    raise ValueError(arch)


def batch(repeats: int = 1) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts of uneven lengths; completions of lengths 7, 4, 6, 1 padded to 7; `repeats` x 4 rows."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    for row, pad in enumerate([0, 2, 5, 3]):
        prompt_mask[row, :pad] = 0
        prompt_ids[row, :pad] = 0
    completion_ids = torch.randint(3, VOCAB, (4, 7), generator=g)
    completion_mask = (torch.arange(7) < torch.tensor([7, 4, 6, 1]).unsqueeze(1)).long()
    completion_ids[completion_mask == 0] = 0
    return tuple(t.repeat(repeats, 1) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask))


def reference(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """The plain computation: full logits, log_softmax, gather; entropy -sum p log p."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp_all = torch.log_softmax(logits[:, -completion_ids.size(1) - 1:-1].float() / temperature, -1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return logps, -(logp_all.exp() * logp_all).sum(-1)


def objective(logps, entropy, mask, entropy_coef=0.0):
    """A loss whose gradient weights tokens unevenly, so a wrong token or scale shows in the gradients."""
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view(mask.shape)
    return ((weights * logps + logps.exp() + entropy_coef * entropy) * mask).sum()


def values_and_grads(model, fn, entropy_coef=0.0):
    model.zero_grad(set_to_none=True)
    mask = batch()[3].bool()
    logps, entropy = fn()
    objective(logps, entropy, mask, entropy_coef).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps[mask].detach(), entropy[mask].detach(), grads


def assert_same(ours, theirs, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(ours[0], theirs[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(ours[1], theirs[1], atol=atol, rtol=rtol)
    assert ours[2].keys() == theirs[2].keys() and ours[2]
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], atol=atol, rtol=rtol, msg=name)


def chunk_bytes(tokens: int) -> int:
    return tokens * 4 * VOCAB


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_bias"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 10_000])  # 18 completion tokens: 5 and 7 leave a remainder
def test_chunked_logps_entropy_and_gradients_equal_full_logits(arch, chunk_tokens):
    model = make_model(arch)
    assert lm_body_and_head(model) is not None
    ours = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                            chunk_bytes=chunk_bytes(chunk_tokens)))
    theirs = values_and_grads(model, lambda: reference(model, *batch(), TEMPERATURE))
    assert "lm_head.weight" in ours[2] or "model.embed_tokens.weight" in ours[2]
    assert_same(ours, theirs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_entropy_gradient_for_the_entropy_bonus(arch):
    model = make_model(arch)
    ours = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                            entropy_grad=True, chunk_bytes=chunk_bytes(5)),
                            entropy_coef=0.3)
    theirs = values_and_grads(model, lambda: reference(model, *batch(), TEMPERATURE), entropy_coef=0.3)
    assert_same(ours, theirs)


def test_no_grad_passes_match_and_padding_reads_zero():
    model = make_model("llama")
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch()
    with torch.no_grad():
        logps, entropy = completion_logps(model, *batch(), TEMPERATURE, with_entropy=True, chunk_bytes=chunk_bytes(3))
        ref_logps, ref_entropy = reference(model, *batch(), TEMPERATURE)
    mask = completion_mask.bool()
    torch.testing.assert_close(logps[mask], ref_logps[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], atol=1e-5, rtol=1e-5)
    assert (logps[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert logps.dtype == torch.float32 and logps.shape == completion_ids.shape

    class Round:  # the rollout fields completion_logps_in_chunks reads
        def __init__(self):
            self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask = batch()

        def __len__(self):
            return 4

    chunked_rows = completion_logps_in_chunks(model, Round(), TEMPERATURE, chunk_rows=3)
    torch.testing.assert_close(chunked_rows[mask], ref_logps[mask], atol=1e-5, rtol=1e-5)


def test_chunk_size_follows_the_memory_budget(monkeypatch):
    model = make_model("llama")
    sizes = []
    real_chunks = logprobs._chunks

    def recording_chunks(hidden, targets, size):
        sizes.append(size)
        return real_chunks(hidden, targets, size)

    monkeypatch.setattr(logprobs, "_chunks", recording_chunks)
    completion_logps(model, *batch(), chunk_bytes=4 * VOCAB * 6 + 100)
    assert sizes == [6]  # budget / (4 bytes x vocab) tokens per chunk


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_full_logits_tensor_never_exists(grad):
    model = make_model("llama")
    inputs = batch(repeats=4)
    full_logits = inputs[2].numel() * VOCAB  # B x C x V, well above the LM head's V x H elements
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def run(**kwargs):
        with torch.set_grad_enabled(grad), LargestTensor() as mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logps, entropy = completion_logps(model, *inputs, TEMPERATURE, with_entropy=True, **kwargs)
            if grad:
                objective(logps, entropy, inputs[3].bool()).backward()
        return mode.largest

    assert run(chunk_bytes=chunk_bytes(4)) < full_logits / 2  # forward and backward
    assert not saved or max(saved) < full_logits / 2
    assert run(chunked=False) >= full_logits  # the check does see a full logits tensor


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_model_chunked_equals_full(targets):
    model = make_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    assert lm_body_and_head(model) is not None
    ours = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                            chunk_bytes=chunk_bytes(5)))
    theirs = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                              chunked=False))
    assert ours[2] and all("lora_" in name for name in ours[2])
    assert_same(ours, theirs)
    with model.disable_adapter(), torch.no_grad():  # the reference model of a LoRA run
        off, _ = completion_logps(model, *batch(), TEMPERATURE, chunk_bytes=chunk_bytes(5))
        base, _ = reference(model.get_base_model(), *batch(), TEMPERATURE)
    mask = batch()[3].bool()
    torch.testing.assert_close(off[mask], base[mask], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_full_logits_under_autocast():
    model = make_model("qwen2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                                chunk_bytes=chunk_bytes(5)))
        theirs = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True,
                                                                  chunked=False))
    assert_same(ours, theirs, atol=2e-2, rtol=2e-2)


def test_soft_capped_model_takes_the_full_logits_path():
    model = make_model("gemma2")
    assert lm_body_and_head(model) is None
    ours = values_and_grads(model, lambda: completion_logps(model, *batch(), TEMPERATURE, with_entropy=True))
    theirs = values_and_grads(model, lambda: reference(model, *batch(), TEMPERATURE))
    assert_same(ours, theirs)


def test_rows_without_completion_tokens_keep_a_graph():
    model = make_model("llama")
    prompt_ids, prompt_mask, completion_ids, _ = batch()
    logps, _ = completion_logps(model, prompt_ids, prompt_mask, completion_ids, torch.zeros_like(completion_ids))
    assert (logps == 0).all()
    logps.sum().backward()  # an all-padding micro-batch must not break the backward pass


@pytest.mark.parametrize("chunk_tokens, keep_probs, backward_head_passes",
                         [(10_000, False, 0), (5, False, 4), (5, True, 0)])
def test_backward_recomputes_the_logits_only_where_they_were_not_kept(monkeypatch, chunk_tokens, keep_probs,
                                                                     backward_head_passes):
    """The forward keeps softmax(z / T) of every chunk for backward with `keep_probs` or where all N = 17 tokens
    fit in one chunk; otherwise the backward recomputes each chunk. Gradients equal autograd's through the full
    logits either way."""
    calls = []
    original = logprobs._linear_logits
    monkeypatch.setattr(logprobs, "_linear_logits", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(17, 8, requires_grad=True)
    targets, weights = torch.randint(0, 50, (17,)), torch.randn(17)
    logps, _ = logprobs.token_logps(hidden, head, targets, 0.7, chunk_tokens, keep_probs=keep_probs)
    forward_passes = len(calls)
    (logps * weights).sum().backward()
    assert forward_passes == -(-17 // min(chunk_tokens, 17))
    assert len(calls) - forward_passes == backward_head_passes
    grads = [hidden.grad, head.weight.grad, head.bias.grad]
    hidden.grad = head.weight.grad = head.bias.grad = None
    expected = torch.log_softmax(head(hidden) / 0.7, -1).gather(1, targets[:, None]).squeeze(1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logps, expected.detach())
    for grad, autograd in zip(grads, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(grad, autograd)


class NewWeightShaped(TorchDispatchMode):
    """Counts fresh tensors of a given shape (outputs of out-of-place ops) while active."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.__name__.split(".")[0].endswith("_"):
            self.count += sum(isinstance(t, torch.Tensor) and t.shape == self.shape
                              for t in (out if isinstance(out, (tuple, list)) else [out]))
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_bias"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_head_and_embedding_gradients_added_in_place_equal_autograd(arch, checkpointing):
    """grads_in_place adds the head's and the input embedding's dL/dW into their weight.grad itself (tied
    embeddings: both into the same one): over two accumulated backward passes every gradient equals autograd's,
    and the second backward creates no (V, H) tensor at all, where autograd creates the head's gradient and the
    lookup's dense one (and their sum, tied)."""
    model = make_model(arch)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    head = model.get_output_embeddings()

    def accumulate(in_place):
        model.zero_grad(set_to_none=True)
        counts = []
        for repeats in (1, 2):
            inputs = batch(repeats)
            logps, _ = completion_logps(model, *inputs, TEMPERATURE, chunk_bytes=chunk_bytes(5),
                                        grads_in_place=in_place)
            with NewWeightShaped(head.weight.shape) as mode:
                objective(logps, torch.zeros_like(logps), inputs[3].bool()).backward()
            counts.append(mode.count)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, counts

    ours, our_counts = accumulate(True)
    theirs, their_counts = accumulate(False)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    assert our_counts[1] == 0 and their_counts[1] == (3 if arch == "qwen2" else 2)


def test_head_gradient_goes_through_autograd_where_the_weight_has_hooks():
    """A hook on the head's weight (as DDP's and DeepSpeed's are) must see its gradient: grads_in_place then
    leaves the accumulation to autograd."""
    model = make_model("llama")
    head = model.get_output_embeddings()
    seen = []
    head.weight.register_post_accumulate_grad_hook(lambda weight: seen.append(weight.grad.clone()))
    logps, _ = completion_logps(model, *batch(), TEMPERATURE, grads_in_place=True)
    objective(logps, torch.zeros_like(logps), batch()[3].bool()).backward()
    assert len(seen) == 1 and torch.equal(seen[0], head.weight.grad) and seen[0].abs().sum() > 0
    assert not logprobs._adds_grad_in_place(head.weight, torch.float32)
    assert not logprobs._adds_grad_in_place(model.model.embed_tokens.weight, torch.bfloat16)  # autocast's dtype


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_token_embedding_adds_its_rows_into_grad(padding_idx):
    """_TokenEmbedding equals nn.Embedding forward and backward (repeated ids, padding_idx's row left alone, an
    existing .grad added to), and its sum does not depend on the number of threads (runs stay bit-identical)."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(11, 6, padding_idx=padding_idx)
    ids = torch.tensor([[2, 5, 5, 1], [2, 2, 7, 5]])
    upstream = torch.randn(2, 4, 6)
    (embedding(ids) * upstream).sum().backward()
    (embedding(ids) * upstream).sum().backward()
    expected = embedding.weight.grad.clone()

    def ours(threads):
        embedding.weight.grad = None
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(2):
                out = logprobs._embed_adding_in_place(embedding, ids)
                torch.testing.assert_close(out, embedding(ids), rtol=0, atol=0)
                (out * upstream).sum().backward()
        finally:
            torch.set_num_threads(previous)
        return embedding.weight.grad.clone()

    one, two = ours(1), ours(2)
    torch.testing.assert_close(one, expected)
    assert torch.equal(one, two)
    if padding_idx is not None:
        assert (one[padding_idx] == 0).all()


def test_embedding_goes_through_autograd_where_it_is_not_a_plain_lookup():
    """Only a hook-free nn.Embedding of a Llama-family decoder is computed by _TokenEmbedding: a forward hook
    (NEFTune adds noise from one), another embedding class or another model type keep the module's own forward."""
    body = lm_body_and_head(make_model("llama"))[0]
    assert logprobs._embedding_adding_in_place(body) is body.embed_tokens
    handle = body.embed_tokens.register_forward_hook(lambda module, args, out: out)
    assert logprobs._embedding_adding_in_place(body) is None
    handle.remove()
    checkpointed = make_model("llama")  # transformers adds a hook that only sets requires_grad: kept
    checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    assert checkpointed.model.embed_tokens._forward_hooks
    assert logprobs._embedding_adding_in_place(checkpointed.model) is checkpointed.model.embed_tokens
    gemma = make_model("gemma2").model
    assert logprobs._embedding_adding_in_place(gemma) is None  # not of the Llama family
    body.embed_tokens.weight.requires_grad_(False)
    assert logprobs._embedding_adding_in_place(body) is None


@pytest.mark.parametrize("keep_probs", [False, True])
def test_softmax_statistics_block_by_block(monkeypatch, keep_probs):
    """_softmax_stats over blocks of 3 rows (7 rows: a remainder) equals log_softmax, its entropy and softmax."""
    monkeypatch.setattr(logprobs, "SOFTMAX_BLOCK_BYTES", 3 * 4 * 50)
    torch.manual_seed(0)
    logits, targets = 4 * torch.randn(7, 50), torch.randint(0, 50, (7,))
    logp_all = torch.log_softmax(logits, 1)
    logp, entropy, lse, probs = logprobs._softmax_stats(logits.clone(), targets, keep_probs=keep_probs)
    torch.testing.assert_close(logp, logp_all.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))
    if keep_probs:
        torch.testing.assert_close(probs, logp_all.exp())
    else:
        assert probs is None


def test_the_head_keeps_its_probabilities_where_the_layers_keep_their_activations(monkeypatch):
    """completion_logps keeps every chunk's probabilities without gradient checkpointing (no recomputation in
    the backward) and only one chunk's worth with it."""
    seen = []
    original = logprobs.token_logps
    monkeypatch.setattr(logprobs, "token_logps", lambda *a, **k: seen.append(k["keep_probs"]) or original(*a, **k))
    torch.manual_seed(0)
    model = make_model("llama")
    model.train()
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        completion_logps(model, *batch(), chunk_bytes=chunk_bytes(3))
    assert seen == [True, False]  # 18 completion tokens in chunks of 3: all kept without checkpointing only
