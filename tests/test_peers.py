"""bench/peers.py's shared pieces: every implementation gets the same rows at the same step, the plain loop's loss
is ours, and the one validation loss they are all read with is ours too."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peer_run  # noqa: E402
import peers  # noqa: E402


def test_trainer_order_is_accelerates_seeded_permutation():
    # Independent reference: accelerate's SeedableRandomSampler draws torch.randperm(n) from a generator seeded
    # with data_seed + epoch (accelerate/data_loader.py), epoch 0 here.
    for seed in (0, 7):
        expected = torch.randperm(37, generator=torch.Generator().manual_seed(seed)).tolist()
        assert peers.trainer_order(37, seed) == expected


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_process_split_deals_each_step_exactly_its_rows(processes):
    tokens = torch.arange(12 * 3).reshape(12, 3)  # 12 rows of 3 "tokens", row i starts with 3i
    global_batch, steps = 4, 3
    for step in range(steps):
        parts = [peer_run.step_rows(tokens, step, global_batch, r, processes) for r in range(processes)]
        assert sum(len(p) for p in parts) == global_batch
        dealt = sorted(int(row[0]) // 3 for part in parts for row in part)
        assert dealt == list(range(step * global_batch, (step + 1) * global_batch))


def test_order_matches_reads_steps_across_processes():
    expected = [5, 1, 4, 0, 3, 2, 7, 6]
    # Two processes, micro-batches dealt alternately: rank 0 got [5, 1] then [3, 2], rank 1 [4, 0] then [7, 6].
    assert peers.order_matches([[5, 1, 3, 2], [4, 0, 7, 6]], expected, global_batch=4)
    assert peers.order_matches([expected], expected, global_batch=4)
    # A row from step 2 used in step 1 is a mismatch even though every row is used once.
    assert not peers.order_matches([[5, 3, 1, 2], [4, 0, 7, 6]], expected, global_batch=4)


def _tiny_llama(seed: int, hidden: int = 32, vocab: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def test_plain_loops_kl_equals_ours_in_float64():
    from secateurs.losses import IGNORE_INDEX, chunked_kd_loss

    teacher, student = _tiny_llama(0, hidden=48), _tiny_llama(1)
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    # What ours is given in training (secateurs/train.py): the next token, IGNORE_INDEX at the last position.
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    t_out = teacher(input_ids=ids, output_hidden_states=True)
    s_out = student(input_ids=ids, output_hidden_states=True)
    for temperature in (1.0, 2.0):
        ours = chunked_kd_loss(
            s_out.hidden_states[-1], student.lm_head.weight, t_out.hidden_states[-1], teacher.lm_head.weight,
            temperature=temperature, chunk_size=5, labels=labels,
        )  # fmt: skip
        plain = peer_run.full_vocabulary_kl(s_out.logits, t_out.logits, peer_run.kd_labels(ids), temperature)
        plain = plain / ids.numel()
        # Independent reference: the definition, sum_v p_t (log p_t - log p_s), averaged over every position (the
        # last one too: ours distils it, and `kd_labels` keeps it for the peers that mask by label).
        p_t = torch.softmax(t_out.logits / temperature, -1)
        log_ratio = torch.log_softmax(t_out.logits / temperature, -1) - torch.log_softmax(
            s_out.logits / temperature, -1
        )
        reference = (p_t * log_ratio).sum(-1).mean() * temperature**2
        torch.testing.assert_close(plain, reference, rtol=1e-12, atol=1e-14)
        # Ours forms each chunk's softmax in fp32 whatever the inputs' dtype (secateurs/losses.py): a KL of ~0.015
        # is a difference of logs, so fp32 rounding shows at ~1e-5 of it.
        torch.testing.assert_close(ours.double(), reference, rtol=2e-5, atol=1e-9)


def test_validation_loss_equals_ours():
    from secateurs.evaluate import validation_loss

    model = _tiny_llama(2)
    ids = torch.randint(0, 50, (5, 11), generator=torch.Generator().manual_seed(1))
    # Both form the cross-entropy from fp32 logits (ours chunk by chunk, summed in fp64): fp32 rounding apart.
    assert peer_run.validation_loss(model, ids, batch_size=2) == pytest.approx(
        validation_loss(model, ids, batch_size=3), rel=1e-6
    )
