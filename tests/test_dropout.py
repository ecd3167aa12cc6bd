"""Tests for bert_accum.controls.dropout: standard / off / batch-invariant dropout on BERT (CPU, tiny models, seconds)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import bert_accum.controls.dropout as D
from bert_accum.controls.dropout import (
    ATTENTION_NAME,
    DropoutController,
    InvariantDropout,
    InvariantDropoutContext,
    SiteKind,
    keep_mask,
    reference_keep_bit,
    site_id,
)

VOCAB = 64
NUM_LABELS = 3


def tiny_config(**overrides) -> BertConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=NUM_LABELS,
    )
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**overrides))


def tiny_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config())


def make_examples(n: int, min_len: int = 5, max_len: int = 16, seed: int = 0):
    """n examples (token lists of varying length, label) with deterministic content."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        tokens = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        label = int(torch.randint(0, NUM_LABELS, (1,), generator=g))
        examples.append((tokens, label))
    return examples


def collate(examples, pad_to: int | None = None):
    """Right-pad to pad_to (or the longest); returns input_ids, attention_mask, labels."""
    length = max(len(t) for t, _ in examples) if pad_to is None else pad_to
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i, (tokens, _) in enumerate(examples):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    labels = torch.tensor([label for _, label in examples])
    return ids, mask, labels


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bits_of(mask: torch.Tensor) -> int:
    value = 0
    for i, bit in enumerate(mask.reshape(-1).tolist()):
        value |= int(bit) << i
    return value


# ------------------------------------------------------------------------------------------------
# The hash itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trailing", [(40,), (6, 9), (3, 5, 7)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_torch_int64_hash_matches_pure_python_reference(trailing, p):
    """Pins torch's int64 semantics (wrapping multiply/add, shifts made logical by masking)."""
    ids = torch.tensor([0, 1, 7, 123456789, 2**40 + 3, 2**62 + 11, -1, -(2**63)])
    seed, epoch, site = 987654321, 5, site_id(SiteKind.ATTN_PROBS, 3)
    got = keep_mask(seed, ids, epoch, site, trailing, p)
    assert got.shape == (len(ids), *trailing) and got.dtype == torch.bool
    for b, ex in enumerate(ids.tolist()):
        for index in torch.cartesian_prod(*[torch.arange(n) for n in trailing]).reshape(-1, len(trailing)).tolist():
            assert bool(got[(b, *index)]) == reference_keep_bit(seed, ex, epoch, site, tuple(index), p), (ex, index)


def test_high_positions_and_large_seeds_match_reference():
    ids = torch.tensor([3, 2**50])
    seed, epoch, site = 2**64 - 1, 2**33, site_id(SiteKind.HEAD, 1023)
    got = keep_mask(seed, ids, epoch, site, (2, 600), 0.3)
    for b, ex in enumerate(ids.tolist()):
        for index in [(0, 0), (1, 599), (1, 511), (0, 257)]:
            assert bool(got[(b, *index)]) == reference_keep_bit(seed, ex, epoch, site, index, 0.3)


def test_regression_fixture_cpu_bits():
    """64 keep bits for a fixed (seed, example, epoch, site), recorded once. Changing the hash breaks this."""
    m = keep_mask(20240611, torch.tensor([7]), 3, site_id(SiteKind.ATTN_PROBS, 1), (1, 8, 8), 0.5)
    assert bits_of(m) == 0x824EA549097FE522
    m = keep_mask(20240611, torch.tensor([7]), 3, site_id(SiteKind.FFN_OUTPUT, 0), (4, 16), 0.1)
    assert bits_of(m) == 0xEDFEF7F77FFFFF7F
    assert site_id(SiteKind.ATTN_PROBS, 1) == 2049


def test_mask_is_independent_of_batch_row_neighbours_and_padded_length():
    seed, epoch, site, p = 11, 2, site_id(SiteKind.ATTN_PROBS, 0), 0.3
    alone = keep_mask(seed, torch.tensor([42]), epoch, site, (4, 10, 10), p)[0]
    in_batch = keep_mask(seed, torch.tensor([5, 9, 42, 100]), epoch, site, (4, 10, 10), p)[2]
    padded = keep_mask(seed, torch.tensor([42, 8]), epoch, site, (4, 23, 23), p)[0, :, :10, :10]
    assert torch.equal(alone, in_batch)
    assert torch.equal(alone, padded)
    hidden_alone = keep_mask(seed, torch.tensor([42]), epoch, 7, (10, 32), p)[0]
    hidden_padded = keep_mask(seed, torch.tensor([1, 2, 42]), epoch, 7, (31, 32), p)[2, :10]
    assert torch.equal(hidden_alone, hidden_padded)


def test_blocking_does_not_change_bits(monkeypatch):
    ids = torch.arange(5)
    ref = keep_mask(3, ids, 1, 9, (3, 50, 50), 0.2)
    for chunk in (7, 1000, 7500, 1 << 30):
        monkeypatch.setattr(D, "CPU_CHUNK_ELEMENTS", chunk)
        assert torch.equal(keep_mask(3, ids, 1, 9, (3, 50, 50), 0.2), ref)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    ids = torch.arange(64)
    m = keep_mask(1, ids, 0, site_id(SiteKind.ATTN_OUTPUT, 0), (128, 128), p).double()
    n = m.numel()
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(m.mean().item() - (1 - p)) < bound
    # neighbours (along every axis) are independent: P(keep, keep) = (1-p)^2
    for a, b in [(m[:, :, 1:], m[:, :, :-1]), (m[:, 1:], m[:, :-1]), (m[1:], m[:-1])]:
        joint = (a * b).mean().item()
        assert abs(joint - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel()) * 2


def test_different_examples_sites_epochs_seeds_get_different_masks():
    p, shape = 0.5, (64, 64)
    base = keep_mask(1, torch.tensor([10]), 0, 2048, shape, p)[0]
    variants = {
        "example": keep_mask(1, torch.tensor([11]), 0, 2048, shape, p)[0],
        "site": keep_mask(1, torch.tensor([10]), 0, 2049, shape, p)[0],
        "epoch": keep_mask(1, torch.tensor([10]), 1, 2048, shape, p)[0],
        "seed": keep_mask(2, torch.tensor([10]), 0, 2048, shape, p)[0],
    }
    n = base.numel()
    for name, other in variants.items():
        disagree = (base != other).double().mean().item()
        # uncorrelated masks disagree on 2 p (1 - p) of the elements
        assert abs(disagree - 2 * p * (1 - p)) < 5 * math.sqrt(0.25 / n), name
    # many examples at once: no two rows equal
    rows = keep_mask(1, torch.arange(200), 0, 2048, (256,), p)
    assert len({tuple(r.tolist()) for r in rows}) == 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_kept_values_scaled_exactly_like_torch(dtype, p):
    ctx = InvariantDropoutContext(seed=5)
    ctx.set_batch(torch.arange(8), epoch=0)
    drop = InvariantDropout(site=1, p=p, context=ctx).train()
    x = torch.randn(8, 50, 16, dtype=dtype) + 3.0
    out = drop(x)
    ours_kept = out != 0
    torch.manual_seed(0)
    ref = F.dropout(x, p=p, training=True)
    theirs_kept = ref != 0
    both = ours_kept & theirs_kept
    assert both.any()
    assert torch.equal(out[both], ref[both])  # bit-identical scaling 1/(1-p)
    assert torch.equal(out[~ours_kept], torch.zeros_like(out[~ours_kept]))
    # gradient: d out / d x = keep / (1 - p)
    xg = x.clone().requires_grad_(True)
    drop(xg).sum().backward()
    assert torch.equal(xg.grad, drop(torch.ones_like(x)))
    # eval mode and p = 0 are the identity; p = 1 drops everything
    assert drop.eval()(x) is x
    assert torch.equal(InvariantDropout(1, 1.0, ctx).train()(x), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
# Installation and coverage of every BERT dropout
# ------------------------------------------------------------------------------------------------
def expected_sites(num_layers: int, with_head: bool) -> dict[str, int]:
    prefix = "bert."
    sites = {prefix + "embeddings.dropout": site_id(SiteKind.EMBEDDINGS, 0)}
    for i in range(num_layers):
        layer = f"{prefix}encoder.layer.{i}."
        sites[layer + "attention.self.dropout"] = site_id(SiteKind.ATTN_PROBS, i)
        sites[layer + "attention.output.dropout"] = site_id(SiteKind.ATTN_OUTPUT, i)
        sites[layer + "output.dropout"] = site_id(SiteKind.FFN_OUTPUT, i)
    if with_head:
        sites["dropout"] = site_id(SiteKind.HEAD, 0)
    return sites


@pytest.mark.parametrize("kind", ["classifier", "mlm"])
def test_every_dropout_site_is_invariant_and_torch_rng_is_never_used(kind):
    model = tiny_classifier() if kind == "classifier" else tiny_mlm()
    ctl = DropoutController(model, "invariant", seed=3)
    assert ctl.sites == expected_sites(2, with_head=kind == "classifier")  # the MLM head has no dropout
    assert model.config._attn_implementation == ATTENTION_NAME
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and not isinstance(m, InvariantDropout)]
    assert not plain

    calls: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, InvariantDropout):
            mod.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))

    model.train()
    ids, mask, labels = collate(make_examples(4))
    ctl.set_batch(torch.tensor([10, 11, 12, 13]), epoch=0)
    rng_before = torch.get_rng_state()
    out = model(input_ids=ids, attention_mask=mask)
    out.logits.float().pow(2).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng_before), "some dropout still draws from torch's RNG"
    assert calls == {name: 1 for name in ctl.sites}, "every site (attention probabilities included) fires once"

    # the masks really are applied: train-mode output differs from eval, and is reproducible
    ctl.set_batch(torch.tensor([10, 11, 12, 13]), epoch=0)
    torch.manual_seed(123)
    again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, out.logits)
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ev, out.logits)


def test_every_site_has_its_own_effect():
    """Turning a single site's probability on changes the output (so each site is live)."""
    model = tiny_classifier().train()
    ctl = DropoutController(model, "invariant", seed=1)
    ids, mask, _ = collate(make_examples(3))
    drops = dict(model.named_modules())
    for name in ctl.sites:
        drops[name].p = 0.0
    ctl.set_batch(torch.arange(3), 0)
    ref = model(input_ids=ids, attention_mask=mask).logits
    for name in ctl.sites:
        drops[name].p = 0.5
        ctl.set_batch(torch.arange(3), 0)
        out = model(input_ids=ids, attention_mask=mask).logits
        drops[name].p = 0.0
        assert not torch.allclose(out, ref), name


def test_remove_restores_the_model():
    model = tiny_classifier()
    before_types = {n: type(m) for n, m in model.named_modules()}
    before_keys = list(model.state_dict())
    before_attn = model.config._attn_implementation
    ctl = DropoutController(model, "invariant", seed=1)
    assert list(model.state_dict()) == before_keys  # nothing added to the checkpoint
    ctl.remove()
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    assert model.config._attn_implementation == before_attn
    off = DropoutController(model, "off", seed=1)
    off.remove()
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        DropoutController(tiny_classifier(), "sometimes", seed=0)


# ------------------------------------------------------------------------------------------------
# Batch context errors
# ------------------------------------------------------------------------------------------------
def test_training_forward_without_or_with_stale_batch_raises():
    model = tiny_classifier().train()
    ctl = DropoutController(model, "invariant", seed=0)
    ids, mask, _ = collate(make_examples(4))
    with pytest.raises(RuntimeError, match="set_batch"):
        model(input_ids=ids, attention_mask=mask)
    ctl.set_batch(torch.arange(3), epoch=0)  # wrong size: ids of another batch
    with pytest.raises(RuntimeError, match="batch size 4"):
        model(input_ids=ids, attention_mask=mask)
    ctl.set_batch(torch.arange(4), epoch=0)
    model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="second training forward"):
        model(input_ids=ids, attention_mask=mask)  # same ids again without set_batch
    ctl.set_batch(torch.arange(4), epoch=0)
    model(input_ids=ids, attention_mask=mask)
    # eval mode needs no context
    model.eval()
    model(input_ids=ids[:2], attention_mask=mask[:2])
    with pytest.raises(ValueError):
        ctl.set_batch(torch.zeros(2, 2, dtype=torch.long), epoch=0)


def test_batch_context_manager_clears_ids():
    model = tiny_classifier().train()
    ctl = DropoutController(model, "invariant", seed=0)
    ids, mask, _ = collate(make_examples(2))
    with ctl.batch(torch.tensor([4, 5]), epoch=1):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="set_batch"):
        model(input_ids=ids, attention_mask=mask)


# ------------------------------------------------------------------------------------------------
# Invariance in the model: same example, same masks, whatever the micro-batch
# ------------------------------------------------------------------------------------------------
def example_logits_and_grad(model, ctl, examples, ids, position, pad_to=None):
    """Train-mode logits of examples[position] and the gradient of its loss alone."""
    model.zero_grad(set_to_none=True)
    input_ids, mask, labels = collate(examples, pad_to)
    ctl.set_batch(torch.tensor(ids), epoch=4)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    F.cross_entropy(logits[position : position + 1], labels[position : position + 1]).backward()
    return logits[position].detach().clone(), flat_grad(model).clone()


def test_same_example_same_masks_alone_in_batches_at_positions_and_padded_lengths():
    model = tiny_classifier().double().train()
    ctl = DropoutController(model, "invariant", seed=77)
    pool = make_examples(6, min_len=10, max_len=16, seed=3)
    target = ([5, 9, 13, 2, 7, 7, 30, 1, 4], 2)  # 9 tokens, id 1000
    ref_logits, ref_grad = example_logits_and_grad(model, ctl, [target], [1000], 0)
    cases = [
        ([pool[0], pool[1], target], [1, 2, 1000], 2, None),  # other micro-batch, last row, padded to 16ish
        ([target, pool[2], pool[3], pool[4]], [1000, 3, 4, 5], 0, None),  # first row, other neighbours
        ([pool[5], target], [6, 1000], 1, 40),  # much longer padded length
        ([target], [1000], 0, 25),  # alone but padded
    ]
    for examples, ids, pos, pad_to in cases:
        logits, grad = example_logits_and_grad(model, ctl, examples, ids, pos, pad_to)
        assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-12), (ids, pad_to)
        assert rel_l2(grad, ref_grad) < 1e-10, (ids, pad_to)
    # control: another example id (or epoch) at the same place gives other masks
    other_logits, _ = example_logits_and_grad(model, ctl, [target], [1001], 0)
    assert not torch.allclose(other_logits, ref_logits, rtol=0, atol=1e-6)


def test_same_example_same_masks_in_float32():
    model = tiny_classifier().train()
    ctl = DropoutController(model, "invariant", seed=77)
    examples = make_examples(5, seed=4)
    ref, _ = example_logits_and_grad(model, ctl, [examples[3]], [103], 0)
    got, _ = example_logits_and_grad(model, ctl, examples, [100, 101, 102, 103, 104], 3, pad_to=30)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_identical_masks():
    examples = make_examples(4, seed=8)
    input_ids, mask, labels = collate(examples)
    grads = []
    for checkpointing in (False, True):
        model = tiny_classifier().double().train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        ctl = DropoutController(model, "invariant", seed=5)
        ctl.set_batch(torch.arange(4), epoch=0)
        F.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
        grads.append(flat_grad(model))
    assert rel_l2(grads[1], grads[0]) < 1e-12


# ------------------------------------------------------------------------------------------------
# Gradient accumulation equivalence
# ------------------------------------------------------------------------------------------------
def accumulated_grad(model, ctl, examples, ids, micro: int, pad_to: int) -> torch.Tensor:
    """Sum over micro-batches of (sum of per-example losses / total count); window padding."""
    model.zero_grad(set_to_none=True)
    total = len(examples)
    for start in range(0, total, micro):
        input_ids, mask, labels = collate(examples[start : start + micro], pad_to)
        ctl.set_batch(ids[start : start + micro], epoch=1)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        (F.cross_entropy(logits, labels, reduction="sum") / total).backward()
    return flat_grad(model).clone()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_accumulated_gradient_matches_full_batch_with_invariant_dropout(dtype, tol):
    model = tiny_classifier(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).to(dtype).train()
    ctl = DropoutController(model, "invariant", seed=2024)
    examples = make_examples(8, min_len=4, max_len=14, seed=1)
    ids = torch.tensor([17, 3, 250, 9, 41, 8, 1234, 60])
    pad_to = max(len(t) for t, _ in examples)
    full = accumulated_grad(model, ctl, examples, ids, micro=8, pad_to=pad_to)
    for micro in (4, 2, 1):  # (B, N) = (4, 2), (2, 4), (1, 8)
        acc = accumulated_grad(model, ctl, examples, ids, micro=micro, pad_to=pad_to)
        assert rel_l2(acc, full) < tol, (micro, rel_l2(acc, full))


def test_standard_dropout_breaks_accumulation_equivalence():
    """Control for the test above: with torch-RNG masks the same comparison fails by far."""
    model = tiny_classifier().train()
    ctl = DropoutController(model, "standard", seed=2024)
    examples = make_examples(8, min_len=4, max_len=14, seed=1)
    ids = torch.arange(8)
    torch.manual_seed(0)
    full = accumulated_grad(model, ctl, examples, ids, micro=8, pad_to=14)
    torch.manual_seed(0)
    acc = accumulated_grad(model, ctl, examples, ids, micro=4, pad_to=14)
    assert rel_l2(acc, full) > 1e-3


# ------------------------------------------------------------------------------------------------
# Modes "off" and "standard"
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_classifier, tiny_mlm])
def test_off_mode_equals_eval_but_stays_in_train_mode(factory):
    model = factory()
    ids, mask, _ = collate(make_examples(4))
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask).logits
    model.train()
    ctl = DropoutController(model, "off", seed=0)
    ctl.set_batch(torch.arange(4), 0)  # accepted, ignored
    with torch.no_grad():
        tr = model(input_ids=ids, attention_mask=mask).logits
    assert model.training
    assert ctl.disabled and all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.dropout.p == 0.0 for m in model.modules() if type(m).__name__ == "BertSelfAttention")
    assert torch.allclose(tr, ev, rtol=0, atol=1e-6)


def test_standard_mode_leaves_the_model_stock():
    stock = tiny_classifier()
    model = copy.deepcopy(stock)
    ctl = DropoutController(model, "standard", seed=0)
    assert ctl.sites == {}
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in stock.named_modules()}
    assert model.config._attn_implementation == stock.config._attn_implementation
    ids, mask, _ = collate(make_examples(4))
    stock.train()
    model.train()
    torch.manual_seed(9)
    a = stock(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(9)
    ctl.set_batch(torch.arange(4), 0)
    b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    torch.manual_seed(10)
    c = model(input_ids=ids, attention_mask=mask).logits  # still torch-RNG dropout
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Attention through the registry: padding must not leak, eval math equals the default
# ------------------------------------------------------------------------------------------------
def padded_batch_outputs(model, target, others, pad_to):
    """Eval-mode (logits, final hidden states of the real tokens) of ``target`` batched with ``others``."""
    ids, mask, _ = collate([target, *others], pad_to)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0, : len(target[0])]


def test_padding_does_not_leak_through_the_registered_attention():
    model = tiny_classifier()
    DropoutController(model, "invariant", seed=0)
    model.eval()
    target = ([3, 4, 5, 6, 7], 1)
    others = make_examples(3, min_len=12, max_len=20, seed=5)
    alone = padded_batch_outputs(model, target, [], None)
    for pad_to in (None, 40):
        batched = padded_batch_outputs(model, target, others, pad_to)
        assert torch.allclose(batched[0], alone[0], rtol=0, atol=1e-6)  # logits
        assert torch.allclose(batched[1], alone[1], rtol=0, atol=1e-5)  # hidden states, O(1) values


def test_leak_control_attention_without_mask_function_does_leak():
    """The pitfall the registration avoids: a name known only to AttentionInterface gets no mask."""
    from transformers.modeling_utils import AttentionInterface

    name = "bert_accum_test_no_mask"
    AttentionInterface.register(name, D.invariant_attention_forward)
    model = tiny_classifier()
    model.set_attn_implementation(name)
    model.eval()
    target = ([3, 4, 5, 6, 7], 1)
    others = make_examples(3, min_len=12, max_len=20, seed=5)
    alone = padded_batch_outputs(model, target, [], None)
    batched = padded_batch_outputs(model, target, others, None)
    assert (batched[1] - alone[1]).abs().max() > 1e-2  # the padding tokens were attended to


@pytest.mark.parametrize("factory", [tiny_classifier, tiny_mlm])
def test_eval_mode_matches_default_attention(factory):
    stock = factory().eval()
    model = copy.deepcopy(stock)
    DropoutController(model, "invariant", seed=0)
    model.eval()
    assert stock.config._attn_implementation != ATTENTION_NAME
    ids, mask, _ = collate(make_examples(5, seed=6))
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
        c = model(input_ids=ids).logits  # no padding mask at all (mask builder may return None)
        d = stock(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert torch.allclose(c, d, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Device independence
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_equal_cpu_masks():
    ids = torch.tensor([0, 5, 2**40, 123456])
    for trailing in [(12, 37, 37), (37, 64), (64,)]:
        cpu = keep_mask(99, ids, 3, 2050, trailing, 0.1)
        gpu = keep_mask(99, ids.cuda(), 3, 2050, trailing, 0.1, device="cuda")
        assert torch.equal(cpu, gpu.cpu())
    m = keep_mask(20240611, torch.tensor([7]).cuda(), 3, 2049, (1, 8, 8), 0.5, device="cuda")
    assert bits_of(m.cpu()) == 0x824EA549097FE522
