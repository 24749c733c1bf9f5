"""The PyTorch RMT against its definition (RMT_SEMANTICS.md) on every supported family."""
import pytest
import torch

from rmt_model.tiny import DECODER_FAMILIES, ENCODER_FAMILIES

ALL_FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


def random_ids(model, batch, length, seed=1):
    gen = torch.Generator().manual_seed(seed)
    low = 4 if model.config.kind == "encoder" else 0  # keep clear of the framing ids
    return torch.randint(low, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_loop_equals_steps_by_hand(make_model, family):
    model = make_model(family, segment_size=8)
    ids = random_ids(model, 2, 29)  # 3 full segments and a short one
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(ids, mask)
        memory = model.memory.unsqueeze(0).expand(2, -1, -1)
        pieces = []
        for start in (0, 8, 16, 24):
            logits, memory = model.step(ids[:, start:start + 8], mask[:, start:start + 8], memory)
            pieces.append(logits)
    assert torch.equal(out.logits, torch.cat(pieces, dim=1))
    assert torch.equal(out.memory, memory)
    assert out.logits.shape == (2, 29, model.config.vocab_size)
    assert out.memory.shape == (2, model.config.num_mem_tokens, model.config.hidden_size)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_loop_equals_steps_by_hand(make_model, family):
    model = make_model(family, segment_size=8)
    ids = random_ids(model, 1, 19)  # right-aligned: 3 + 8 + 8
    with torch.no_grad():
        out = model(ids)
        memory = model.initial_memory(1)
        for start, end in ((0, 3), (3, 11), (11, 19)):
            chunk = ids[:, start:end]
            logits, memory = model.step(chunk, torch.ones_like(chunk), memory)
    assert torch.equal(out.logits, logits)
    assert torch.equal(out.memory, memory)
    assert out.logits.shape == (1, model.config.num_labels)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_step_equals_backbone_by_hand(make_model, family):
    """One segment = backbone(cat[mem, embeds, mem]) with default positions, sliced."""
    model = make_model(family, segment_size=8)
    m = model.config.num_mem_tokens
    ids = random_ids(model, 2, 8)
    memory = torch.randn(2, m, model.config.hidden_size) * 0.02
    with torch.no_grad():
        logits, new_memory = model.step(ids, torch.ones_like(ids), memory)
        embeds = model.model.get_input_embeddings()(ids)
        out = model.model(inputs_embeds=torch.cat([memory, embeds, memory], dim=1),
                          attention_mask=torch.ones(2, 2 * m + 8, dtype=torch.long),
                          output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits[:, m:-m], rtol=0, atol=1e-6)
    torch.testing.assert_close(new_memory, out.hidden_states[-1][:, -m:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_step_equals_backbone_by_hand(make_model, family):
    """[CLS] mem [SEP] tokens [SEP], memory embeddings replaced, classifier on [CLS]."""
    model = make_model(family, segment_size=8)
    cfg, m = model.config, model.config.num_mem_tokens
    ids = random_ids(model, 2, 6)
    memory = torch.randn(2, m, cfg.hidden_size)
    mem_ids = torch.arange(cfg.vocab_size, cfg.vocab_size + m).expand(2, -1)
    col = torch.ones(2, 1, dtype=torch.long)
    framed = torch.cat([col * cfg.cls_token_id, mem_ids, col * cfg.sep_token_id, ids,
                        col * cfg.sep_token_id], dim=1)
    with torch.no_grad():
        logits, new_memory = model.step(ids, torch.ones_like(ids), memory)
        embeds = model.model.get_input_embeddings()(framed).clone()
        embeds[:, 1:m + 1] = memory
        out = model.model(inputs_embeds=embeds, attention_mask=torch.ones_like(framed),
                          output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_memory, out.hidden_states[-1][:, 1:m + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_memory_carries_information(make_model, family):
    """Changing the first segment changes the last segment's output; so does zeroing memory.

    initializer_range 0.2 gives attention that is not near-uniform, as in a trained model;
    at 0.02 a tiny encoder's pooled [CLS] barely moves whatever its input.
    """
    model = make_model(family, segment_size=8, initializer_range=0.2)
    ids = random_ids(model, 1, 32)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1 - 4) % (model.config.vocab_size - 4) + 4
    with torch.no_grad():
        base = model(ids)
        other = model(changed)
        zeroed = model(ids, memory=torch.zeros_like(model.initial_memory(1)))
    last = slice(-8, None) if model.config.kind == "decoder" else slice(None)
    scale = base.logits[:, last].abs().max()
    assert (base.logits[:, last] - other.logits[:, last]).abs().max() > 1e-3 * scale
    assert (base.logits[:, last] - zeroed.logits[:, last]).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unequal_lengths_in_a_batch_match_each_row_alone(make_model, family):
    model = make_model(family, segment_size=8)
    lengths = [29, 11, 8, 3]
    ids = random_ids(model, len(lengths), max(lengths))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    with torch.no_grad():
        batched = model(ids, mask)
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, :n])
            torch.testing.assert_close(batched.memory[row], alone.memory[0], rtol=0, atol=1e-5)
            if model.config.kind == "decoder":
                torch.testing.assert_close(batched.logits[row, :n], alone.logits[0], rtol=0, atol=1e-5)
            else:
                torch.testing.assert_close(batched.logits[row], alone.logits[0], rtol=0, atol=1e-5)


def test_padding_changes_nothing_but_is_really_masked(make_model):
    """Pad tokens' ids must not matter; if they were attended to they would."""
    model = make_model("gpt2", segment_size=8)
    ids = random_ids(model, 1, 16)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    other = ids.clone()
    other[:, 12:] = (other[:, 12:] + 5) % model.config.vocab_size
    with torch.no_grad():
        a = model(ids, mask)
        b = model(other, mask)
        attended = model(other)
    torch.testing.assert_close(a.memory, b.memory, rtol=0, atol=1e-6)
    assert (attended.memory - a.memory).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_truncated_bptt_cuts_gradient_to_initial_memory(make_model, family):
    """Detaching every segment stops the last segment's loss reaching the initial memory."""
    model = make_model(family, segment_size=8).train()
    for module in model.modules():  # dropout off: compare gradients, not noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = random_ids(model, 2, 24)
    grads = {}
    for depth in (None, 1):
        model.zero_grad()
        out = model(ids, bptt_depth=depth)
        last = out.logits[:, -8:] if model.config.kind == "decoder" else out.logits
        last.float().pow(2).mean().backward()
        initial = model.memory if family == "gpt2" else model.model.get_input_embeddings().weight
        grad = initial.grad
        if family == "bert":
            grad = grad[model.mem_token_ids]
        grads[depth] = grad.abs().sum().item()
    assert grads[None] > 0
    assert grads[1] == 0


def test_training_loss_decreases(make_model):
    model = make_model("gpt2", segment_size=8).train()
    ids = random_ids(model, 4, 24)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = model(ids, labels=ids, bptt_depth=2).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_last_logits_equal_full_logits_at_each_rows_last_token(make_model, family):
    model = make_model(family, segment_size=8)
    ids = random_ids(model, 3, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    memory = model.initial_memory(3)
    with torch.no_grad():
        full, memory_full = model.step(ids, mask, memory)
        last, memory_last = model.step(ids, mask, memory, logits="last")
    expected = torch.stack([full[0, 7], full[1, 4], full[2, 0]])
    torch.testing.assert_close(last, expected, rtol=0, atol=1e-6)
    assert torch.equal(memory_full, memory_last)


def _right_padded_masks():
    """Random right-padded 0/1 masks [B, L] with the edge rows: all ones, all zeros, one token."""
    gen = torch.Generator().manual_seed(7)
    masks = [torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
             torch.tensor([[1, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])]
    for _ in range(200):
        batch = int(torch.randint(1, 6, (1,), generator=gen))
        length = int(torch.randint(1, 20, (1,), generator=gen))
        lengths = torch.randint(0, length + 1, (batch,), generator=gen)
        edge = (0, 1, length)[int(torch.randint(0, 3, (1,), generator=gen))]  # one edge row per mask
        lengths[int(torch.randint(0, batch, (1,), generator=gen))] = edge
        masks.append((torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long())
    return masks


@pytest.mark.parametrize("write_slots", [True, False], ids=["step", "prefill"])
def test_positions_without_cumsum_equal_cumsum_positions_on_right_padded_masks(write_slots):
    """The CumSum-free positions the exported graphs compute are the cumsum ones, for every
    right-padded mask (all-ones, all-zeros and single-token rows among them)."""
    from rmt_model.model import cumsum_positions, is_right_padded, right_padded_positions, segment_positions

    masks = _right_padded_masks()
    seen = set()
    for mask in masks:
        assert bool(is_right_padded(mask))
        for m in (1, 2, 5):
            expected = cumsum_positions(mask, m, write_slots)
            got = right_padded_positions(mask, m, write_slots)
            assert got.dtype == torch.int64 and got.shape == expected.shape
            assert torch.equal(got, expected), (mask, m)
            assert torch.equal(segment_positions(mask, m, write_slots), expected)
        seen.update(int(n) for n in mask.sum(dim=1) if n in (0, 1, mask.shape[1]))
    assert {0, 1} <= seen
    # Without padding: 0 .. P-1, the backbone's default positions (the reference RMT's).
    full = torch.ones(3, 8, dtype=torch.long)
    width = 2 * 4 + 8 if write_slots else 4 + 8
    assert torch.equal(right_padded_positions(full, 4, write_slots), torch.arange(width).expand(3, -1))
    # The written formula, one row by hand: M=2, L=5, n=3.
    row = torch.tensor([[1, 1, 1, 0, 0]])
    expected = [0, 1, 2, 3, 4, 4, 4] + ([5, 6] if write_slots else [])
    assert right_padded_positions(row, 2, write_slots).tolist() == [expected]


def test_masks_that_are_not_right_padded_keep_cumsum_positions_when_run_eagerly():
    """Left padding and gaps (the runtime refuses them) still get the cumsum positions in the
    PyTorch model; the CumSum-free form would differ there, so the check is what keeps them."""
    from rmt_model.model import cumsum_positions, is_right_padded, right_padded_positions, segment_positions

    for mask in (torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 0, 1, 1]]),
                 torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])):
        assert not bool(is_right_padded(mask))
        for write_slots in (True, False):
            expected = cumsum_positions(mask, 3, write_slots)
            assert torch.equal(segment_positions(mask, 3, write_slots), expected)
            assert not torch.equal(right_padded_positions(mask, 3, write_slots), expected)
